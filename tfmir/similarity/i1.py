"""The I1 score: the harmonic mean of similarity scores in [0, 1] (paper 003, eq. 9-14)."""

from collections.abc import Sequence

import numpy as np


def harmonic_mean(*scores, names: Sequence[str] | None = None) -> np.ndarray:
    """I1 = n / Σ_i 1/s_i: high only when every one of the n scores is high (like F1).

    A score of 0 makes the I1 score 0, the limit of n / Σ 1/s_i as that s_i -> 0+; it is set
    directly, with no division by zero and no NumPy warning.

    Args:
        *scores: n >= 1 arrays of scores in [0, 1] that broadcast together, e.g. n arrays (N,)
            for N database items.
        names: optional name of each score ("euclidean", "dice", ...), used in error messages.

    Returns:
        float64 array of the broadcast shape, in [0, 1].

    Example:

    >>> harmonic_mean([0.5, 1.0, 0.0], [1.0, 1.0, 0.9])  # 2 / (1/0.5 + 1/1) = 2/3; 1; 0
    array([0.66666667, 1.        , 0.        ])

    Reference:
        Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data
        using Style Transfer, Semantic Image Segmentation and Ensemble Learning", 2021,
        https://arxiv.org/abs/2110.06331, eq. 9-14.
    """
    if not scores:
        raise ValueError("harmonic_mean needs at least one score array. Received none")
    if names is None:
        names = [f"score {index}" for index in range(len(scores))]
    elif isinstance(names, str) or len(names) != len(scores):
        raise ValueError(f"names must name each of the {len(scores)} scores. "
                         f"Received: names={names!r}")
    arrays = []
    for name, score in zip(names, scores):
        score = np.asarray(score, np.float64)
        if np.isnan(score).any():
            raise ValueError(f"{name} contains NaN; every score must be a number in [0, 1]")
        if score.size and (score.min() < 0 or score.max() > 1):
            raise ValueError(f"{name} must lie in [0, 1]. Received values in "
                             f"[{float(score.min())!r}, {float(score.max())!r}]")
        arrays.append(score)
    try:
        stacked = np.stack(np.broadcast_arrays(*arrays))
    except ValueError:
        shapes = {name: array.shape for name, array in zip(names, arrays)}
        raise ValueError(
            f"scores must have shapes that broadcast together. Received: {shapes}") from None
    positive = stacked > 0
    all_positive = positive.all(axis=0)
    # 1/s overflows to inf for subnormal s; n/inf = 0 is still the right limit.
    with np.errstate(over="ignore"):
        reciprocals = np.divide(1.0, stacked, out=np.zeros_like(stacked), where=positive)
        # Items with a zero score get a dummy denominator of 1; their result is replaced by 0.
        means = len(arrays) / np.where(all_positive, reciprocals.sum(axis=0), 1.0)
    return np.where(all_positive, means, 0.0)
