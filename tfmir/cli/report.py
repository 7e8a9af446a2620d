"""Plain-text and Markdown reports shared by the commands.

`write_atomic` and `write_json` are `tfmir.files`'s, importable from here too.
"""

from __future__ import annotations

from tfmir.files import write_atomic, write_json

__all__ = ["recall_table", "write_atomic", "write_json"]


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
