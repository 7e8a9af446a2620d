"""Style loss between sets of Gram matrices and its [0, 1] score (paper 003, eq. 6-7)."""

import numbers
from collections.abc import Sequence

import numpy as np

from tfmir.similarity.euclidean import _distance_score

# Differences are formed a block of database items at a time, so a 10k-item archive with
# 576×576 Grams never needs an (N, C, C) float64 temporary: about 32 MB per block.
_CHUNK_ELEMENTS = 1 << 22


def style_losses(query_grams: Sequence, database_grams: Sequence,
                 layer_weights: Sequence[float] | None = None) -> np.ndarray:
    """Style loss from one query's Gram matrices to every database item's.

    LS(G^x, G^y) = Σ_l Σ_ij (β_l G^x_l,ij − β_l G^y_l,ij)², summed in float64 over the full
    matrices of every layer l.

    Args:
        query_grams: L Gram matrices of the query, layer l of shape (C_l, C_l).
        database_grams: L arrays, layer l of shape (N, C_l, C_l): the same layers for N items.
        layer_weights: β_l, L finite numbers >= 0; None weighs every layer 1.

    Returns:
        float64 array (N,) of losses >= 0.

    Example:

    >>> query = [np.eye(2)]
    >>> database = [np.array([np.eye(2), [[1.0, 2.0], [2.0, 1.0]]])]
    >>> style_losses(query, database)  # off-diagonal differences 2, 2 -> 4 + 4
    array([0., 8.])
    >>> style_losses(query, database, layer_weights=[0.5])  # (0.5·2)² + (0.5·2)²
    array([0., 2.])

    Reference:
        Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data
        using Style Transfer, Semantic Image Segmentation and Ensemble Learning", 2021,
        https://arxiv.org/abs/2110.06331, eq. 6 (after Gatys et al., CVPR 2016).
    """
    query_grams, database_grams = _grams(query_grams, database_grams)
    weights = _layer_weights(layer_weights, len(query_grams))
    num_items = database_grams[0].shape[0]
    losses = np.zeros(num_items)
    for layer, (query, database, weight) in enumerate(zip(query_grams, database_grams, weights)):
        layer_losses = np.empty(num_items)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, query.size))
        for start in range(0, num_items, chunk):
            # β² Σ d² equals Σ (β d)²; the weight is applied once per item, not per entry.
            differences = np.asarray(database[start:start + chunk], np.float64) - query
            layer_losses[start:start + chunk] = np.einsum("nij,nij->n", differences, differences)
        if not np.all(np.isfinite(layer_losses)):
            _raise_non_finite_gram(database, layer_losses, layer)
        losses += weight**2 * layer_losses
    if not np.all(np.isfinite(losses)):
        item = int(np.flatnonzero(~np.isfinite(losses))[0])
        raise ValueError(f"the style loss to database item {item} overflowed float64; "
                         "scale the Gram matrices or layer_weights down")
    return losses


def style_score(query_grams: Sequence, database_grams: Sequence,
                layer_weights: Sequence[float] | None = None,
                max_loss: float | None = None) -> np.ndarray:
    """Style score SS = 1 − LS / LS_max: 1 for identical Gram matrices, 0 for the farthest item.

    LS_max is the largest style loss from the query to the database; when every item has the
    query's Gram matrices (LS_max = 0) every score is 1.0.

    Args:
        query_grams: L Gram matrices of the query, layer l of shape (C_l, C_l).
        database_grams: L arrays, layer l of shape (N, C_l, C_l).
        layer_weights: β_l, L finite numbers >= 0; None weighs every layer 1.
        max_loss: LS_max to use instead of the database maximum (e.g. the whole archive's when
            only a candidate subset is re-ranked). Losses above it score 0.

    Returns:
        float64 array (N,) in [0, 1].

    Example:

    >>> query = [np.eye(2)]
    >>> database = [np.array([np.eye(2), [[1.0, 1.0], [1.0, 1.0]], [[1.0, 2.0], [2.0, 1.0]]])]
    >>> style_score(query, database)  # LS 0, 2, 8 -> 1 - LS/8
    array([1.  , 0.75, 0.  ])

    Reference:
        Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data
        using Style Transfer, Semantic Image Segmentation and Ensemble Learning", 2021,
        https://arxiv.org/abs/2110.06331, eq. 7.
    """
    losses = style_losses(query_grams, database_grams, layer_weights)
    return _distance_score(losses, max_loss, "max_loss")


