"""`tfmir search`: the most similar indexed images for query image files, as JSON.

    tfmir search --index=indexes/skin --model=exported/tfmir --k=8 query.jpg
    tfmir search --index=indexes/skin --model=exported/tfmir --gallery=results.png a.jpg b.png

--model must be the model that built the index (its fingerprint is checked against the index
manifest): the same SavedModel, or the .keras checkpoint it was exported from. Prints (or writes
to --output_json) a list with one entry per query:
`{"query", "results": [{"id", "label", "source", "path", "score", "rank"}], "predicted_label"}`, the
prediction being the majority label of the top k (ties go to the nearest: deep kNN). For a hamming
index, the query codes are the signs of the query embeddings, as `tfmir index` made the indexed
codes, or a hashing model's bits; scores are then Hamming distances (lower is better). A hashing
model's codes search a hamming index only; a float index is refused. An --output_json or --gallery
that cannot be written (a read-only folder, a file where a folder should be) is refused before
anything is embedded.

A style database (`tfmir index` with a model that has Gram outputs, paper 003) is searched with
--measure (one of the nine of `tfmir.similarity.MEASURES`, default style) and --mode (exact or
fast); each entry then also names its "measure" and "mode". --segmenter segments the queries
for the Dice measures; see `tfmir.cli.style_index`.
"""

from __future__ import annotations

import json
import os

from absl import flags

from tfmir.serving.retrieval import (SearchError, load_index, predicted_labels,
                                     search_sources)

_INDEX = flags.DEFINE_string("index", None, "Index directory written by `tfmir index`.",
                             required=True)
_MODEL = flags.DEFINE_string(
    "model", None, "The model that built the index: its SavedModel directory or the .keras "
    "checkpoint it was exported from (fingerprints must match).", required=True)
_K = flags.DEFINE_integer("k", 8, "Results per query.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write the JSON here (default: stdout).")
_GALLERY = flags.DEFINE_string(
    "gallery", None, "Also write a PNG: each query followed by its top k. A result is framed "
    "green when its label equals --query_label if given, else the predicted label (the queries' "
    "true labels are not known), red otherwise; indexed images without a file (MedMNIST, in "
    "memory) are shown as grey tiles.")
_QUERY_LABEL = flags.DEFINE_string("query_label", None, "The queries' known label, used to "
                                   "frame the gallery (see --gallery).")
_SOURCE = flags.DEFINE_string(
    "source", None, "Only return results from this source. Implemented by searching a larger k "
    "(doubling up to the whole index) and keeping that source's results.")
_RESIZE_SIZE = flags.DEFINE_integer(
    "resize_size", None, "Resize side for a .keras --model (default: config.json beside it).",
    lower_bound=1)

# Style databases (paper 003; see tfmir.cli.style_index).
_SEGMENTER = flags.DEFINE_string(
    "segmenter", None, "Style databases: the .keras segmenter that built the database, to "
    "segment the queries for the Dice measures (an empty predicted mask scores Dice 1 against "
    "an empty mask and 0 against any other: `tfmir.similarity.dice_coefficient`).")
_MEASURE = flags.DEFINE_string(
    "measure", None, "Style databases: the similarity measure, one of euclidean, cosine, style, "
    "I1_ED, I1_CD, I1_ECD, I1_SE, I1_SC, I1_SD (default style). Scores are in [0, 1], higher is "
    "more similar.")
_MODE = flags.DEFINE_enum(
    "mode", None, ["exact", "fast"], "Style databases: exact (every item, the paper's "
    "normalisation) or fast (exact re-ranking of PCA candidates; default exact).")
_CANDIDATES = flags.DEFINE_integer(
    "candidates", 100, "Style databases, --mode=fast: items taken from each candidate list.",
    lower_bound=1)

PLACEHOLDER_GREY = 160


def check_queries(paths) -> None:
    from tfmir.data.datasets import find_unreadable

    if not paths:
        raise SearchError("no query images: give image files after the flags, e.g. "
                          "`tfmir search --index=... --model=... query.jpg`.")
    unreadable = find_unreadable(paths)
    if unreadable:
        raise SearchError("unreadable query image(s): " + "; ".join(
            f"{path} ({reason})" for path, reason in unreadable))


def check_output_files(paths: dict) -> None:
    """Refuses output files (by flag name) that cannot be written, before any work is done."""
    for flag, path in paths.items():
        if not path:
            continue
        reason = "it is a folder" if os.path.isdir(path) else _unwritable_reason(path)
        if reason:
            raise SearchError(f"--{flag}={path} cannot be written: {reason}.")


def _unwritable_reason(path: str) -> str | None:
    # As `tfmir.cli.index.unwritable_reason` (importing that module would define its flags).
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


