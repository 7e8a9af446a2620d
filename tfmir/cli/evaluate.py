"""`tfmir evaluate`: Recall@K, mAP@k and kNN classification of a model on labelled data.

    tfmir evaluate --model=runs/sample/best.keras --data=sample
    tfmir evaluate --model=exported/tfmir --data=skin=path/to/folder --index=indexes/skin \
        --output_json=evaluation.json

The queries are the --splits (default: test) of the --data specs (as in `tfmir train`; the data must
be labelled). The gallery is either the --gallery_split (default: train) of the same data, embedded
with --model and searched through an exact (or --kind=scann, or --kind=hamming: the signs of the
embeddings) index, or an existing --index directory, which must have been built by --model with the
same preprocessing (checked against its manifest, as `tfmir search` does) and must label every item:
an index with unlabelled rows is refused. The labels of an index are class names, matched by name
with the classes of --data (`tfmir index` names them the same way). A hashing model (a "code"
output, e.g. Y-Net) is scored on Hamming ranking (equal distances in gallery order): its gallery
split goes into a hamming index (--kind=auto, the default), and an --index must be a hamming one.

Conventions (also written into the JSON under "conventions"):

- relevance: a gallery item is relevant to a query when it has the query's class;
- Recall@K: fraction of queries with a relevant item among their K nearest gallery items;
- mAP@k: per query AP@k = sum_{i<=k} P(i) rel(i) / R with R = the relevant items in the top k
  (0 when there is none), averaged over the queries (paper 002, eq. 3), not R = all relevant
  items of the gallery;
- a query is left out of its own neighbours only when the gallery holds that very item: queries
  and gallery from the same split, or an index that holds the query (same file path, or same
  source and id). In the default setting (test split against the training split) nothing is
  left out;
- kNN classification: the majority class of the Kp nearest gallery items, ties going to the
  nearest of the tied classes; Acc = accuracy, MCR = the mean over the queries' classes of their
  recall, RS = the recall of the smallest class: by default the gallery's class with the fewest
  items (the training split's smallest class, not the test split's), or --smallest_class.

Prints a table and, with --output_json, writes the same numbers (fractions in [0, 1]) as JSON
atomically; an existing --output_json is replaced only with --overwrite. Bad input (an unknown
split, data without labels, a K larger than the gallery, a model that cannot be read, a model or
index that do not match) ends with one line on stderr.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

SPLITS = ("train", "val", "test")

_MODEL = flags.DEFINE_string(
    "model", None, "SavedModel directory from `tfmir export` (base or version directory) or a "
    ".keras checkpoint from `tfmir train`.", required=True)
_DATA = flags.DEFINE_multi_string(
    "data", None, "Labelled dataset spec(s) `[source=]location`, as in `tfmir train` (sample, "
    "medmnist:NAME[@SIZE], a MedMNIST .npz, a CSV manifest, a class-per-folder directory). "
    "Repeatable.", required=True)
_SPLITS = flags.DEFINE_list("splits", ["test"], "Splits of --data used as queries.")
_GALLERY_SPLIT = flags.DEFINE_string(
    "gallery_split", "train", "Split of --data embedded as the gallery (when --index is not "
    "given). Queries are left out of their own neighbours only when this is also a query "
    "split; the default, test queries against the train split, leaves nothing out.")
_INDEX = flags.DEFINE_string(
    "index", None, "Use this index directory (from `tfmir index`) as the gallery instead of "
    "--gallery_split. It must have been built by --model with the same preprocessing, and every "
    "item must have a label. A query the index holds itself is left out of its own neighbours.")
_K = flags.DEFINE_list("k", ["1", "2", "4", "8"], "K of Recall@K: the fraction of queries with "
                       "an item of their class among their K nearest gallery items.")
_MAP_K = flags.DEFINE_list(
    "map_k", ["10"], "k of mAP@k, with AP@k = sum_{i<=k} P(i) rel(i) / R, R = the relevant "
    "(same-class) items in the top k (paper 002 eq. 3).")
_KP = flags.DEFINE_list("kp", ["1", "5"], "Kp of kNN classification: the number of nearest "
                        "gallery items that vote (majority, ties to the nearest).")
_SMALLEST_CLASS = flags.DEFINE_string(
    "smallest_class", None, "Class name whose recall is RS (default: the gallery's class with "
    "the fewest items, i.e. the training split's smallest class). It must occur among the "
    "queries.")
_KIND = flags.DEFINE_enum("kind", "auto", ["auto", "exact", "scann", "hamming"],
                          "Index built over --gallery_split (not with --index); auto is exact "
                          "for an embedding model and hamming for a model that outputs hash "
                          "codes, which need hamming (or auto).")
_METRIC = flags.DEFINE_enum("metric", "cosine", ["cosine", "dot", "l2"],
                            "Similarity of an exact or scann index built over --gallery_split "
                            "(an --index keeps its own; hamming always uses the Hamming "
                            "distance).")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Also write the results here as JSON.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --output_json.")
_RESIZE_SIZE = flags.DEFINE_integer(
    "resize_size", None, "Resize side for a .keras --model (default: config.json beside it).",
    lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per model call.", lower_bound=1)
_STRICT = flags.DEFINE_bool("strict", False, "Refuse unreadable image files instead of skipping.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder of MedMNIST .npz files.")
_DOWNLOAD = flags.DEFINE_bool("download", False, "Download missing MedMNIST files.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the 2:1:1 split of folders and manifests.")

CONVENTIONS = {
    "relevance": "a gallery item is relevant to a query when it has the query's class",
    "recall@K": "fraction of queries with at least one relevant item among their K nearest "
                "gallery items",
    "map@k": "per query AP@k = sum_{i<=k} P(i) rel(i) / R, R = relevant items in the top k "
             "(AP@k = 0 when R = 0), averaged over queries (paper 002 eq. 3); not R = all "
             "relevant items of the gallery",
    "self_exclusion": "a query is left out of its own neighbours only when the gallery holds "
                      "that very item (same split, or an index row with its path or source and "
                      "id); see queries_in_gallery",
    "knn": "majority class of the Kp nearest gallery items, ties to the nearest of the tied "
           "classes; Acc = accuracy, MCR = mean over the queries' classes of their recall, RS = "
           "recall of the smallest class",
    "smallest_class": "by default the gallery's class with the fewest items (the training "
                      "split's, not the test split's); --smallest_class overrides it",
}


class EvaluateError(Exception):
    """A problem with the command's inputs, reported as one line without a traceback."""


