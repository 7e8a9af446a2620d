"""Exact (brute-force) k-nearest-neighbour search with faiss, and `ExactIndex`."""

import logging
import numbers

import numpy as np

from tfmir.index.base import Index


def _import_faiss():
    """faiss, imported without its loader's INFO lines reaching the logs.

    On import faiss logs which SIMD build it loads, after a ModuleNotFoundError it recovers
    from; under absl (every `tfmir` command) those lines would show up in the output. The
    loader's logger level is restored afterwards.
    """
    loader_logger = logging.getLogger("faiss.loader")
    level = loader_logger.level
    loader_logger.setLevel(logging.WARNING)
    try:
        import faiss
    finally:
        loader_logger.setLevel(level)
    return faiss


faiss = _import_faiss()

METRICS = ("cosine", "dot", "l2")
# Each round of a search that ties push past the fetched candidates fetches this many times more.
_FETCH_GROWTH = 4
# faiss multiplies matrices (BLAS) only for at least faiss.cvar.distance_compute_blas_threshold
# query values at once (1,000 queries of 128 dimensions); fewer queries are scored one at a time,
# each streaming the whole gallery. Over a gallery larger than the caches that takes ~24 ms per
# query against ~2.2 s for a whole block (1M × 128, 2 AVX2 cores), so from an 8th of a block on,
# zero rows complete the block.
_PAD_FRACTION = 1 / 8
_CACHED_GALLERY_BYTES = 64 << 20


def exact_search(
    queries,
    gallery,
    k: int,
    *,
    metric: str = "cosine",
    batch_size: int = 1024,
    exclude_self: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Finds the k best gallery items of every query by exhaustive comparison.

    Every query is scored against every gallery item by faiss's brute-force
    k-NN (`faiss.knn`: BLAS matrix products over blocks of at most 4096
    queries × 1024 items, a heap of the best per query, on every core), in
    float32. It fetches one candidate more than asked (two with
    `exclude_self`) and sorts them by score, then row: when the k-th score is
    strictly better than the last candidate's, no item left out can tie with
    it, so the top k are exact, ties included. The few queries whose ties reach
    past the candidates are searched again with 4 times more, up to the whole
    gallery. Memory is O(Q × k) for Q queries, plus O(batch_size × N) at worst
    for a gallery of N items, never Q × N.

    Args:
        queries: Array (Q, D).
        gallery: Array (N, D).
        k: Number of neighbours per query, 1 <= k <= N (N - 1 with
            `exclude_self`).
        metric: One of `METRICS`. `"cosine"`: cosine similarity, higher is
            better (inputs are L2-normalised here; a zero vector scores 0).
            `"dot"`: inner product, higher is better. `"l2"`: Euclidean distance,
            lower is better (the square root of faiss's squared distance, which
            it computes as max(|q|² - 2 q·g + |g|², 0) when it uses BLAS).
        batch_size: Bounds the candidates of the queries searched again
            because of ties: at most batch_size × N at once.
        exclude_self: Queries and gallery are the same set (equal lengths are
            required, identity is the caller's promise): query i never returns
            gallery index i, even when another item is an exact duplicate.

    Returns:
        `(scores, indices)`: float32 (Q, k) similarities or distances and int64
        (Q, k) gallery indices, best first. Equal scores come in increasing index
        order.

    Raises:
        ValueError: on an unknown metric, a k outside the valid range, arrays
            that are not 2-D, differing dimensions, a non-positive batch size,
            `exclude_self` with Q != N, or scores that are not numbers (NaN in
            the inputs).

    Example:

    >>> gallery = np.eye(3, dtype="float32")
    >>> scores, indices = exact_search(gallery[:1], gallery, k=2, metric="l2")
    >>> indices
    array([[0, 1]])
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}. Received: metric={metric!r}")
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    if queries.ndim != 2 or gallery.ndim != 2:
        raise ValueError(
            "queries and gallery must be 2-D arrays (items, dimensions). "
            f"Received: queries.shape={queries.shape}, gallery.shape={gallery.shape}"
        )
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            "queries and gallery must have the same dimension. "
            f"Received: queries.shape={queries.shape}, gallery.shape={gallery.shape}"
        )
    num_queries, num_gallery = queries.shape[0], gallery.shape[0]
    if exclude_self and num_queries != num_gallery:
        raise ValueError(
            "exclude_self=True needs the queries to be the gallery (equal lengths). "
            f"Received: {num_queries} queries, {num_gallery} gallery items"
        )
    available = num_gallery - 1 if exclude_self else num_gallery
    if not _is_int(k) or not 1 <= k <= available:
        raise ValueError(
            f"k must be an integer in [1, {available}] "
            f"({num_gallery} gallery items, exclude_self={exclude_self}). Received: k={k!r}"
        )
    if not _is_int(batch_size) or batch_size <= 0:
        raise ValueError(
            f"batch_size must be a positive integer. Received: batch_size={batch_size!r}"
        )

    if metric == "cosine":
        queries = _l2_normalize(queries)
        gallery = _l2_normalize(gallery)
    return _ranked_neighbours(
        np.ascontiguousarray(queries), np.ascontiguousarray(gallery), k, metric,
        batch_size=batch_size, exclude_self=exclude_self,
    )


