"""Euclidean distance between feature vectors and its [0, 1] score (paper 003, eq. 1-2)."""

import numbers

import numpy as np


def euclidean_distances(query, database) -> np.ndarray:
    """Euclidean distance from one query vector to every database vector.

    ED(x, y) = sqrt(Σ_i (x_i − y_i)²), computed on the differences in float64 (not through
    |x|² − 2x·y + |y|², whose cancellation makes near-duplicates look farther apart).

    Args:
        query: feature vector of the query image, shape (D,).
        database: feature vectors of N database images, shape (N, D), N >= 1.

    Returns:
        float64 array (N,) of distances.

    Example:

    >>> euclidean_distances([3.0, 4.0], [[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    array([5., 0., 5.])

    Reference:
        Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data
        using Style Transfer, Semantic Image Segmentation and Ensemble Learning", 2021,
        https://arxiv.org/abs/2110.06331, eq. 1.
    """
    query, database = _vectors(query, database)
    differences = database - query
    distances = np.sqrt(np.einsum("nd,nd->n", differences, differences))
    if not np.all(np.isfinite(distances)):
        _raise_non_finite(database, distances, "Euclidean distance")
    return distances


def euclidean_score(query, database, max_distance: float | None = None) -> np.ndarray:
    """Euclidean score ES = 1 − ED / ED_max: 1 for the query itself, 0 for the farthest item.

    ED_max is the largest distance from the query to the database, so the scores span [0, 1]
    over that database. When every item equals the query (ED_max = 0) every score is 1.0.

    Args:
        query: feature vector of the query image, shape (D,).
        database: feature vectors of N database images, shape (N, D).
        max_distance: ED_max to use instead of the database maximum, e.g. the maximum over the
            whole archive when only a candidate subset is scored. Distances above it score 0.

    Returns:
        float64 array (N,) in [0, 1].

    Example:

    >>> euclidean_score([3.0, 4.0], [[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])  # ED 5, 0, 5
    array([0., 1., 0.])
    >>> euclidean_score([3.0, 4.0], [[3.0, 0.0], [3.0, 4.0]], max_distance=8.0)  # 1 - 4/8
    array([0.5, 1. ])

    Reference:
        Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data
        using Style Transfer, Semantic Image Segmentation and Ensemble Learning", 2021,
        https://arxiv.org/abs/2110.06331, eq. 2.
    """
    return _distance_score(euclidean_distances(query, database), max_distance, "max_distance")


def _distance_score(distances: np.ndarray, maximum, name: str) -> np.ndarray:
    """1 − d / d_max clipped to [0, 1]: the form shared by eq. 2 (ED) and eq. 7 (style loss).

    d_max = 0 leaves nothing to divide by: items at distance 0 score 1, any other item 0 (it
    lies beyond the maximum, like any distance above a caller's d_max).
    """
    if maximum is None:
        maximum = float(distances.max())
    elif (isinstance(maximum, bool) or not isinstance(maximum, numbers.Real)
          or not np.isfinite(maximum) or maximum < 0):
        raise ValueError(f"{name} must be a finite number >= 0. Received: {name}={maximum!r}")
    if maximum == 0:
        return np.where(distances == 0, 1.0, 0.0)
    return np.clip(1.0 - distances / maximum, 0.0, 1.0)


def _vectors(query, database) -> tuple[np.ndarray, np.ndarray]:
    """float64 (D,) query and (N, D) database, checked for shape and finite values."""
    query = np.asarray(query, dtype=np.float64)
    database = np.asarray(database, dtype=np.float64)
    if query.ndim != 1 or database.ndim != 2 or database.shape[0] == 0:
        raise ValueError(
            "query must be a vector (D,) and database a matrix (N, D) with N >= 1. "
            f"Received: query.shape={query.shape}, database.shape={database.shape}"
        )
    if query.shape[0] != database.shape[1]:
        raise ValueError(
            "query and database vectors must have the same length D. "
            f"Received: query.shape={query.shape}, database.shape={database.shape}"
        )
    if not np.all(np.isfinite(query)):
        raise ValueError(
            "the query feature vector contains NaN or inf; the feature extractor produced a "
            "non-finite output (e.g. a blank or all-black image, or a float16 overflow)"
        )
    return query, database


def _raise_non_finite(database: np.ndarray, values: np.ndarray, what: str):
    """Names the first database item whose value is not finite, and the likely cause.

    Called only after a non-finite result, so healthy databases pay for no extra pass.
    """
    item = int(np.flatnonzero(~np.isfinite(values))[0])
    if not np.all(np.isfinite(database[item])):
        raise ValueError(
            f"database item {item} contains NaN or inf; its features were probably computed "
            "from a degenerate image (e.g. blank or all black) or overflowed float16"
        )
    raise ValueError(
        f"the {what} to database item {item} overflowed float64; scale the features down"
    )