def positive_integers(flag) -> list[int]:
    """The values of a list flag as distinct positive integers, or an EvaluateError naming it."""
    try:
        values = [int(value) for value in flag.value]
    except ValueError:
        values = []
    if not values or any(value < 1 for value in values) or len(set(values)) != len(values):
        raise EvaluateError(f"--{flag.name} must be distinct positive integers separated by "
                            f"commas. Received: --{flag.name}={','.join(flag.value)}")
    return values


def check_flags() -> dict:
    """Flag checks that need no data: returns the parsed K lists."""
    splits = _SPLITS.value
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or not splits:
        raise EvaluateError(f"--splits must name some of {', '.join(SPLITS)}. Received: "
                            f"--splits={','.join(splits)}")
    if len(set(splits)) != len(splits):
        raise EvaluateError(f"--splits repeats a split: --splits={','.join(splits)}")
    if _INDEX.value is None and _GALLERY_SPLIT.value not in SPLITS:
        raise EvaluateError(f"--gallery_split must be one of {', '.join(SPLITS)}. Received: "
                            f"--gallery_split={_GALLERY_SPLIT.value}")
    if _KIND.value == "hamming" and _METRIC.present:
        raise EvaluateError("--metric does not apply to --kind=hamming: a hamming index always "
                            "uses the Hamming distance.")
    if _INDEX.value is not None:
        given = [f"--{flag.name}" for flag in (_GALLERY_SPLIT, _KIND, _METRIC) if flag.present]
        if given:
            raise EvaluateError(f"{' and '.join(given)} do(es) not apply with --index: the index "
                                "is the gallery, with its own kind and metric.")
        if not os.path.isdir(_INDEX.value):
            raise EvaluateError(f"--index={_INDEX.value} is not a directory; build one with "
                                "`tfmir index`.")
    check_output_json(_OUTPUT_JSON.value, _OVERWRITE.value)
    return {"k": positive_integers(_K), "map_k": positive_integers(_MAP_K),
            "kp": positive_integers(_KP)}