def _grams(query_grams, database_grams) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The query's (C_l, C_l) and the database's (N, C_l, C_l) Grams, checked layer by layer.

    The database arrays keep their dtype (float16/float32 archives are converted a block at a
    time); the query is small and becomes float64.
    """
    if isinstance(query_grams, np.ndarray) or isinstance(database_grams, np.ndarray):
        raise ValueError(
            "query_grams and database_grams must be sequences (one entry per layer), not single "
            f"arrays. Received: {type(query_grams).__name__} and {type(database_grams).__name__}"
        )
    query_grams = [np.asarray(gram, np.float64) for gram in query_grams]
    database_grams = [np.asarray(gram) for gram in database_grams]
    if not query_grams or len(query_grams) != len(database_grams):
        raise ValueError(
            "query_grams and database_grams must hold the same number L >= 1 of layers. "
            f"Received: {len(query_grams)} and {len(database_grams)} layers"
        )
    query_shapes = [gram.shape for gram in query_grams]
    database_shapes = [gram.shape for gram in database_grams]
    for query, database in zip(query_grams, database_grams):
        if (query.ndim != 2 or query.shape[0] != query.shape[1] or database.ndim != 3
                or database.shape[1:] != query.shape or database.shape[0] != database_shapes[0][0]
                or database.shape[0] == 0):
            raise ValueError(
                "layer l of query_grams must be (C_l, C_l) and of database_grams (N, C_l, C_l), "
                "with the same N >= 1 for every layer. "
                f"Received: query shapes {query_shapes}, database shapes {database_shapes}"
            )
    for layer, query in enumerate(query_grams):
        if not np.all(np.isfinite(query)):
            raise ValueError(
                f"the query's Gram matrix of layer {layer} contains NaN or inf; the feature "
                "extractor produced a non-finite output (e.g. a blank or all-black image "
                "normalised by zero, or a float16 overflow)"
            )
    return query_grams, database_grams


def _layer_weights(layer_weights, num_layers: int) -> np.ndarray:
    """β_l as a float64 (L,) array; all ones when None."""
    if layer_weights is None:
        return np.ones(num_layers)
    try:
        values = [] if isinstance(layer_weights, str) else list(layer_weights)
    except TypeError:  # a bare number: refused below with the expected form
        values = []
    if len(values) != num_layers or not all(
            isinstance(value, numbers.Real) and not isinstance(value, bool)
            and np.isfinite(value) and value >= 0 for value in values):
        raise ValueError(
            f"layer_weights must be {num_layers} finite numbers >= 0, one per Gram layer. "
            f"Received: layer_weights={layer_weights!r}"
        )
    return np.asarray(values, np.float64)


def _raise_non_finite_gram(database: np.ndarray, losses: np.ndarray, layer: int):
    """Names the first database item whose layer-`layer` loss is not finite, and why."""
    item = int(np.flatnonzero(~np.isfinite(losses))[0])
    if not np.all(np.isfinite(database[item])):
        raise ValueError(
            f"database item {item}'s Gram matrix of layer {layer} contains NaN or inf; it was "
            "probably computed from a degenerate image (e.g. blank or all black, normalised by "
            "zero) or overflowed float16"
        )
    raise ValueError(f"the style loss of layer {layer} to database item {item} overflowed "
                     "float64; scale the Gram matrices down")