def _ranked_neighbours(queries, gallery, k, metric, *, batch_size, exclude_self):
    """The exact top k by (score, row): faiss's candidates, sorted, fetched again past ties."""
    num_queries, num_gallery = queries.shape[0], gallery.shape[0]
    if num_queries == 0:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    query_rows = np.arange(num_queries)
    num_fetched = min(k + 1 + int(exclude_self), num_gallery)
    # Every query in one faiss call (O(Q × k) memory, as the results): faiss blocks the work.
    scores, indices, resolved = _candidates(
        queries, gallery, k, num_fetched, metric, query_rows if exclude_self else None
    )
    pending = query_rows[~resolved]
    while pending.size:
        num_fetched = min(_FETCH_GROWTH * num_fetched, num_gallery)
        # As many queries at once as keep the candidates within batch_size × N.
        chunk_size = max(1, batch_size * num_gallery // num_fetched)
        unresolved = []
        for start in range(0, pending.size, chunk_size):
            chosen = pending[start:start + chunk_size]
            scores[chosen], indices[chosen], resolved = _candidates(
                queries[chosen], gallery, k, num_fetched, metric,
                chosen if exclude_self else None,
            )
            unresolved.append(chosen[~resolved])
        pending = np.concatenate(unresolved)
    return scores, indices


def _candidates(queries, gallery, k, num_fetched, metric, self_indices):
    """faiss's best `num_fetched` per query, sorted by (score, row): (scores, rows, resolved).

    `resolved[i]` is True where the first k are provably the exact top k: everything was
    fetched, or the k-th score is strictly better than the last fetched one (an item left out
    scores no better than that, so it cannot tie with the k-th).
    """
    scores, indices = _faiss_knn(queries, gallery, num_fetched, metric)
    if np.any(indices < 0):
        raise ValueError("Scores are not numbers: the queries or the gallery hold NaN values.")
    if metric == "l2":
        scores = np.sqrt(np.maximum(scores, 0.0))  # before sorting: sqrt can merge close squares
    # Sorted by a "lower is better" key, then by row; a query's own row is keyed last.
    keys = scores if metric == "l2" else -scores
    is_self = np.zeros(indices.shape, dtype=bool)
    if self_indices is not None:
        is_self = indices == self_indices[:, None]
        keys = np.where(is_self, np.inf, keys)
    order = np.lexsort((indices, keys), axis=-1)
    keys = np.take_along_axis(keys, order, axis=-1)
    scores = np.take_along_axis(scores, order, axis=-1)[:, :k]
    indices = np.take_along_axis(indices, order, axis=-1)[:, :k]
    last_fetched = keys[np.arange(len(keys)), num_fetched - 1 - is_self.any(axis=1)]
    resolved = (keys[:, k - 1] < last_fetched) | (num_fetched == gallery.shape[0])
    return scores.astype(np.float32, copy=False), indices.astype(np.int64, copy=False), resolved


def _faiss_knn(queries, gallery, num_fetched, metric):
    """faiss.knn; a few queries over a large gallery are padded to a BLAS block (see above)."""
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    num_queries, dimension = queries.shape
    block = -(-faiss.cvar.distance_compute_blas_threshold // dimension)
    if gallery.nbytes > _CACHED_GALLERY_BYTES and block > num_queries >= _PAD_FRACTION * block:
        padded = np.zeros((block, dimension), dtype=np.float32)
        padded[:num_queries] = queries
        scores, indices = faiss.knn(padded, gallery, num_fetched, faiss_metric)
        return scores[:num_queries], indices[:num_queries]
    return faiss.knn(queries, gallery, num_fetched, faiss_metric)


def _l2_normalize(x):
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float32).tiny)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class ExactIndex(Index):
    """Exact top-k search over stored float vectors: a thin class over `exact_search`.

    Every query is compared with every item (faiss's brute-force k-NN, as
    `exact_search`, at the speed of faiss `IndexFlatIP` / `IndexFlatL2`), so
    results are exact: the reference that approximate indexes are measured
    against. `add` simply appends the vectors; there is nothing to rebuild.

    Scores: `"cosine"` similarity (vectors are L2-normalised when stored and
    queries when searched; higher is better), `"dot"` inner product (higher is
    better), `"l2"` Euclidean distance (lower is better). Equal scores come in
    row order.

    Args:
        metric: One of `METRICS`.
        dimension: Vector length.
        model_fingerprint: Identifies the model that made the vectors.
        batch_size: Bounds the candidates of queries searched again because
            of ties (see `exact_search`): memory stays O(batch_size ×
            len(index)) at worst.

    Example:

    >>> index = ExactIndex(metric="cosine", dimension=2)
    >>> index = index.build([[1.0, 0.0], [0.0, 1.0]], ids=["a", "b"], labels=[0, 1])
    >>> [hit["id"] for hit in index.search([[0.9, 0.1]], k=2)[0]]
    ['a', 'b']
    """

    kind = "exact"
    metrics = METRICS
    data_file = "vectors.npy"
    default_settings = {"batch_size": 1024}

    def __init__(
        self,
        *,
        metric: str = "cosine",
        dimension: int,
        model_fingerprint: str | None = None,
        preprocessing: dict | None = None,
        **settings,
    ):
        super().__init__(
            metric=metric, dimension=dimension, model_fingerprint=model_fingerprint,
            preprocessing=preprocessing, **settings,
        )

    def _validate_settings(self):
        batch_size = self.settings["batch_size"]
        if not _is_int(batch_size) or batch_size <= 0:
            raise ValueError(
                f"batch_size must be a positive integer. Received: batch_size={batch_size!r}"
            )

    def _prepare_vectors(self, vectors, name):
        vectors = self._check_float_vectors(vectors, name)
        return _l2_normalize(vectors) if self.metric == "cosine" else vectors

    def _build_searcher(self, data):
        pass  # the stored vectors are the searcher

    def _extend_searcher(self, all_data, new_data):
        pass

    def _read_searcher(self, directory, manifest):
        pass

    def _search(self, queries, k):
        # Both sides are already unit length for cosine, so the dot product is it.
        metric = "dot" if self.metric == "cosine" else self.metric
        return exact_search(
            queries, self._data, k, metric=metric, batch_size=self.settings["batch_size"]
        )