def check_output_json(path: str | None, overwrite: bool) -> None:
    """Refuses an --output_json that exists (without --overwrite) or cannot be written."""
    if not path:
        return
    if os.path.isdir(path):
        raise EvaluateError(f"--output_json={path} is a folder.")
    if os.path.exists(path) and not overwrite:
        raise EvaluateError(f"--output_json={path} already exists; pass --overwrite to replace "
                            "it, or choose another path.")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise EvaluateError(f"--output_json={path} cannot be written: {parent} is a file, not a "
                            "folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EvaluateError(f"--output_json={path} cannot be written: {parent} is not "
                            "writable.")


def load_queries(splits: dict):
    """The query split(s) as one `Examples`, and per query the split it came from."""
    import numpy as np

    from tfmir.data.datasets import concatenate

    parts = [splits[name] for name in _SPLITS.value]
    if any(part.class_names != parts[0].class_names for part in parts):
        raise EvaluateError("the query splits do not share their class names.")
    examples = parts[0] if len(parts) == 1 else concatenate(parts, separate_classes=False)
    origin = np.concatenate([[name] * len(splits[name]) for name in _SPLITS.value])
    return examples, origin


def embed_all(embed, examples, what: str):
    """Embeddings of `examples` in batches of --batch_size, or an EvaluateError."""
    import numpy as np

    batch_size = _BATCH_SIZE.value
    parts = []
    try:
        for start in range(0, len(examples), batch_size):
            rows = np.arange(start, min(start + batch_size, len(examples)))
            parts.append(embed(examples.subset(rows)))
    except Exception as error:  # a SavedModel raises InvalidArgumentError, a checkpoint others
        message = str(error).splitlines()[0] if str(error) else ""
        raise EvaluateError(f"could not embed the {what} with {embed.description}: "
                            f"{type(error).__name__}: {message}") from error
    logging.info("embedded %d %s", len(examples), what)
    return np.concatenate(parts)


def index_self_rows(index, queries) -> "np.ndarray":
    """Per query, the index row holding that very item (same path, or same source and id), or -1."""
    import numpy as np

    by_path = {path: row for row, path in enumerate(index.paths.tolist()) if path}
    by_id = {(source, str(item)): row for row, (source, item)
             in enumerate(zip(index.sources.tolist(), index.ids.tolist()))}
    rows = np.full(len(queries), -1, np.int64)
    for number, (source, item) in enumerate(zip(queries.sources.tolist(), queries.ids.tolist())):
        if queries.paths is not None:
            rows[number] = by_path.get(str(queries.paths[number]), -1)
            continue
        # `tfmir index` and `load_specs` prefix ids with "source/" when two parts repeat an id.
        prefix = f"{source}/"
        for candidate in (item, prefix + item, item[len(prefix):] if item.startswith(prefix)
                          else None):
            if candidate is not None and (source, candidate) in by_id:
                rows[number] = by_id[(source, candidate)]
                break
    return rows


