"""Exact (brute-force) k-nearest-neighbour search, batched over the queries, and `ExactIndex`."""

import numbers

import numpy as np
import tensorflow as tf

from tfmir.index.base import Index

METRICS = ("cosine", "dot", "l2")


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

    Queries are processed `batch_size` at a time with a TensorFlow matmul and
    `tf.math.top_k`, so memory stays O(batch_size × N) for a gallery of N items,
    never N × N. Everything is computed in float32.

    Args:
        queries: Array (Q, D).
        gallery: Array (N, D).
        k: Number of neighbours per query, 1 <= k <= N (N - 1 with
            `exclude_self`).
        metric: One of `METRICS`. `"cosine"`: cosine similarity, higher is
            better (inputs are L2-normalised here; a zero vector scores 0).
            `"dot"`: inner product, higher is better. `"l2"`: Euclidean distance,
            lower is better, computed as sqrt(max(|q|² - 2 q·g + |g|², 0)).
        batch_size: Number of queries compared with the gallery at once.
        exclude_self: Queries and gallery are the same set (equal lengths are
            required, identity is the caller's promise): query i never returns
            gallery index i, even when another item is an exact duplicate.

    Returns:
        `(scores, indices)`: float32 (Q, k) similarities or distances and int64
        (Q, k) gallery indices, best first. Equal scores come in increasing index
        order.

    Raises:
        ValueError: on an unknown metric, a k outside the valid range, arrays
            that are not 2-D, differing dimensions, a non-positive batch size, or
            `exclude_self` with Q != N.

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
    gallery_tensor = tf.constant(gallery)
    gallery_squared_norms = tf.reduce_sum(tf.square(gallery_tensor), axis=1)

    all_scores = np.empty((num_queries, k), dtype=np.float32)
    all_indices = np.empty((num_queries, k), dtype=np.int64)
    for start in range(0, num_queries, batch_size):
        stop = min(start + batch_size, num_queries)
        batch = tf.constant(queries[start:stop])
        # top_k picks the largest, so distances are searched as negative squares.
        scores = tf.matmul(batch, gallery_tensor, transpose_b=True)
        if metric == "l2":
            query_squared_norms = tf.reduce_sum(tf.square(batch), axis=1, keepdims=True)
            scores = 2.0 * scores - query_squared_norms - gallery_squared_norms[None, :]
        if exclude_self:
            is_self = tf.one_hot(tf.range(start, stop), num_gallery, on_value=True, off_value=False)
            scores = tf.where(is_self, tf.constant(-np.inf, tf.float32), scores)
        top_scores, top_indices = tf.math.top_k(scores, k=k, sorted=True)
        if metric == "l2":
            top_scores = tf.sqrt(tf.maximum(-top_scores, 0.0))
        all_scores[start:stop] = top_scores.numpy()
        all_indices[start:stop] = top_indices.numpy()
    return all_scores, all_indices


def _l2_normalize(x):
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float32).tiny)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class ExactIndex(Index):
    """Exact top-k search over stored float vectors: a thin class over `exact_search`.

    Every query is compared with every item (a batched TensorFlow matmul), so
    results are exact; right for up to a few tens of thousands of items, and
    the reference that approximate indexes are measured against. `add` simply
    appends the vectors; there is nothing to rebuild.

    Scores: `"cosine"` similarity (vectors are L2-normalised when stored and
    queries when searched; higher is better), `"dot"` inner product (higher is
    better), `"l2"` Euclidean distance (lower is better). Equal scores come in
    row order.

    Args:
        metric: One of `METRICS`.
        dimension: Vector length.
        model_fingerprint: Identifies the model that made the vectors.
        batch_size: Queries compared with the whole index at once (memory is
            O(batch_size × len(index))).

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
