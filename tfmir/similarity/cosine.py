"""Cosine similarity between feature vectors and its [0, 1] rescaling (paper 003, eq. 3-5)."""

import numpy as np

from tfmir.similarity.euclidean import _raise_non_finite
from tfmir.similarity.euclidean import _vectors


def cosine_similarity(query, database) -> np.ndarray:
    """Cosine of the angle between the query vector and every database vector.

    CS(x, y) = x·y / (‖x‖ ‖y‖). A zero vector has no direction; its cosine with anything is
    defined as 0 (orthogonal: neither similar nor opposite) instead of 0/0. Rounding can push
    x·y a hair past ‖x‖ ‖y‖, so the result is clipped to [-1, 1].

    Args:
        query: feature vector of the query image, shape (D,).
        database: feature vectors of N database images, shape (N, D), N >= 1.

    Returns:
        float64 array (N,) in [-1, 1].

    Example:

    >>> cosine_similarity([1.0, 0.0], [[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.0, 0.0]])
    array([ 1.,  0., -1.,  0.])

    Reference:
        Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data
        using Style Transfer, Semantic Image Segmentation and Ensemble Learning", 2021,
        https://arxiv.org/abs/2110.06331, eq. 3.
    """
    query, database = _vectors(query, database)
    norms = np.linalg.norm(database, axis=1) * np.linalg.norm(query)
    dots = database @ query
    if not (np.all(np.isfinite(dots)) and np.all(np.isfinite(norms))):
        _raise_non_finite(database, dots * norms, "cosine similarity")
    cosines = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return np.clip(cosines, -1.0, 1.0)


def rescaled_cosine(query, database) -> np.ndarray:
    """Cosine similarity moved from [-1, 1] to [0, 1]: CS_new = (CS + 1) / 2.

    This is eq. 4. The paper derives it from a general range conversion, eq. 5, whose printed
    form divides by the new lower limit RN_min; that is a typo (with RN_min = 0 it divides by
    zero). The conversion that yields eq. 4 adds RN_min:
    V_new = (V_old − RO_min)(RN_max − RN_min) / (RO_max − RO_min) + RN_min.

    Args:
        query: feature vector of the query image, shape (D,).
        database: feature vectors of N database images, shape (N, D).

    Returns:
        float64 array (N,) in [0, 1]; a zero vector scores 0.5 (cosine 0).

    Example:

    >>> rescaled_cosine([1.0, 0.0], [[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])  # CS 1, 0, -1
    array([1. , 0.5, 0. ])

    Reference:
        Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data
        using Style Transfer, Semantic Image Segmentation and Ensemble Learning", 2021,
        https://arxiv.org/abs/2110.06331, eq. 4 (eq. 5 corrected as above).
    """
    return (cosine_similarity(query, database) + 1.0) / 2.0