def index_gallery(embed, names: list[str]):
    """(the loaded --index, its labels as codes into `names` (extended), description)."""
    import numpy as np

    from tfmir.serving.retrieval import SearchError, load_index

    try:
        index = load_index(_INDEX.value, embed.fingerprint, embed.preprocessing,
                           query_kind=embed.kind, model=embed.description)
    except SearchError as error:
        raise EvaluateError(str(error)) from error
    labels = index.labels.tolist()
    unlabelled = sum(label is None for label in labels)
    if unlabelled:
        raise EvaluateError(
            f"the index {_INDEX.value} has {unlabelled} of {len(labels)} items without a label "
            "(indexed from a folder without class sub-folders?): evaluation needs a labelled "
            "gallery. Rebuild the index from labelled data, or evaluate against "
            "--gallery_split.")
    labels = [str(label) for label in labels]
    data_classes = set(names)
    if not data_classes & set(labels):
        shown = sorted(set(labels))
        raise EvaluateError(
            f"none of the classes of --data ({', '.join(names)}) is a label of the index "
            f"{_INDEX.value} (its labels: {', '.join(shown[:10])}"
            f"{', ...' if len(shown) > 10 else ''}); evaluate with the --data the index was "
            "built from.")
    names.extend(sorted(set(labels) - data_classes))
    code = {name: number for number, name in enumerate(names)}
    description = {"from": "index", "directory": os.path.abspath(_INDEX.value),
                   "kind": index.kind, "metric": index.metric, "num_items": len(index)}
    return index, np.array([code[label] for label in labels], np.int64), description


def check_ks(ks: dict, gallery_size: int, excluding: bool) -> None:
    available = gallery_size - 1 if excluding else gallery_size
    for name, values in ks.items():
        if max(values) > available:
            less = ", less the query itself" if excluding else ""
            raise EvaluateError(f"--{name}={max(values)} is larger than the gallery "
                                f"({gallery_size} items{less}): give at most {available}.")


def choose_smallest_class(names: list[str], gallery_codes, query_codes, num_data_classes: int,
                          gallery_name: str):
    """(the RS class code, how it was chosen), or an EvaluateError when RS is undefined."""
    import numpy as np

    from tfmir.metrics import find_smallest_class

    if _SMALLEST_CLASS.value is not None:
        if _SMALLEST_CLASS.value not in names:
            raise EvaluateError(f"--smallest_class={_SMALLEST_CLASS.value} is not a class of the "
                                f"data: {', '.join(names)}")
        chosen, how = names.index(_SMALLEST_CLASS.value), "given (--smallest_class)"
    else:
        # Among the data's classes: an index may also hold other sources' classes.
        counted = gallery_codes[gallery_codes < num_data_classes]
        chosen, how = find_smallest_class(counted), f"the {gallery_name}'s smallest class"
    if not np.any(query_codes == chosen):
        raise EvaluateError(
            f"RS is undefined: the smallest class {names[chosen]!r} ({how}) has no item among "
            "the queries. Pass --smallest_class=NAME of a class the queries hold: "
            f"{', '.join(names[code] for code in np.unique(query_codes))}")
    return chosen, how


