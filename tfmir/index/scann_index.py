"""Approximate nearest-neighbour search with ScaNN, configured from the data size."""

import math
import numbers

import numpy as np

from tfmir.index.base import Index
from tfmir.index.exact import METRICS
from tfmir.index.exact import _l2_normalize
from tfmir.index.exact import exact_search

MODES = ("auto", "brute_force", "asymmetric_hashing", "tree")
SEARCHER_DIRECTORY = "scann"
# The builder needs a default neighbour count; every search passes its own k.
_BUILD_NUM_NEIGHBORS = 10
_UPSERT_BATCH_SIZE = 1024


class ScannIndex(Index):
    """ScaNN search, configured from the number of items as ScaNN's docs advise.

    ScaNN's `docs/algorithms.md` rules of thumb, with the thresholds as settings:

    - fewer than `brute_force_threshold` (20k) items: brute-force scoring
      (exact);
    - up to `tree_threshold` (100k): asymmetric hashing (AH) with
      `dimensions_per_block=2` (anisotropic threshold 0.2 for cosine / dot),
      then exact rescoring of `max(reorder_multiplier × k,
      min_reorder_num_neighbors)` candidates;
    - from `tree_threshold` on: a k-means tree with `num_leaves ≈ √n` leaves
      (never more than n), searching `leaves_to_search_fraction` (5 %) of them,
      trained on `min(n, training_sample_size)` points (spherical k-means for
      cosine), then AH and rescoring.

    `mode` forces one of the three regardless of size. The configuration used
    (the "plan") is recorded in the manifest under `searcher`.

    `add` uses ScaNN 1.4.2's incremental `upsert`, which appends datapoints to
    the trained searcher (new rows get the next indices, and they are assigned
    to existing leaves and AH codebooks without retraining), as long as the
    plan for the new size has the same mode and the index has not grown beyond
    `rebuild_growth_factor` × the size it was trained at. Otherwise it rebuilds
    from all stored vectors (kept in `vectors.npy` for that), re-planning for
    the new size.

    Scores: `"cosine"` similarity (vectors and queries L2-normalised, ScaNN
    `dot_product`; higher is better), `"dot"` inner product (higher is
    better), `"l2"` Euclidean distance (ScaNN `squared_l2`, square-rooted here
    to match `ExactIndex`; lower is better). A query whose searched leaves hold
    fewer than k items is answered by exact search instead.

    Args:
        metric: One of `METRICS`.
        dimension: Vector length.
        model_fingerprint: Identifies the model that made the vectors.
        mode: `"auto"` (by size, as above), `"brute_force"`,
            `"asymmetric_hashing"` or `"tree"`.
        brute_force_threshold: Brute force below this many items.
        tree_threshold: Tree partitioning from this many items.
        num_leaves: Tree leaves; None for round(√n). Capped at n.
        num_leaves_to_search: Leaves searched per query; None for
            ceil(leaves_to_search_fraction × num_leaves). Capped at num_leaves.
        leaves_to_search_fraction: See num_leaves_to_search.
        training_sample_size: Most points used to train the tree and the AH
            codebooks.
        spherical_partitioning: Spherical k-means for the tree (unit-norm
            centroids); None for "when the metric is cosine", where it makes the
            query's leaf ranking (by dot product) agree with the L2 assignment
            of the items.
        dimensions_per_block: AH dimensions per block (ScaNN advises 2).
        anisotropic_quantization_threshold: AH anisotropic threshold for
            cosine / dot (not used for l2).
        reorder_multiplier, min_reorder_num_neighbors: AH candidates rescored
            exactly per query: max(reorder_multiplier × k,
            min_reorder_num_neighbors), at most n.
        rebuild_growth_factor: `add` rebuilds a hashed / tree searcher once it
            would hold more than this × the items it was trained on.
        training_threads: ScaNN training threads (0: ScaNN's default).
        search_threads: ScaNN search threads (0: ScaNN's default).
        search_batch_size: Queries per ScaNN parallel-search batch.

    Example:

    >>> index = ScannIndex(metric="cosine", dimension=128)  # doctest: +SKIP
    >>> index.build(embeddings, ids=ids, labels=labels).save("archive")  # doctest: +SKIP

    Reference:
        Guo et al., "Accelerating Large-Scale Inference with Anisotropic Vector
        Quantization", ICML 2020, https://arxiv.org/abs/1908.10396.
    """

    kind = "scann"
    metrics = METRICS
    data_file = "vectors.npy"
    default_settings = {
        "mode": "auto",
        "brute_force_threshold": 20_000,
        "tree_threshold": 100_000,
        "num_leaves": None,
        "num_leaves_to_search": None,
        "leaves_to_search_fraction": 0.05,
        "training_sample_size": 250_000,
        "spherical_partitioning": None,
        "dimensions_per_block": 2,
        "anisotropic_quantization_threshold": 0.2,
        "reorder_multiplier": 10,
        "min_reorder_num_neighbors": 100,
        "rebuild_growth_factor": 2.0,
        "training_threads": 0,
        "search_threads": 0,
        "search_batch_size": 256,
    }

    def __init__(
        self,
        *,
        metric: str = "cosine",
        dimension: int,
        model_fingerprint: str | None = None,
        preprocessing: dict | None = None,
        **settings,
    ):
        self._searcher = None
        self._plan = None
        super().__init__(
            metric=metric, dimension=dimension, model_fingerprint=model_fingerprint,
            preprocessing=preprocessing, **settings,
        )

    @property
    def plan(self) -> dict | None:
        """The configuration of the current searcher (as in the manifest), or None."""
        return None if self._plan is None else dict(self._plan)

    def plan_for(self, num_items: int) -> dict:
        """The configuration `build` would choose for `num_items` items."""
        settings = self.settings
        mode = settings["mode"]
        if mode == "auto":
            if num_items < settings["brute_force_threshold"]:
                mode = "brute_force"
            elif num_items < settings["tree_threshold"]:
                mode = "asymmetric_hashing"
            else:
                mode = "tree"
        plan = {"mode": mode, "trained_count": int(num_items), "upserted_count": 0}
        if mode != "brute_force":
            plan["training_sample_size"] = int(min(num_items, settings["training_sample_size"]))
        if mode == "tree":
            num_leaves = settings["num_leaves"] or max(1, round(math.sqrt(num_items)))
            num_leaves = max(1, min(num_leaves, num_items))  # never more leaves than points
            to_search = settings["num_leaves_to_search"] or math.ceil(
                settings["leaves_to_search_fraction"] * num_leaves
            )
            plan["num_leaves"] = int(num_leaves)
            plan["num_leaves_to_search"] = int(max(1, min(to_search, num_leaves)))
            spherical = settings["spherical_partitioning"]
            plan["spherical"] = self.metric == "cosine" if spherical is None else bool(spherical)
        return plan

    def _validate_settings(self):
        settings = self.settings
        if settings["mode"] not in MODES:
            raise ValueError(f"mode must be one of {MODES}. Received: mode={settings['mode']!r}")
        for name in (
            "brute_force_threshold",
            "tree_threshold",
            "training_sample_size",
            "dimensions_per_block",
            "reorder_multiplier",
            "min_reorder_num_neighbors",
            "search_batch_size",
        ):
            _check_int(name, settings[name], minimum=1)
        for name in ("training_threads", "search_threads"):
            _check_int(name, settings[name], minimum=0)
        for name in ("num_leaves", "num_leaves_to_search"):
            if settings[name] is not None:
                _check_int(name, settings[name], minimum=1)
        if settings["tree_threshold"] < settings["brute_force_threshold"]:
            raise ValueError(
                "tree_threshold must be >= brute_force_threshold. Received: "
                f"tree_threshold={settings['tree_threshold']}, "
                f"brute_force_threshold={settings['brute_force_threshold']}"
            )
        fraction = settings["leaves_to_search_fraction"]
        if not isinstance(fraction, numbers.Real) or not 0 < fraction <= 1:
            raise ValueError(
                f"leaves_to_search_fraction must be in (0, 1]. Received: {fraction!r}"
            )
        spherical = settings["spherical_partitioning"]
        if spherical is not None and not isinstance(spherical, bool):
            raise ValueError(
                f"spherical_partitioning must be True, False or None. Received: {spherical!r}"
            )
        factor = settings["rebuild_growth_factor"]
        if not isinstance(factor, numbers.Real) or factor < 1:
            raise ValueError(f"rebuild_growth_factor must be >= 1. Received: {factor!r}")
        threshold = settings["anisotropic_quantization_threshold"]
        if threshold is not None and not isinstance(threshold, numbers.Real):
            raise ValueError(
                "anisotropic_quantization_threshold must be a number or None. "
                f"Received: {threshold!r}"
            )

    def _prepare_vectors(self, vectors, name):
        vectors = self._check_float_vectors(vectors, name)
        return _l2_normalize(vectors) if self.metric == "cosine" else vectors

    def _loaded_data(self, data):
        super()._loaded_data(data[:0])  # dtype and shape checks, without reading the file
        # Kept memory-mapped: read only when a rebuild or an exact fallback needs it.
        return data

    def _build_searcher(self, data):
        scann_ops = _scann_ops()
        plan = self.plan_for(data.shape[0])
        settings = self.settings
        distance = "squared_l2" if self.metric == "l2" else "dot_product"
        data = np.ascontiguousarray(data, dtype=np.float32)
        builder = scann_ops.builder(data, _BUILD_NUM_NEIGHBORS, distance)
        if settings["training_threads"]:
            builder = builder.set_n_training_threads(settings["training_threads"])
        if plan["mode"] == "tree":
            builder = builder.tree(
                num_leaves=plan["num_leaves"],
                num_leaves_to_search=plan["num_leaves_to_search"],
                training_sample_size=plan["training_sample_size"],
                spherical=plan["spherical"],
            )
        if plan["mode"] == "brute_force":
            builder = builder.score_brute_force()
        else:
            threshold = settings["anisotropic_quantization_threshold"]
            if distance != "dot_product" or threshold is None:
                threshold = float("nan")  # ScaNN's "off"; anisotropy is for inner products
            builder = builder.score_ah(
                settings["dimensions_per_block"],
                anisotropic_quantization_threshold=threshold,
                training_sample_size=plan["training_sample_size"],
            ).reorder(self._reorder_num_neighbors(_BUILD_NUM_NEIGHBORS, data.shape[0]))
        searcher = builder.build()
        self._set_searcher(searcher, plan)

    def _extend_searcher(self, all_data, new_data):
        wanted = self.plan_for(all_data.shape[0])
        current = self._plan
        outgrown = current["mode"] != "brute_force" and all_data.shape[0] > (
            self.settings["rebuild_growth_factor"] * current["trained_count"]
        )
        if wanted["mode"] != current["mode"] or outgrown:
            self._build_searcher(all_data)
            return
        old_size = all_data.shape[0] - new_data.shape[0]
        try:
            # The raw pybind searcher: the Python wrapper's upsert needs string
            # docids for every row, and tfmir's table already maps rows to ids.
            # `None` means "insert as a new datapoint".
            assigned = self._searcher.searcher.upsert(
                [None] * new_data.shape[0],
                np.ascontiguousarray(new_data, dtype=np.float32),
                _UPSERT_BATCH_SIZE,
            )
        except BaseException:
            self._build_searcher(self._data)  # back to the state before add()
            raise
        if list(assigned) != list(range(old_size, all_data.shape[0])):
            # Rows must stay in table order; rebuild if ScaNN numbered them otherwise.
            self._build_searcher(all_data)
            return
        self._plan["upserted_count"] += int(new_data.shape[0])

    def _search(self, queries, k):
        num_items = len(self)
        pre_reorder = None
        if self._plan["mode"] != "brute_force":
            pre_reorder = self._reorder_num_neighbors(k, num_items)
        rows, distances = self._searcher.search_batched_parallel(
            queries,
            final_num_neighbors=k,
            pre_reorder_num_neighbors=pre_reorder,
            batch_size=self.settings["search_batch_size"],
        )
        rows = np.asarray(rows, dtype=np.int64)
        scores = np.asarray(distances, dtype=np.float32)
        # ScaNN pads with NaN when the searched leaves hold fewer than k items.
        short = np.isnan(scores).any(axis=1)
        if self.metric == "l2":
            scores = np.sqrt(np.maximum(scores, 0.0))
        if np.any(short):
            metric = "dot" if self.metric == "cosine" else self.metric
            exact_scores, exact_rows = exact_search(
                queries[short], np.asarray(self._data), k, metric=metric
            )
            scores[short], rows[short] = exact_scores, exact_rows
        return scores, rows

    def _write_searcher(self, directory):
        searcher_directory = directory / SEARCHER_DIRECTORY
        searcher_directory.mkdir()
        # Relative asset paths: the directory is renamed after it is written.
        self._searcher.serialize(str(searcher_directory), relative_path=True)

    def _read_searcher(self, directory, manifest):
        scann_ops = _scann_ops()
        plan = manifest.get("searcher")
        if not isinstance(plan, dict) or plan.get("mode") not in MODES[1:]:
            raise ValueError(
                f"{str(directory)!r}: the manifest has no valid ScaNN 'searcher' entry."
            )
        searcher = scann_ops.load_searcher(
            str(directory / SEARCHER_DIRECTORY), assets_backcompat_shim=False
        )
        if searcher.size() != len(self):
            raise ValueError(
                f"{str(directory)!r} is inconsistent: the ScaNN searcher holds {searcher.size()} "
                f"items, the table {len(self)}."
            )
        self._set_searcher(searcher, dict(plan))

    def _searcher_state(self):
        return self.plan

    def _set_searcher(self, searcher, plan):
        if self.settings["search_threads"]:
            searcher.set_num_threads(self.settings["search_threads"])
        self._searcher = searcher
        self._plan = plan

    def _reorder_num_neighbors(self, k, num_items):
        settings = self.settings
        wanted = max(settings["reorder_multiplier"] * k, settings["min_reorder_num_neighbors"])
        return int(max(k, min(wanted, num_items)))


def _scann_ops():
    try:
        from scann.scann_ops.py import scann_ops_pybind
    except ImportError as error:
        raise ImportError(
            "ScannIndex needs ScaNN 1.4.2, which needs tensorflow 2.20.x: "
            "pip install 'tfmir[scann]'"
        ) from error
    return scann_ops_pybind


def _check_int(name, value, minimum):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}. Received: {name}={value!r}")
