"""Plain-text and Markdown reports shared by the commands."""

from __future__ import annotations

import json
import os
import tempfile


def recall_table(results: dict, ks=(1, 2, 4, 8)) -> str:
    """A Markdown table of Recall@K, one row per (source, model).

    Args:
        results: {model name: `tfmir.training.evaluate_retrieval` output}.
        ks: the K values (columns).

    Returns:
        The table as Markdown text (values in percent, one decimal, as in the papers).
    """
    header = "| domain | model | " + " | ".join(f"R@{k}" for k in ks) + " |"
    lines = [header, "|" + "---|" * (2 + len(ks))]
    sources = [s for s in next(iter(results.values())) if s != "average"]
    if len(sources) > 1:
        sources.append("average")
    for source in sources:
        for model_name, by_source in results.items():
            values = " | ".join(f"{100 * by_source[source][f'recall@{k}']:.1f}" for k in ks)
            lines.append(f"| {source} | {model_name} | {values} |")
    return "\n".join(lines)


def write_atomic(path: os.PathLike, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory)
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_json(path: os.PathLike, value) -> None:
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")