def evaluate() -> dict:
    ks = check_flags()  # before the imports below, which load TensorFlow
    import numpy as np

    from tfmir.data.specs import load_specs
    from tfmir.index import ExactIndex, HammingIndex, ScannIndex, sign_codes
    from tfmir.index.embedding import index_kind_for, load_embedding_function
    from tfmir.metrics import knn_classification, map_at_k, neighbor_rows, recall_at_k

    try:
        splits = load_specs(_DATA.value, data_dir=_DATA_DIR.value, download=_DOWNLOAD.value,
                            strict=_STRICT.value, seed=_SEED.value)
    except (ValueError, OSError) as error:
        raise EvaluateError(f"cannot load labelled data from --data: {error}") from error
    queries, origin = load_queries(splits)
    names = list(queries.class_names)
    num_data_classes = len(names)
    try:
        embed = load_embedding_function(_MODEL.value, resize_size=_RESIZE_SIZE.value,
                                        batch_size=_BATCH_SIZE.value)
    except ValueError as error:
        raise EvaluateError(f"cannot read --model: {error}") from error
    try:
        kind = index_kind_for(_KIND.value, embed)
    except ValueError as error:
        raise EvaluateError(str(error)) from error
    if kind == "auto":
        kind = "exact"
    if kind == "hamming" and _METRIC.present:
        raise EvaluateError(f"--metric does not apply to {embed.description}: "
                            f"{embed.describe_output()} is searched by Hamming distance.")

    if _INDEX.value is not None:
        index, gallery_codes, gallery = index_gallery(embed, names)
        exclude_rows = index_self_rows(index, queries)
        gallery_examples = None
    else:
        gallery_examples = splits[_GALLERY_SPLIT.value]
        if gallery_examples.class_names != queries.class_names:
            raise EvaluateError("the gallery split and the query splits do not share their "
                                "class names.")
        gallery_codes = gallery_examples.labels
        # Splits partition the data: only queries of the gallery split itself are in it.
        exclude_rows = np.full(len(queries), -1, np.int64)
        own = origin == _GALLERY_SPLIT.value
        exclude_rows[own] = np.arange(int(own.sum()))
        gallery = {"from": "split", "split": _GALLERY_SPLIT.value, "kind": kind,
                   "metric": "hamming" if kind == "hamming" else _METRIC.value,
                   "num_items": len(gallery_examples)}
        index = None
    excluding = bool(np.any(exclude_rows >= 0))
    check_ks(ks, gallery["num_items"], excluding)
    query_codes = queries.labels
    smallest, smallest_how = choose_smallest_class(
        names, gallery_codes, query_codes, num_data_classes,
        "index" if gallery["from"] == "index" else f"{_GALLERY_SPLIT.value} split")

    print(f"Embedding {len(queries)} queries ({'+'.join(_SPLITS.value)} of "
          f"{', '.join(_DATA.value)}) with {embed.description}")
    query_vectors = embed_all(embed, queries, "queries")
    if index is None:
        print(f"Embedding the gallery: {len(gallery_examples)} items of the "
              f"{_GALLERY_SPLIT.value} split")
        gallery_vectors = embed_all(embed, gallery_examples, "gallery items")
        identity = dict(dimension=gallery_vectors.shape[1], model_fingerprint=embed.fingerprint,
                        preprocessing=embed.preprocessing)
        if kind == "hamming":
            index = HammingIndex(**identity)
            gallery_vectors = sign_codes(gallery_vectors)
        else:
            index = (ExactIndex if kind == "exact" else ScannIndex)(metric=_METRIC.value,
                                                                    **identity)
        index.build(gallery_vectors, ids=np.arange(len(gallery_examples)))
    if index.kind == "hamming":
        query_vectors = sign_codes(query_vectors)  # as `tfmir search` makes query codes

    try:
        rows = neighbor_rows(index, query_vectors, max(ks["k"] + ks["map_k"]),
                             exclude_rows=exclude_rows)
        neighbor_codes = gallery_codes[rows]
        retrieval = {f"recall@{k}": recall_at_k(query_codes, neighbor_codes, k) for k in ks["k"]}
        retrieval.update({f"map@{k}": map_at_k(query_codes, neighbor_codes, k)
                          for k in ks["map_k"]})
        knn = {}
        for kp in ks["kp"]:
            scores = knn_classification(None, gallery_codes, query_vectors, query_codes, k=kp,
                                        index=index, smallest_class=smallest, class_names=names,
                                        exclude_rows=exclude_rows)
            knn[f"kp={kp}"] = {key: scores[key] for key in
                               ("accuracy", "mean_class_recall", "smallest_class_recall",
                                "class_recall")}
    except ValueError as error:  # e.g. the model's embeddings do not fit a given index
        raise EvaluateError(str(error)) from error

    query_counts = np.bincount(query_codes, minlength=len(names))
    gallery_counts = np.bincount(gallery_codes, minlength=len(names))
    num_in_gallery = int(np.sum(exclude_rows >= 0))
    return {
        "model": _MODEL.value,
        "model_fingerprint": embed.fingerprint,
        "data": list(_DATA.value),
        "query_splits": list(_SPLITS.value),
        "num_queries": len(queries),
        "gallery": gallery,
        "queries_in_gallery": num_in_gallery,
        "conventions": CONVENTIONS,
        "retrieval": retrieval,
        "knn": knn,
        "smallest_class": {"name": names[smallest], "chosen": smallest_how,
                           "gallery_items": int(gallery_counts[smallest]),
                           "queries": int(query_counts[smallest])},
        "classes": {name: {"queries": int(query_counts[code]),
                           "gallery_items": int(gallery_counts[code])}
                    for code, name in enumerate(names)
                    if query_counts[code] or gallery_counts[code]},
    }


