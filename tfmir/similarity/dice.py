"""Sørensen-Dice coefficient between segmentation masks (paper 003, eq. 8)."""

import numbers

import numpy as np

# Masks are binarised a block of database items at a time: a 10k-item archive of 384×384
# masks would otherwise need a 1.5 GB boolean copy.
_CHUNK_ELEMENTS = 1 << 24


def dice_coefficient(query_mask, database_masks, threshold: float = 0.5) -> np.ndarray:
    """Dice coefficient DC = 2|X ∩ Y| / (|X| + |Y|) between the query's and each database mask.

    Masks are probabilities (or {0, 1} / bool); a pixel is lesion when its value is above
    `threshold`. Two empty masks score 1.0: both segmentations say "no lesion", which is
    perfect agreement, and 0/0 must not become NaN. An empty mask against a non-empty one
    scores 0.0 (no overlap).

    Args:
        query_mask: the query's mask, shape (H, W) or (H, W, 1).
        database_masks: N masks, shape (N, H, W) or (N, H, W, 1), N >= 1.
        threshold: probability above which a pixel counts as lesion, in (0, 1).

    Returns:
        float64 array (N,) in [0, 1].

    Example:

    >>> query = [[1, 1], [0, 0]]
    >>> dice_coefficient(query, [[[1, 0], [0, 0]], [[0, 0], [1, 1]], [[1, 1], [0, 0]]])
    array([0.66666667, 0.        , 1.        ])

    Reference:
        Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data
        using Style Transfer, Semantic Image Segmentation and Ensemble Learning", 2021,
        https://arxiv.org/abs/2110.06331, eq. 8.
    """
    if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
            or not 0.0 < threshold < 1.0):
        raise ValueError(f"threshold must be in (0, 1). Received: threshold={threshold!r}")
    query = np.asarray(query_mask)
    database = np.asarray(database_masks)
    given_shapes = f"query_mask.shape={query.shape}, database_masks.shape={database.shape}"
    # A trailing channel of size 1 is the segmenter's output layout; it carries no pixels.
    if query.ndim == 3 and query.shape[-1] == 1:
        query = query[..., 0]
    if database.ndim == 4 and database.shape[-1] == 1:
        database = database[..., 0]
    if query.ndim != 2 or database.ndim != 3 or database.shape[0] == 0:
        raise ValueError(
            "query_mask must be (H, W) or (H, W, 1) and database_masks (N, H, W) or "
            f"(N, H, W, 1) with N >= 1. Received: {given_shapes}"
        )
    if database.shape[1:] != query.shape:
        raise ValueError(f"query and database masks must have the same height and width. "
                         f"Received: {given_shapes}")
    query = _binary(query, threshold).reshape(-1)
    query_area = np.count_nonzero(query)
    num_items = database.shape[0]
    intersections = np.empty(num_items, np.int64)
    areas = np.empty(num_items, np.int64)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, query.size))
    for start in range(0, num_items, chunk):
        masks = _binary(database[start:start + chunk], threshold, offset=start)
        masks = masks.reshape(masks.shape[0], -1)
        intersections[start:start + chunk] = np.count_nonzero(masks & query, axis=1)
        areas[start:start + chunk] = np.count_nonzero(masks, axis=1)
    totals = (areas + query_area).astype(np.float64)
    return np.divide(2.0 * intersections, totals, out=np.ones(num_items), where=totals > 0)


def _binary(masks: np.ndarray, threshold: float, offset: int | None = None) -> np.ndarray:
    """Masks thresholded to bool; NaN probabilities are refused rather than read as background.

    `offset` is the database index of the first mask in `masks`; None for the query's mask.
    """
    if masks.dtype == bool:
        return masks
    if np.issubdtype(masks.dtype, np.floating) and np.isnan(masks).any():
        if offset is None:
            place = "the query mask"
        else:
            place = f"database mask {offset + int(np.argwhere(np.isnan(masks))[0, 0])}"
        raise ValueError(f"{place} contains NaN; the segmentation model produced a non-finite "
                         "output (e.g. from a degenerate image)")
    return masks > threshold