def _image(path: str | None, fallback_side: int = 64):
    """The image as every reader sees it (upright, first frame, ...), or a grey tile."""
    import numpy as np

    from tfmir.images import ImageError, decode_rgb

    if path:
        try:
            with open(path, "rb") as stream:
                return decode_rgb(stream.read())
        except (OSError, ImageError):
            pass
    return np.full((fallback_side, fallback_side, 3), PLACEHOLDER_GREY, np.uint8)


def write_gallery(path: str, queries, output, query_label: str | None) -> None:
    from tfmir.visualization.gallery import save_gallery

    predictions = [entry["predicted_label"] for entry in output]
    known = [] if query_label is None else [query_label]
    names = sorted({json.dumps(value) for value in predictions + known}
                   | {json.dumps(row["label"]) for entry in output for row in entry["results"]})
    code = {name: number for number, name in enumerate(names)}
    save_gallery(
        path, [_image(query) for query in queries],
        None if query_label is None else [code[json.dumps(query_label)]] * len(output),
        [[_image(row["path"]) for row in entry["results"]] for entry in output],
        [[code[json.dumps(row["label"])] for row in entry["results"]] for entry in output],
        predicted_labels=[code[json.dumps(value)] for value in predictions],
        class_names=[str(json.loads(name)) for name in names],
        row_titles=[os.path.basename(query) for query in queries])


def search(queries) -> None:
    import numpy as np

    from tfmir.data import Examples
    from tfmir.index.embedding import load_embedding_function

    if _K.value <= 0:
        raise SearchError(f"--k must be at least 1. Received: --k={_K.value}")
    if not os.path.isdir(_INDEX.value):
        raise SearchError(f"--index={_INDEX.value} is not a directory; build one with "
                          "`tfmir index`.")
    check_output_files({"output_json": _OUTPUT_JSON.value, "gallery": _GALLERY.value})
    check_queries(queries)
    output = _search_style_database(queries)
    if output is not None:
        _write_output(queries, output)
        return
    try:
        embed = load_embedding_function(_MODEL.value, resize_size=_RESIZE_SIZE.value)
    except ValueError as error:
        raise SearchError(str(error)) from error
    index = load_index(_INDEX.value, embed.fingerprint, embed.preprocessing,
                       query_kind=embed.kind, model=embed.description)
    if _K.value > len(index):
        raise SearchError(f"--k={_K.value} is larger than the index ({len(index)} items).")
    paths = [os.path.abspath(query) for query in queries]
    examples = Examples(labels=np.zeros(len(paths), np.int64), sources="query",
                        ids=[str(number) for number in range(len(paths))], class_names=("",),
                        paths=paths)
    try:
        embeddings = embed(examples)
    except Exception as error:  # the SavedModel's header checks raise InvalidArgumentError
        raise SearchError(f"could not embed the query images: {type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}") from error
    results = search_sources(index, embeddings, _K.value, _SOURCE.value)
    output = [{"query": query, "results": rows, "predicted_label": label}
              for query, rows, label in zip(queries, results, predicted_labels(results))]
    _write_output(queries, output)


def _search_style_database(queries) -> list | None:
    """The JSON entries of a style database's search; None when --index is another kind."""
    from tfmir.cli import style_index
    from tfmir.index.style import is_style_database

    style_flags = [f"--{holder.name}" for holder in (_SEGMENTER, _MEASURE, _MODE)
                   if holder.present]
    if not is_style_database(_INDEX.value):
        if style_flags:
            raise SearchError(f"{' '.join(style_flags)} apply to a style database only; "
                              f"{_INDEX.value} is another kind of index.")
        return None
    if _SOURCE.value is not None:
        raise SearchError("--source is not supported for a style database.")
    try:
        database, extractor = style_index.load_for_search(
            _INDEX.value, _MODEL.value, _SEGMENTER.value, _MEASURE.value or "style",
            resize_size=_RESIZE_SIZE.value)
        return style_index.search_entries(
            database, extractor, queries, k=_K.value, measure=_MEASURE.value or "style",
            mode=_MODE.value or "exact", candidates=_CANDIDATES.value)
    except ValueError as error:
        raise SearchError(str(error)) from error


def _write_output(queries, output) -> None:
    text = json.dumps(output, indent=2) + "\n"
    try:
        if _OUTPUT_JSON.value:
            from tfmir.files import write_atomic

            write_atomic(_OUTPUT_JSON.value, text)
        else:
            print(text, end="")
        if _GALLERY.value:
            write_gallery(_GALLERY.value, queries, output, _QUERY_LABEL.value)
    except OSError as error:  # full disk, or the folder changed since check_output_files
        raise SearchError(f"could not write {error.filename or 'an output'}: "
                          f"{error.strerror or error}") from error


def main(argv) -> None:
    try:
        search(argv[1:])
    except SearchError as error:
        raise SystemExit(f"tfmir search: error: {error}") from None