def format_table(result: dict) -> str:
    """The results as plain-text tables (percentages)."""
    gallery = result["gallery"]
    num_in_gallery = result["queries_in_gallery"]
    exclusion = (f"{num_in_gallery} of the {result['num_queries']} queries are gallery items "
                 "themselves: each is left out of its own neighbours." if num_in_gallery else
                 "No query is a gallery item: none is left out of the neighbours.")
    where = (f"the {gallery['split']} split" if gallery["from"] == "split"
             else f"the index {gallery['directory']}")
    lines = [
        f"Queries: {result['num_queries']} ({'+'.join(result['query_splits'])} of "
        f"{', '.join(result['data'])}). Gallery: {where}, {gallery['num_items']} items "
        f"({gallery['kind']}, {gallery['metric']}).",
        f"Relevant = same class. {exclusion}",
        "mAP@k: R = relevant items in the top k (paper 002 eq. 3).",
        "",
        "Retrieval (%)",
    ]
    width = max(len(key) for key in result["retrieval"])
    lines += [f"  {key:<{width}}  {100 * value:6.1f}" for key, value in result["retrieval"].items()]
    smallest = result["smallest_class"]
    lines += ["", f"kNN classification (%): majority of Kp, ties to the nearest; RS = recall of "
                  f"{smallest['name']!r} ({smallest['chosen']}, {smallest['gallery_items']} "
                  "gallery items)",
              "  Kp      Acc     MCR      RS"]
    for key, scores in result["knn"].items():
        lines.append(f"  {key[3:]:<4} {100 * scores['accuracy']:6.1f}  "
                     f"{100 * scores['mean_class_recall']:6.1f}  "
                     f"{100 * scores['smallest_class_recall']:6.1f}")
    classes = [name for name, counts in result["classes"].items() if counts["queries"]]
    width = max(len("class"), *(len(name) for name in classes))
    header = "".join(f"  {'Kp=' + key[3:]:>6}" for key in result["knn"])
    lines += ["", "Recall per class (%)",
              f"  {'class':<{width}}  queries  gallery{header}"]
    for name in classes:
        counts = result["classes"][name]
        recalls = "".join(f"  {100 * scores['class_recall'][name]:6.1f}"
                          for scores in result["knn"].values())
        lines.append(f"  {name:<{width}}  {counts['queries']:7d}  {counts['gallery_items']:7d}"
                     f"{recalls}")
    return "\n".join(lines)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        result = evaluate()
        print(format_table(result))
        if _OUTPUT_JSON.value:
            from tfmir.files import write_json

            check_output_json(_OUTPUT_JSON.value, _OVERWRITE.value)  # it may have appeared since
            write_json(_OUTPUT_JSON.value, result)
            print(f"Wrote {_OUTPUT_JSON.value}")
    except OSError as error:  # full disk, or the folder changed since the first check
        raise SystemExit(f"tfmir evaluate: error: could not write {error.filename or 'output'}: "
                         f"{error.strerror or error}") from None
    except EvaluateError as error:
        raise SystemExit(f"tfmir evaluate: error: {error}") from None
