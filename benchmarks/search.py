"""Search speed and recall: exact search, ScaNN through tfmir and raw, Hamming codes, /search,
each beside its faiss anchor.

    python benchmarks/search.py                          # everything, 1M x 128 (~15 min, 2 cores)
    python benchmarks/search.py --sections=synthetic --num_items=100000 --num_queries=2000
    python benchmarks/search.py --sections=real,serve --model=runs/sample/best.keras
    python benchmarks/search.py --output_json=search.json

In one run (--sections picks a subset):

1. synthetic: --num_items unit vectors of --dimension (default 1,000,000 x 128): --num_clusters
   Gaussian cluster centres on the unit sphere plus --noise per coordinate, normalised; the
   --num_queries queries are drawn the same way, not taken from the database. Exact ground truth
   comes from `ExactIndex` (faiss brute force, ties in row order) over all queries, and is
   checked against a float64 NumPy brute force on --check_queries queries. Compared: `ExactIndex`
   and its anchor faiss `IndexFlatIP` (`IndexFlatL2` for l2) on the same stored vectors, timed
   interleaved on --exact_queries queries per call, with the ratio tfmir/faiss (target >= 1/1.5);
   `ScannIndex` in its automatic configuration (5 % of the tree's leaves searched) and two other
   settings (2 % of the leaves searched, and that with 2x the candidates reordered; when the data
   is small enough for brute force, forced asymmetric hashing and forced tree instead); raw ScaNN
   (`scann_ops_pybind.builder`) with the same settings, so the wrapper's overhead shows (target
   <= 10 %). Raw ScaNN is built once per
   distinct trained configuration; leaves searched and reorder size are search-time arguments
   (`leaves_to_search`, `pre_reorder_num_neighbors`), which is what a raw ScaNN user would pass.
   The approximate anchor is faiss `IndexHNSWFlat(dimension, --hnsw_m)` (L2 on the stored unit
   vectors for cosine, inner product for dot; efConstruction --hnsw_ef_construction), built once:
   its recall is measured at every efSearch of --hnsw_ef_search, and beside each ScannIndex setting
   (timed interleaved with it) runs the smallest efSearch whose recall is at least that setting's;
   the tfmir/faiss column is then ScannIndex / HNSW queries/s at comparable recall.
   Build time, queries/s and recall@10 = mean over queries of |ANN top-10 & exact top-10| / 10.
   Targets on a 2-core CPU: recall@10 >= 0.95 at >= 10,000 queries/s, build <= 60 s, and faster
   than HNSW at comparable recall.
2. real: embeddings of --data (default: the shipped sample) with --model (a `.keras` checkpoint
   from `tfmir train` / `tfmir demo`, resize side from the `config.json` next to it); without
   --model the `cpu` preset is trained as `tfmir demo` trains it (--train_epochs x --train_steps,
   8 x 100, about 2 minutes on 2 idle cores) in a temporary directory. Not shorter by default:
   after 50-200 steps the embeddings are still nearly collapsed (a query's cosine to most of the
   database is above 0.9), on which approximate-search recall says little. Database: train +
   val splits; queries: the test split. The same comparison as 1; the shipped sample is far
   below ScannIndex's brute-force threshold (20,000), so its automatic mode is brute force.
3. hamming: `HammingIndex` on --num_items random 64-bit codes against its anchor faiss
   `IndexBinaryFlat` (the same codes as bytes; default settings) and against `ExactIndex` (dot
   product) over the same items as 64-d float vectors of +-1 (dot = 64 - 2 x Hamming distance),
   --hamming_queries queries each, the three timed interleaved, with the ratio tfmir/faiss
   (target >= 1/1.5); correctness: the Hamming top-10 rows equal a NumPy brute force
   (np.unpackbits popcount, stable sort) on --check_queries queries, faiss's distances equal
   HammingIndex's, and the exact float top-10 scores equal 64 - 2 x the Hamming distances on
   every timed query.
4. serve: exports the real-data model (`tfmir.export.export_saved_model`), writes a `ScannIndex`
   directory of the real embeddings, starts `tfmir.serving.make_server` in a thread on a free
   port and sends --num_requests sequential `POST /search` requests (raw PNG bytes of test
   images, urllib, one connection per request); p50/p95 latency end to end (HTTP, decode, embed,
   search, JSON), next to in-process embedding of one PNG through the SavedModel's
   `serving_default` and in-process `Index.search` of one vector. Prints "skipped: tfmir.serving
   not available" when the package is missing.

Queries/s: all queries of a section in one batched call -- `ScannIndex.search_arrays` (ScaNN
`search_batched_parallel`, --search_batch_size queries per parallel batch, one thread per core) and
the same raw ScaNN call; `ExactIndex.search_arrays` and `HammingIndex.search_arrays` batch
internally; faiss indexes get the whole query array in one `search` call and use faiss's default
threads (OpenMP, one per core; nothing here changes them). Every figure is the median of --repeats
timed runs (`time.perf_counter`, after a warm-up); runs shorter than --min_run_seconds repeat the
call within the run. Builds are timed once. The machine may be shared: the CPU time other processes
took during each run is measured (from /proc/stat); a search run during which they used more than
--max_others cores is timed again (up to 3 x --repeats runs), and a figure without --repeats
undisturbed runs (or a build during which they did) is marked "(disturbed)". Prints a Markdown
table per section; --output_json gets every figure.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import io
import json
import math
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import faiss  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import measure  # noqa: E402  (benchmarks/measure.py, beside this script)
from tfmir.index import ExactIndex, HammingIndex, Index, ScannIndex  # noqa: E402

SECTIONS = ("synthetic", "real", "hamming", "serve")
TARGET_RECALL, TARGET_QPS, TARGET_BUILD_SECONDS, TARGET_OVERHEAD = 0.95, 10_000, 60.0, 0.10
# Exact and Hamming search must run at least at this fraction of their faiss anchor's speed.
TARGET_FAISS_RATIO = 1 / 1.5
# The faster tree variant: ScannIndex searches 5 % of the leaves by default.
FEWER_LEAVES_FRACTION = 0.02

_SECTIONS = flags.DEFINE_list("sections", list(SECTIONS), f"Sections to run, of {SECTIONS}.")
_NUM_ITEMS = flags.DEFINE_integer("num_items", 1_000_000,
                                  "Database size of the synthetic and Hamming sections.")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 10_000, "Queries of the synthetic section.")
_DIMENSION = flags.DEFINE_integer("dimension", 128, "Vector length of the synthetic section.")
_NUM_CLUSTERS = flags.DEFINE_integer("num_clusters", 2000, "Gaussian clusters of the synthetic "
                                     "data (centres uniform on the unit sphere).")
_NOISE = flags.DEFINE_float("noise", 0.1, "Standard deviation per coordinate of the noise added "
                            "to a unit-norm centre before normalising (0.1 at 128-d: a point's "
                            "cosine to its centre is about 0.66).")
_K = flags.DEFINE_integer("k", 10, "Neighbours per query (recall@k).")
_EXACT_QUERIES = flags.DEFINE_integer("exact_queries", 1000, "Queries in each timed run of exact "
                                      "search (ground truth always covers every query).")
_EXACT_BATCH_SIZE = flags.DEFINE_integer(
    "exact_batch_size", 1024, "ExactIndex batch_size (its default): queries whose ties reach past "
    "the first candidates are searched again with at most batch_size x N candidates at once.")
_CHECK_QUERIES = flags.DEFINE_integer("check_queries", 20, "Queries checked against a NumPy "
                                      "brute force (ground truth, Hamming).")
_SEARCH_BATCH_SIZE = flags.DEFINE_integer("search_batch_size", 256,
                                          "Queries per ScaNN search_batched_parallel batch.")
_HNSW_M = flags.DEFINE_integer("hnsw_m", 32, "M (neighbours per node) of the faiss HNSW anchor.")
_HNSW_EF_CONSTRUCTION = flags.DEFINE_integer("hnsw_ef_construction", 40,
                                             "efConstruction of the faiss HNSW anchor (faiss's "
                                             "default).")
_HNSW_EF_SEARCH = flags.DEFINE_list(
    "hnsw_ef_search",
    ["16", "24", "32", "48", "64", "96", "128", "192", "256", "384", "512", "768", "1024"],
    "efSearch values whose recall is measured (in increasing order, up to the first with recall "
    ">= 0.999); beside each ScannIndex setting runs the smallest one reaching its recall.")
_HAMMING_QUERIES = flags.DEFINE_integer("hamming_queries", 1000,
                                        "Queries of the Hamming section (both searches).")
_MODEL = flags.DEFINE_string("model", None, "`.keras` checkpoint for the real and serve sections "
                             "(e.g. demo_output/run/best.keras); default: train the cpu preset "
                             "briefly in a temporary directory.")
_DATA = flags.DEFINE_multi_string(
    "data", None, "Dataset spec(s) as for `tfmir train --data` (default: the shipped sample).")
_TRAIN_EPOCHS = flags.DEFINE_integer("train_epochs", 8, "Epochs of the cpu-preset training "
                                     "when --model is not given (8 x 100 steps: as tfmir demo).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 100, "Steps per epoch of that training.")
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", 200, "Timed POST /search requests.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per figure (the median is reported).")
_MIN_RUN_SECONDS = flags.DEFINE_float("min_run_seconds", 0.5, "Shorter searches are repeated "
                                      "within one timed run until it lasts this long.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic data, codes and training.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Also write every figure here.")


# --- Measuring --------------------------------------------------------------------------------

def _calibrated(function, min_seconds: float) -> tuple:
    """`function` repeated enough times that one run lasts about min_seconds; (run, calls).

    Calls it once as a warm-up (tracing, caches) and, when that was quicker than min_seconds,
    once more to size the run; neither call is a timed run.
    """
    start = time.perf_counter()
    function()
    seconds = time.perf_counter() - start
    if seconds < min_seconds:
        start = time.perf_counter()
        function()
        seconds = time.perf_counter() - start
    calls = max(1, math.ceil(min_seconds / max(seconds, 1e-9)))

    def run():
        for _ in range(calls):
            function()
    return run, calls


def _timed_build(function) -> tuple[dict, object]:
    timing, value = measure.timed(function)
    # /proc/stat counts clock ticks (10 ms): over a shorter build others' load is noise.
    measurable = timing.seconds >= 0.5
    return {"seconds": timing.seconds, "others_cores": timing.others if measurable else None,
            "own_cores": timing.own if measurable else None,
            "disturbed": measurable and timing.others > measure.max_others()}, value


def _free() -> None:
    gc.collect()


# --- Searching --------------------------------------------------------------------------------

def recall_at_k(rows: np.ndarray, exact_rows: np.ndarray) -> float:
    """Mean over queries of |rows & exact_rows| / k (sets, so order and ties do not matter)."""
    k = exact_rows.shape[1]
    return float(np.mean([len(set(found) & set(exact)) / k
                          for found, exact in zip(rows.tolist(), exact_rows.tolist())]))


def _scann_ops():
    from scann.scann_ops.py import scann_ops_pybind

    return scann_ops_pybind


def _scann_version() -> str:
    try:
        return importlib.metadata.version("scann")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _faiss_version() -> str:
    return importlib.metadata.version("faiss-cpu")


def faiss_flat(data: np.ndarray, metric: str):
    """faiss brute force over `data` (as ExactIndex stores it): IndexFlatIP or IndexFlatL2."""
    index = (faiss.IndexFlatL2 if metric == "l2" else faiss.IndexFlatIP)(data.shape[1])
    index.add(data)
    return index


def faiss_hnsw(data: np.ndarray, metric: str):
    """faiss IndexHNSWFlat(dimension, --hnsw_m) over `data`.

    L2 (faiss's default) for cosine too: on the stored unit vectors it ranks as the inner product
    does. Only "dot" needs the inner product.
    """
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "dot" else faiss.METRIC_L2
    index = faiss.IndexHNSWFlat(data.shape[1], _HNSW_M.value, faiss_metric)
    index.hnsw.efConstruction = _HNSW_EF_CONSTRUCTION.value
    index.add(data)
    return index


def matched_ef_search(recalls: dict, recall: float) -> int:
    """The smallest efSearch whose recall is at least `recall`, else the one with the best."""
    reaching = [ef for ef, value in sorted(recalls.items()) if value >= recall]
    return reaching[0] if reaching else max(recalls, key=recalls.get)


def reorder_size(settings: dict, k: int, num_items: int) -> int:
    """Candidates rescored exactly, as ScannIndex documents it: max(multiplier k, minimum) <= n."""
    wanted = max(settings["reorder_multiplier"] * k, settings["min_reorder_num_neighbors"])
    return int(max(k, min(wanted, num_items)))


def raw_scann_searcher(data: np.ndarray, plan: dict, settings: dict, metric: str):
    """The ScaNN searcher ScannIndex's documentation describes for `plan`, built without tfmir.

    `data` must already be what ScannIndex stores (unit rows for cosine).
    """
    distance = "squared_l2" if metric == "l2" else "dot_product"
    builder = _scann_ops().builder(data, 10, distance)
    if settings["training_threads"]:
        builder = builder.set_n_training_threads(settings["training_threads"])
    if plan["mode"] == "tree":
        builder = builder.tree(num_leaves=plan["num_leaves"],
                               num_leaves_to_search=plan["num_leaves_to_search"],
                               training_sample_size=plan["training_sample_size"],
                               spherical=plan["spherical"])
    if plan["mode"] == "brute_force":
        builder = builder.score_brute_force()
    else:
        threshold = settings["anisotropic_quantization_threshold"]
        if distance != "dot_product" or threshold is None:
            threshold = float("nan")
        builder = builder.score_ah(settings["dimensions_per_block"],
                                   anisotropic_quantization_threshold=threshold,
                                   training_sample_size=plan["training_sample_size"])
        builder = builder.reorder(reorder_size(settings, 10, data.shape[0]))
    searcher = builder.build()
    if settings["search_threads"]:
        searcher.set_num_threads(settings["search_threads"])
    return searcher


def _raw_key(plan: dict) -> tuple:
    """What a raw searcher is trained with; the rest of a plan is chosen at search time."""
    return tuple(plan.get(name) for name in ("mode", "num_leaves", "training_sample_size",
                                              "spherical"))


def _describe_plan(plan: dict, settings: dict, k: int) -> str:
    if plan["mode"] == "brute_force":
        return "brute force"
    reorder = reorder_size(settings, k, plan["trained_count"])
    hashing = f"AH {settings['dimensions_per_block']} dims/block, reorder {reorder}"
    if plan["mode"] == "tree":
        return (f"tree {plan['num_leaves']} leaves, {plan['num_leaves_to_search']} searched, "
                f"trained on {plan['training_sample_size']}; {hashing}")
    return hashing


def scann_variants(num_items: int, dimension: int, metric: str, k: int) -> list[tuple[str, dict]]:
    """ScannIndex settings compared: automatic, then two others that change its trade-off.

    Tree: FEWER_LEAVES_FRACTION of the leaves searched (faster), and that with 2x the candidates
    reordered (more accurate); hashing: 2x reorder; brute force: the approximate modes forced.
    """
    base = {"search_batch_size": _SEARCH_BATCH_SIZE.value}
    probe = ScannIndex(metric=metric, dimension=dimension, **base)
    plan = probe.plan_for(num_items)
    variants = [("automatic", base)]
    if plan["mode"] == "brute_force":
        # Too small for ScaNN's approximate paths by its rules; show them anyway.
        return variants + [("forced asymmetric hashing", {**base, "mode": "asymmetric_hashing"}),
                           ("forced tree", {**base, "mode": "tree"})]
    larger_reorder = {"min_reorder_num_neighbors": 2 * reorder_size(probe.settings, k, num_items),
                      "reorder_multiplier": probe.settings["reorder_multiplier"]}
    if plan["mode"] == "asymmetric_hashing":
        return variants + [("2x reorder", {**base, **larger_reorder})]
    fewer = {"leaves_to_search_fraction": FEWER_LEAVES_FRACTION}
    percent = f"{100 * FEWER_LEAVES_FRACTION:g} % of leaves searched"
    return variants + [(percent, {**base, **fewer}),
                       (f"{percent}, 2x reorder", {**base, **fewer, **larger_reorder})]


def compare_indexes(database: np.ndarray, queries: np.ndarray, *, metric: str, k: int,
                    repeats: int, exact_queries: int, check_queries: int, label: str) -> dict:
    """Exact search, ScannIndex variants, raw ScaNN and the faiss anchors on one database.

    See the module docstring.
    """
    num_items, dimension = database.shape
    result = {"num_items": num_items, "num_queries": len(queries), "dimension": dimension,
              "metric": metric, "k": k, "rows": []}
    # What the indexes store and search with (unit rows for cosine), for faiss and raw ScaNN.
    stored = database / np.maximum(np.linalg.norm(database, axis=1, keepdims=True),
                                   np.finfo(np.float32).tiny) if metric == "cosine" else database
    stored = np.ascontiguousarray(stored, dtype=np.float32)
    raw_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True) \
        if metric == "cosine" else queries
    raw_queries = np.ascontiguousarray(raw_queries, dtype=np.float32)

    # Exact search: the reference, and the ground truth of every query.
    build, exact = _timed_build(lambda: ExactIndex(
        metric=metric, dimension=dimension, batch_size=_EXACT_BATCH_SIZE.value).build(
            database, ids=np.arange(num_items)))
    truth_timing, (truth_scores, truth_rows) = measure.timed(lambda: exact.search_arrays(queries, k))
    print(f"  [{label}] exact ground truth of {len(queries)} queries in "
          f"{truth_timing.seconds:.1f} s ({len(queries) / truth_timing.seconds:.0f} queries/s, "
          f"others {truth_timing.others:.2f} cores; {measure.load_average()})", flush=True)
    result["ground_truth"] = {"seconds": truth_timing.seconds,
                              "queries_per_second": len(queries) / truth_timing.seconds,
                              "others_cores": truth_timing.others,
                              "mean_top1_score": float(truth_scores[:, 0].mean()),
                              "mean_topk_score": float(truth_scores[:, -1].mean())}
    result["ground_truth"]["numpy_check"] = check_ground_truth(
        database, queries[:check_queries], truth_rows[:check_queries], metric, k)

    # ExactIndex and faiss's flat index, timed interleaved on the same queries.
    flat_build, flat = _timed_build(lambda: faiss_flat(stored, metric))
    flat_name = f"faiss {type(flat).__name__}"
    subset, raw_subset = queries[:exact_queries], raw_queries[:exact_queries]
    flat_recall = recall_at_k(flat.search(raw_subset, k)[1], truth_rows[:exact_queries])
    run, calls = _calibrated(lambda: exact.search_arrays(subset, k), _MIN_RUN_SECONDS.value)
    flat_run, flat_calls = _calibrated(lambda: flat.search(raw_subset, k), _MIN_RUN_SECONDS.value)
    timings = measure.round_robin({"exact": run, "faiss": flat_run}, repeats)
    figure = measure.summary(timings["exact"], calls * len(subset), "queries/s", repeats)
    flat_figure = measure.summary(timings["faiss"], flat_calls * len(subset), "queries/s", repeats)
    result["rows"].append({"method": "exact", "name": "ExactIndex",
                           "settings": f"batch_size {_EXACT_BATCH_SIZE.value}, "
                                       f"{len(subset)} queries per call",
                           "build": build, "qps": figure, "recall": 1.0,
                           "faiss_ratio": figure["median"] / flat_figure["median"]})
    result["rows"].append({"method": "faiss_flat", "name": flat_name,
                           "settings": f"brute force, {len(subset)} queries per call",
                           "build": flat_build, "qps": flat_figure, "recall": flat_recall})
    print(f"  [{label}] ExactIndex: {figure['median']:.0f} queries/s, {flat_name}: "
          f"{flat_figure['median']:.0f} queries/s, ratio "
          f"{figure['median'] / flat_figure['median']:.2f} ({measure.load_average()})", flush=True)
    del exact, run, flat, flat_run
    _free()

    # faiss HNSW, the approximate anchor: built once, its recall measured at every efSearch.
    hnsw_build, hnsw = _timed_build(lambda: faiss_hnsw(stored, metric))
    hnsw_recalls = {}
    for ef_search in sorted(int(value) for value in _HNSW_EF_SEARCH.value):
        parameters = faiss.SearchParametersHNSW(efSearch=ef_search)
        hnsw_recalls[ef_search] = recall_at_k(hnsw.search(raw_queries, k, params=parameters)[1],
                                              truth_rows)
        if hnsw_recalls[ef_search] >= 0.999:
            break
    result["hnsw"] = {"m": _HNSW_M.value, "ef_construction": _HNSW_EF_CONSTRUCTION.value,
                      "build": hnsw_build, "recall_by_ef_search": hnsw_recalls}
    print(f"  [{label}] faiss HNSW{_HNSW_M.value}: build {hnsw_build['seconds']:.1f} s; "
          f"recall@{k} by efSearch: "
          + ", ".join(f"{ef} {value:.4f}" for ef, value in hnsw_recalls.items())
          + f" ({measure.load_average()})", flush=True)

    # ScaNN: the wrapper, raw ScaNN trained the same way and HNSW at comparable recall, timed
    # interleaved.
    raw_searchers, raw_builds = {}, {}
    hnsw_build_shown = False
    for name, settings in scann_variants(num_items, dimension, metric, k):
        build, index = _timed_build(lambda: ScannIndex(
            metric=metric, dimension=dimension, **settings).build(database,
                                                                   ids=np.arange(num_items)))
        plan, settings = index.plan, index.settings
        key = _raw_key(plan)
        if key not in raw_searchers:
            raw_builds[key], raw_searchers[key] = _timed_build(
                lambda: raw_scann_searcher(stored, plan, settings, metric))
            raw_build = raw_builds[key]
        else:
            raw_build = None  # trained above; this variant only changes search-time arguments
        searcher = raw_searchers[key]
        raw_arguments = {"final_num_neighbors": k, "batch_size": settings["search_batch_size"]}
        if plan["mode"] != "brute_force":
            raw_arguments["pre_reorder_num_neighbors"] = reorder_size(settings, k, num_items)
        if plan["mode"] == "tree":
            raw_arguments["leaves_to_search"] = plan["num_leaves_to_search"]

        def wrapped(index=index):
            return index.search_arrays(queries, k)

        def raw(searcher=searcher, arguments=raw_arguments):
            return searcher.search_batched_parallel(raw_queries, **arguments)

        wrapped_rows = wrapped()[1]
        raw_rows = np.asarray(raw()[0], dtype=np.int64)
        wrapped_recall = recall_at_k(wrapped_rows, truth_rows)
        raw_recall = recall_at_k(raw_rows, truth_rows)
        ef_search = matched_ef_search(hnsw_recalls, wrapped_recall)
        parameters = faiss.SearchParametersHNSW(efSearch=ef_search)

        def hnsw_search(parameters=parameters):
            return hnsw.search(raw_queries, k, params=parameters)

        wrapped_run, wrapped_calls = _calibrated(wrapped, _MIN_RUN_SECONDS.value)
        raw_run, raw_calls = _calibrated(raw, _MIN_RUN_SECONDS.value)
        hnsw_run, hnsw_calls = _calibrated(hnsw_search, _MIN_RUN_SECONDS.value)
        timings = measure.round_robin({"wrapper": wrapped_run, "raw": raw_run,
                                       "hnsw": hnsw_run}, repeats)
        wrapped_figure = measure.summary(timings["wrapper"], wrapped_calls * len(queries), "queries/s",
                                  repeats)
        raw_figure = measure.summary(timings["raw"], raw_calls * len(queries), "queries/s", repeats)
        hnsw_figure = measure.summary(timings["hnsw"], hnsw_calls * len(queries), "queries/s",
                                      repeats)
        description = _describe_plan(plan, settings, k)
        result["rows"].append({"method": "scann", "name": f"ScannIndex, {name}",
                               "variant": name, "settings": description, "plan": plan,
                               "build": build, "qps": wrapped_figure, "recall": wrapped_recall,
                               "faiss_ratio": wrapped_figure["median"] / hnsw_figure["median"]})
        result["rows"].append({"method": "raw_scann", "name": f"raw ScaNN, {name}",
                               "variant": name, "settings": description, "build": raw_build,
                               "qps": raw_figure, "recall": raw_recall,
                               "search_overhead": 1 - wrapped_figure["median"]
                               / raw_figure["median"],
                               # Not for sub-second builds: fixed costs dominate there.
                               "build_overhead": (build["seconds"] / raw_build["seconds"] - 1
                                                  if raw_build and raw_build["seconds"] >= 1
                                                  else None)})
        result["rows"].append({"method": "faiss_hnsw",
                               "name": f"faiss HNSW{_HNSW_M.value}, beside {name}",
                               "variant": name,
                               "settings": f"IndexHNSWFlat({dimension}, {_HNSW_M.value}"
                                           + (", inner product" if metric == "dot" else "")
                                           + f"), efConstruction {_HNSW_EF_CONSTRUCTION.value}, "
                                           f"efSearch {ef_search}",
                               "ef_search": ef_search,
                               "build": None if hnsw_build_shown else hnsw_build,
                               "qps": hnsw_figure, "recall": hnsw_recalls[ef_search]})
        hnsw_build_shown = True
        print(f"  [{label}] ScannIndex {name} ({description}): build {build['seconds']:.1f} s, "
              f"{wrapped_figure['median']:.0f} queries/s, recall@{k} {wrapped_recall:.4f}; raw "
              f"ScaNN: {raw_figure['median']:.0f} queries/s, recall@{k} {raw_recall:.4f}"
              + (f", build {raw_build['seconds']:.1f} s" if raw_build else "")
              + f"; HNSW efSearch {ef_search}: {hnsw_figure['median']:.0f} queries/s, recall@{k} "
              f"{hnsw_recalls[ef_search]:.4f} ({measure.load_average()})", flush=True)
        del index, wrapped, wrapped_run, searcher, raw, raw_run, hnsw_run
        _free()
    raw_searchers.clear()
    del hnsw
    _free()
    return result


def check_ground_truth(database, queries, truth_rows, metric: str, k: int) -> dict:
    """Float64 NumPy brute force on a few queries: agreement with the exact top-k as sets.

    A query whose k-th and (k+1)-th float64 scores are within 1e-6 is a tie and counted apart.
    """
    agree, ties = 0, 0
    for query, rows in zip(np.asarray(queries, np.float64), truth_rows):
        scores = np.empty(len(database))
        for start in range(0, len(database), 262_144):  # bounded float64 temporaries
            block = np.asarray(database[start:start + 262_144], np.float64)
            if metric == "cosine":
                scores[start:start + len(block)] = block @ query / (
                    np.linalg.norm(block, axis=1) * np.linalg.norm(query))
            elif metric == "dot":
                scores[start:start + len(block)] = block @ query
            else:
                scores[start:start + len(block)] = -np.linalg.norm(block - query, axis=1)
        order = np.argsort(-scores, kind="stable")[:k + 1]
        if set(order[:k].tolist()) == set(rows.tolist()):
            agree += 1
        elif len(order) > k and scores[order[k - 1]] - scores[order[k]] < 1e-6:
            ties += 1
    return {"queries": len(queries), "agree": agree, "ties": ties}


# --- Sections ---------------------------------------------------------------------------------

def clustered_unit_vectors(count: int, centres: np.ndarray, noise: float,
                           rng: np.random.Generator) -> np.ndarray:
    """`count` points: a random centre plus Gaussian noise, normalised; built in blocks."""
    vectors = np.empty((count, centres.shape[1]), np.float32)
    for start in range(0, count, 65_536):
        stop = min(start + 65_536, count)
        block = centres[rng.integers(0, len(centres), stop - start)]
        block += noise * rng.standard_normal(block.shape, dtype=np.float32)
        vectors[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return vectors


def run_synthetic() -> dict:
    rng = np.random.default_rng(_SEED.value)
    centres = rng.standard_normal((_NUM_CLUSTERS.value, _DIMENSION.value), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    start = time.perf_counter()
    database = clustered_unit_vectors(_NUM_ITEMS.value, centres, _NOISE.value, rng)
    queries = clustered_unit_vectors(_NUM_QUERIES.value, centres, _NOISE.value, rng)
    print(f"synthetic: {len(database)} x {database.shape[1]} items, {len(queries)} queries, "
          f"{len(centres)} clusters, noise {_NOISE.value} (made in "
          f"{time.perf_counter() - start:.1f} s)", flush=True)
    result = compare_indexes(database, queries, metric="cosine", k=_K.value,
                             repeats=_REPEATS.value, exact_queries=_EXACT_QUERIES.value,
                             check_queries=_CHECK_QUERIES.value, label="synthetic")
    result["data"] = {"num_clusters": _NUM_CLUSTERS.value, "noise": _NOISE.value,
                      "seed": _SEED.value}
    return result


@dataclasses.dataclass
class RealData:
    """The model and the embeddings the real and serve sections share."""

    model: keras.Model
    model_path: str
    resize_size: int
    database: object  # tfmir.data.Examples (train + val)
    queries: object  # tfmir.data.Examples (test)
    database_vectors: np.ndarray
    query_vectors: np.ndarray
    note: str
    embed_images_per_second: float


def prepare_real(workdir: str) -> RealData:
    from tfmir.data import concatenate
    from tfmir.training import embed_examples, train_embedder

    if _DATA.value:
        from tfmir.data.specs import load_specs

        splits = load_specs(_DATA.value, seed=_SEED.value)
    else:
        from tfmir.samples import load_sample

        splits = load_sample()
    if _MODEL.value:
        import tfmir.models  # noqa: F401  (registers tfmir's Keras classes for loading)
        from tfmir.index.embedding import read_resize_size

        model_path = _MODEL.value
        model = keras.saving.load_model(model_path)
        resize_size = read_resize_size(model_path)
        note = f"model {os.path.basename(model_path)} (given)"
    else:
        print(f"real: no --model given: training the cpu preset for {_TRAIN_EPOCHS.value} x "
              f"{_TRAIN_STEPS.value} steps in a temporary directory", flush=True)
        start = time.perf_counter()
        run = train_embedder(splits["train"], splits["val"], workdir=os.path.join(workdir, "run"),
                             preset="cpu", epochs=_TRAIN_EPOCHS.value,
                             steps_per_epoch=_TRAIN_STEPS.value, sampling="class",
                             seed=_SEED.value, verbose=0)
        model, resize_size = run.model, run.resize_size
        model_path = str(run.final_path)
        note = (f"cpu preset trained {_TRAIN_EPOCHS.value} x {_TRAIN_STEPS.value} steps here "
                f"({time.perf_counter() - start:.0f} s), no --model given")
    database = concatenate([splits["train"], splits["val"]], separate_classes=False)
    queries = splits["test"]
    start = time.perf_counter()
    database_vectors = embed_examples(model, database, resize_size=resize_size)
    query_vectors = embed_examples(model, queries, resize_size=resize_size)
    seconds = time.perf_counter() - start
    print(f"real: embedded {len(database)} database + {len(queries)} query images "
          f"({', '.join(database.source_names)}) in {seconds:.1f} s, dimension "
          f"{database_vectors.shape[1]}; {note}", flush=True)
    return RealData(model, model_path, resize_size, database, queries, database_vectors,
                    query_vectors, note, (len(database) + len(queries)) / seconds)


def run_real(real: RealData) -> dict:
    result = compare_indexes(real.database_vectors, real.query_vectors, metric="cosine",
                             k=_K.value, repeats=_REPEATS.value,
                             exact_queries=len(real.query_vectors),
                             check_queries=_CHECK_QUERIES.value, label="real")
    result["data"] = {"specs": _DATA.value or ["sample"], "database": "train + val",
                      "queries": "test", "sources": list(real.database.source_names),
                      "model": real.note, "embed_images_per_second": real.embed_images_per_second}
    return result


def popcount_brute_force(codes: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Top-k rows by Hamming distance, counting bits with np.unpackbits; ties by row."""
    differing = np.bitwise_xor(codes, query[None, :])
    distances = np.unpackbits(differing.view(np.uint8), axis=1).sum(axis=1)
    return np.argsort(distances, kind="stable")[:k]


def run_hamming() -> dict:
    num_bits, k = 64, _K.value
    rng = np.random.default_rng(_SEED.value + 1)
    maximum = np.iinfo(np.uint64).max
    codes = rng.integers(0, maximum, size=(_NUM_ITEMS.value, 1), dtype=np.uint64, endpoint=True)
    queries = rng.integers(0, maximum, size=(_HAMMING_QUERIES.value, 1), dtype=np.uint64,
                           endpoint=True)

    def as_signs(words):
        # The same bit order as pack_bits: bytes of the little-endian word, MSB first.
        bits = np.unpackbits(np.ascontiguousarray(words, "<u8").view(np.uint8), axis=1)
        return bits.astype(np.float32) * 2 - 1

    print(f"hamming: {len(codes)} random {num_bits}-bit codes, {len(queries)} queries", flush=True)
    hamming_build, hamming = _timed_build(
        lambda: HammingIndex(dimension=num_bits).build(codes, ids=np.arange(len(codes))))
    float_vectors = np.empty((len(codes), num_bits), np.float32)
    for start in range(0, len(codes), 262_144):
        float_vectors[start:start + 262_144] = as_signs(codes[start:start + 262_144])
    exact_build, exact = _timed_build(lambda: ExactIndex(
        metric="dot", dimension=num_bits, batch_size=_EXACT_BATCH_SIZE.value).build(
            float_vectors, ids=np.arange(len(codes))))
    del float_vectors
    _free()
    float_queries = as_signs(queries)

    def binary_flat():
        index = faiss.IndexBinaryFlat(num_bits)
        index.add(codes.view(np.uint8))  # the same bytes HammingIndex searches
        return index

    binary_build, binary = _timed_build(binary_flat)
    query_bytes = np.ascontiguousarray(queries).view(np.uint8)

    hamming_scores, hamming_rows = hamming.search_arrays(queries, k)
    binary_distances, binary_rows = binary.search(query_bytes, k)
    exact_scores, _ = exact.search_arrays(float_queries, k)
    checked = min(_CHECK_QUERIES.value, len(queries))
    rows_equal = sum(np.array_equal(hamming_rows[i], popcount_brute_force(codes, queries[i], k))
                     for i in range(checked))
    # dot of +-1 vectors = bits - 2 x Hamming distance; the k-th best scores must agree.
    scores_equal = int(np.sum(np.all(exact_scores == num_bits - 2 * hamming_scores, axis=1)))
    faiss_equal = int(np.sum(np.all(binary_distances == hamming_scores, axis=1)))

    hamming_run, hamming_calls = _calibrated(lambda: hamming.search_arrays(queries, k),
                                             _MIN_RUN_SECONDS.value)
    binary_run, binary_calls = _calibrated(lambda: binary.search(query_bytes, k),
                                           _MIN_RUN_SECONDS.value)
    exact_run, exact_calls = _calibrated(lambda: exact.search_arrays(float_queries, k),
                                         _MIN_RUN_SECONDS.value)
    timings = measure.round_robin({"hamming": hamming_run, "faiss": binary_run,
                                   "exact": exact_run}, _REPEATS.value)
    hamming_figure = measure.summary(timings["hamming"], hamming_calls * len(queries), "queries/s",
                                     _REPEATS.value)
    binary_figure = measure.summary(timings["faiss"], binary_calls * len(queries), "queries/s",
                                    _REPEATS.value)
    result = {
        "num_items": len(codes), "num_queries": len(queries), "num_bits": num_bits, "k": k,
        "hamming": {"build": hamming_build, "qps": hamming_figure,
                    "batch_size": hamming.settings["batch_size"] or "all queries",
                    "faiss_ratio": hamming_figure["median"] / binary_figure["median"]},
        "faiss_binary": {"build": binary_build, "qps": binary_figure},
        "exact_float": {"build": exact_build, "qps": measure.summary(
            timings["exact"], exact_calls * len(queries), "queries/s", _REPEATS.value),
            "batch_size": _EXACT_BATCH_SIZE.value},
        "correctness": {"checked_queries": checked, "rows_equal_numpy": int(rows_equal),
                        "faiss_distances_equal": faiss_equal,
                        "faiss_rows_equal": int(np.sum(np.all(binary_rows == hamming_rows,
                                                              axis=1))),
                        "float_scores_equal_hamming": scores_equal,
                        "float_queries": len(queries)},
    }
    print(f"  hamming: HammingIndex {hamming_figure['median']:.0f} queries/s, faiss "
          f"IndexBinaryFlat {binary_figure['median']:.0f} queries/s (ratio "
          f"{result['hamming']['faiss_ratio']:.2f}), exact float "
          f"{result['exact_float']['qps']['median']:.0f} queries/s ({measure.load_average()})",
          flush=True)
    return result


def _png_bytes(examples, position: int) -> tuple[bytes, str]:
    from PIL import Image

    if examples.in_memory:
        buffer = io.BytesIO()
        Image.fromarray(examples.images[position]).save(buffer, format="PNG")
        return buffer.getvalue(), "image/png"
    with open(examples.paths[position], "rb") as stream:
        contents = stream.read()
    if contents.startswith(b"\x89PNG\r\n\x1a\n"):
        return contents, "image/png"
    if contents.startswith(b"\xff\xd8\xff"):
        return contents, "image/jpeg"
    with Image.open(io.BytesIO(contents)) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue(), "image/png"


def _latency(seconds: list[float], timing: measure.Timing) -> dict:
    milliseconds = 1000 * np.asarray(seconds)
    return {"count": len(seconds), "p50_ms": float(np.percentile(milliseconds, 50)),
            "p95_ms": float(np.percentile(milliseconds, 95)),
            "mean_ms": float(milliseconds.mean()), "max_ms": float(milliseconds.max()),
            "others_cores": timing.others, "disturbed": timing.others > measure.max_others()}


def run_serve(real: RealData, workdir: str) -> dict:
    try:
        from tfmir.serving import make_server
    except ImportError as error:
        print(f"serve: skipped: tfmir.serving not available ({error})", flush=True)
        return {"skipped": "tfmir.serving not available"}
    from tfmir.export import export_saved_model, read_export_info

    export_path = export_saved_model(real.model, os.path.join(workdir, "export", "1"),
                                     resize_size=real.resize_size)
    fingerprint = read_export_info(export_path)["model_fingerprint"]
    database = real.database
    index_directory = os.path.join(workdir, "index")
    ScannIndex(metric="cosine", dimension=real.database_vectors.shape[1],
               model_fingerprint=fingerprint).build(
        real.database_vectors, ids=database.ids.tolist(),
        labels=[database.class_names[label] for label in database.labels],
        sources=database.sources.tolist(),
        paths=database.paths.tolist() if database.paths is not None else None,
    ).save(index_directory)
    count = _NUM_REQUESTS.value
    images = [_png_bytes(real.queries, position % len(real.queries)) for position in range(count)]
    k = _K.value

    server = make_server(index_directory, export_path, port=0, k=k)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    url = f"http://{host}:{port}/search?k={k}"
    errors = []

    def post(body: bytes, content_type: str) -> None:
        request = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = json.loads(response.read())
            if len(answer.get("results", [])) != k:
                errors.append(f"{len(answer.get('results', []))} results")
        except urllib.error.HTTPError as error:
            errors.append(f"HTTP {error.code}: {error.read()[:200]!r}")

    try:
        for body, content_type in images[:5]:  # warm-up: the first calls trace
            post(body, content_type)
        errors.clear()
        latencies = []

        def requests():
            for body, content_type in images:
                start = time.perf_counter()
                post(body, content_type)
                latencies.append(time.perf_counter() - start)

        timing, _ = measure.timed(requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    end_to_end = _latency(latencies, timing)
    end_to_end["errors"] = len(errors)
    end_to_end["first_error"] = errors[0] if errors else None
    print(f"  serve: POST /search p50 {end_to_end['p50_ms']:.1f} ms, p95 "
          f"{end_to_end['p95_ms']:.1f} ms, {len(errors)} errors ({measure.load_average()})", flush=True)

    # In process: the SavedModel on one PNG (what serving does per request), and one search.
    signature = tf.saved_model.load(export_path).signatures["serving_default"]
    embed_seconds = []

    def embed_all():
        for body, _ in images:
            start = time.perf_counter()
            signature(images=tf.constant([body]))
            embed_seconds.append(time.perf_counter() - start)

    for body, _ in images[:5]:
        signature(images=tf.constant([body]))
    embed_timing, _ = measure.timed(embed_all)
    index = Index.load(index_directory)
    vectors = real.query_vectors
    search_seconds = []

    def search_all():
        for position in range(count):
            start = time.perf_counter()
            index.search(vectors[position % len(vectors)], k)
            search_seconds.append(time.perf_counter() - start)

    for position in range(5):
        index.search(vectors[position], k)
    search_timing, _ = measure.timed(search_all)
    return {"num_requests": count, "k": k, "index": f"{index.kind}, {index.plan['mode']}, "
            f"{len(index)} items", "client": "urllib, sequential, one connection per request",
            "end_to_end": end_to_end, "embed_only": _latency(embed_seconds, embed_timing),
            "search_only": _latency(search_seconds, search_timing)}


# --- Report -----------------------------------------------------------------------------------

def _rate(figure: dict | None) -> str:
    if figure is None:
        return "—"
    mark = " (disturbed)" if figure.get("disturbed") else ""
    return f"{figure['median']:,.0f} [{figure['min']:,.0f}–{figure['max']:,.0f}]{mark}"


def _build(build: dict | None) -> str:
    if build is None:
        return "(same searcher)"
    mark = " (disturbed)" if build["disturbed"] else ""
    digits = 1 if build["seconds"] >= 10 else 2
    return f"{build['seconds']:.{digits}f}{mark}"


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:+.1f} %"


def _ratio(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def index_table(result: dict) -> str:
    """One row per method; tfmir / faiss: ExactIndex over IndexFlat*, ScannIndex over the HNSW
    row below it (comparable recall)."""
    k = result["k"]
    lines = [f"| method | configuration | build (s) | queries/s, median [min–max] | recall@{k} "
             "| tfmir / faiss | wrapper overhead: search / build | others (cores) |",
             "|---" * 8 + "|"]
    for row in result["rows"]:
        overhead = "—"
        if row["method"] == "raw_scann":
            overhead = f"{_percent(row['search_overhead'])} / {_percent(row['build_overhead'])}"
        build = _build(row["build"])
        others = max([row["qps"]["others_cores"]]
                     + ([row["build"]["others_cores"]]
                        if row["build"] and row["build"]["others_cores"] is not None else []))
        lines.append(f"| {row['name']} | {row['settings']} | {build} | {_rate(row['qps'])} | "
                     f"{row['recall']:.4f} | {_ratio(row.get('faiss_ratio'))} | {overhead} | "
                     f"{others:.2f} |")
    return "\n".join(lines)


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def targets_lines(result: dict) -> list[str]:
    """ExactIndex against faiss, and per ScannIndex configuration: which targets it meets."""
    lines = []
    for row in result["rows"]:
        if row["method"] == "exact":
            ratio = row["faiss_ratio"]
            lines.append(f"- ExactIndex / faiss flat: {ratio:.2f} >= {TARGET_FAISS_RATIO:.2f} "
                         f"{_met(ratio >= TARGET_FAISS_RATIO)}")
    raw = {row["variant"]: row for row in result["rows"] if row["method"] == "raw_scann"}
    hnsw = {row["variant"]: row for row in result["rows"] if row["method"] == "faiss_hnsw"}
    for row in result["rows"]:
        if row["method"] != "scann":
            continue
        anchor = hnsw[row["variant"]]
        checks = [(f"recall@{result['k']} {row['recall']:.4f} >= {TARGET_RECALL}",
                   row["recall"] >= TARGET_RECALL),
                  (f"{row['qps']['median']:,.0f} >= {TARGET_QPS:,} queries/s",
                   row["qps"]["median"] >= TARGET_QPS),
                  (f"build {row['build']['seconds']:.1f} <= {TARGET_BUILD_SECONDS:.0f} s",
                   row["build"]["seconds"] <= TARGET_BUILD_SECONDS),
                  (f"search overhead {_percent(raw[row['variant']]['search_overhead'])} <= "
                   f"{100 * TARGET_OVERHEAD:.0f} %",
                   raw[row["variant"]]["search_overhead"] <= TARGET_OVERHEAD),
                  (f"{row['faiss_ratio']:.2f}x HNSW efSearch {anchor['ef_search']} (recall "
                   f"{anchor['recall']:.4f}) > 1", row["faiss_ratio"] > 1)]
        lines.append(f"- {row['name']}: " + "; ".join(
            f"{text} {_met(ok)}" for text, ok in checks))
    return lines


def hamming_table(result: dict) -> str:
    hamming, binary, exact = result["hamming"], result["faiss_binary"], result["exact_float"]
    bits = result["num_bits"]
    lines = ["| method | build (s) | queries/s, median [min–max] | tfmir / faiss "
             "| others (cores) |",
             "|---" * 5 + "|",
             f"| HammingIndex, {bits}-bit codes (batch {hamming['batch_size']}) | "
             f"{_build(hamming['build'])} | {_rate(hamming['qps'])} | "
             f"{_ratio(hamming['faiss_ratio'])} | {hamming['qps']['others_cores']:.2f} |",
             f"| faiss IndexBinaryFlat({bits}), default settings | {_build(binary['build'])} | "
             f"{_rate(binary['qps'])} | — | {binary['qps']['others_cores']:.2f} |",
             f"| ExactIndex, dot, {bits}-d float ±1 (batch {exact['batch_size']}) | "
             f"{_build(exact['build'])} | {_rate(exact['qps'])} | — | "
             f"{exact['qps']['others_cores']:.2f} |",
             f"| HammingIndex / exact float | | "
             f"{hamming['qps']['median'] / exact['qps']['median']:.2f}× | | |"]
    return "\n".join(lines)


def serve_table(result: dict) -> str:
    lines = ["| measurement | p50 (ms) | p95 (ms) | mean (ms) | max (ms) | others (cores) |",
             "|---" * 6 + "|"]
    for key, name in (("end_to_end", "POST /search end to end (HTTP, decode, embed, search, "
                                      "JSON)"),
                      ("embed_only", "in process: SavedModel serving_default, one PNG"),
                      ("search_only", "in process: Index.search, one vector")):
        figure = result[key]
        mark = " (disturbed)" if figure["disturbed"] else ""
        lines.append(f"| {name}{mark} | {figure['p50_ms']:.2f} | {figure['p95_ms']:.2f} | "
                     f"{figure['mean_ms']:.2f} | {figure['max_ms']:.2f} | "
                     f"{figure['others_cores']:.2f} |")
    return "\n".join(lines)


def _print_index_result(title: str, result: dict) -> None:
    truth = result["ground_truth"]
    check = truth["numpy_check"]
    print(f"\n### {title}\n\n{result['num_items']:,} × {result['dimension']} items, "
          f"{result['num_queries']:,} queries, {result['metric']}, k = {result['k']}. Ground truth "
          f"(ExactIndex, all queries, one run): {truth['seconds']:.1f} s; mean top-1 similarity "
          f"{truth['mean_top1_score']:.3f}, mean {result['k']}th {truth['mean_topk_score']:.3f}; "
          f"float64 NumPy check: {check['agree']}/{check['queries']} queries agree"
          + (f", {check['ties']} ties" if check["ties"] else "") + ".\n")
    print(index_table(result))
    print()
    print("\n".join(targets_lines(result)))


def main(argv) -> None:
    del argv
    unknown = sorted(set(_SECTIONS.value) - set(SECTIONS))
    if unknown:
        raise app.UsageError(f"--sections must name some of {SECTIONS}. Received: {unknown}")
    started = time.perf_counter()
    logging.set_verbosity(logging.WARNING)  # not one line per served request
    tf.get_logger().setLevel("ERROR")
    keras.utils.set_random_seed(_SEED.value)
    env = measure.environment(scann=_scann_version(), faiss=_faiss_version(),
                              faiss_threads=faiss.omp_get_max_threads())
    print("environment: " + ", ".join(f"{key}={value}" for key, value in env.items()))
    print(f"start: {time.strftime('%Y-%m-%d %H:%M:%S')}, {measure.load_average()}", flush=True)
    results = {"environment": env, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "flags": {flag.name: flag.value for flag in (
                   _SECTIONS, _NUM_ITEMS, _NUM_QUERIES, _DIMENSION, _NUM_CLUSTERS, _NOISE, _K,
                   _EXACT_QUERIES, _EXACT_BATCH_SIZE, _CHECK_QUERIES, _SEARCH_BATCH_SIZE,
                   _HNSW_M, _HNSW_EF_CONSTRUCTION, _HNSW_EF_SEARCH, _HAMMING_QUERIES, _MODEL,
                   _DATA, _TRAIN_EPOCHS, _TRAIN_STEPS, _NUM_REQUESTS,
                   _REPEATS, _MIN_RUN_SECONDS, _SEED)},
               "max_others": measure.max_others(),
               "command": " ".join(["python", "benchmarks/search.py", *sys.argv[1:]])}
    sections = [section for section in SECTIONS if section in _SECTIONS.value]
    with tempfile.TemporaryDirectory(prefix="tfmir-search-bench-") as workdir:
        real = None
        for section in sections:
            section_start = time.perf_counter()
            if section == "synthetic":
                results["synthetic"] = run_synthetic()
            elif section == "hamming":
                results["hamming"] = run_hamming()
            else:
                if real is None:
                    real = prepare_real(workdir)
                results[section] = run_real(real) if section == "real" else run_serve(real, workdir)
            results[section]["wall_seconds"] = time.perf_counter() - section_start
            _free()

    print(f"\n## Results (median [min–max] of {_REPEATS.value} runs during which other processes "
          f"used at most {measure.max_others()} cores; builds timed once)")
    if "synthetic" in results:
        _print_index_result("Synthetic clustered unit vectors", results["synthetic"])
    if "real" in results:
        data = results["real"]["data"]
        _print_index_result(f"Real embeddings ({'+'.join(data['specs'])}: "
                            f"{', '.join(data['sources'])}; {data['model']})", results["real"])
    if "hamming" in results:
        hamming = results["hamming"]
        check = hamming["correctness"]
        print(f"\n### Hamming\n\n{hamming['num_items']:,} random {hamming['num_bits']}-bit codes, "
              f"{hamming['num_queries']:,} queries, k = {hamming['k']}.\n")
        print(hamming_table(hamming))
        ratio = hamming["hamming"]["faiss_ratio"]
        print(f"\n- HammingIndex / faiss IndexBinaryFlat: {ratio:.2f} >= "
              f"{TARGET_FAISS_RATIO:.2f} {_met(ratio >= TARGET_FAISS_RATIO)}")
        print(f"\ncorrectness: HammingIndex top-{hamming['k']} rows equal a NumPy popcount brute "
              f"force on {check['rows_equal_numpy']}/{check['checked_queries']} queries; faiss "
              f"IndexBinaryFlat distances equal HammingIndex's on "
              f"{check['faiss_distances_equal']}/{check['float_queries']} queries (rows on "
              f"{check['faiss_rows_equal']}); exact float scores equal {hamming['num_bits']} - 2 × "
              f"Hamming distance on {check['float_scores_equal_hamming']}/"
              f"{check['float_queries']} queries")
    if "serve" in results:
        serve = results["serve"]
        print("\n### /search latency\n")
        if "skipped" in serve:
            print(f"skipped: {serve['skipped']}")
        else:
            print(f"{serve['num_requests']} requests, k = {serve['k']}, index {serve['index']}; "
                  f"client: {serve['client']}; {serve['end_to_end']['errors']} errors"
                  + (f" (first: {serve['end_to_end']['first_error']})"
                     if serve["end_to_end"]["errors"] else "") + ".\n")
            print(serve_table(serve))

    results["wall_seconds"] = time.perf_counter() - started
    print(f"\nend: {time.strftime('%Y-%m-%d %H:%M:%S')}, {measure.load_average()}; wall time "
          f"{results['wall_seconds']:.0f} s "
          + "(" + ", ".join(f"{section} {results[section]['wall_seconds']:.0f} s"
                            for section in sections) + ")")
    measure.write_json(_OUTPUT_JSON.value, results)


if __name__ == "__main__":
    sys.exit(app.run(main))
