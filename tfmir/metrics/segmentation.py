"""Overlap of binary segmentation masks: Dice and IoU, per image then averaged.

Both functions take binary masks (bool or {0, 1}); threshold predicted probabilities
first. Each image is scored on its own and the scores are averaged, so a small lesion
counts as much as a large one (pooling all pixels would let large masks dominate).

An image whose true and predicted masks are both empty scores 1.0: the prediction
"nothing here" is exactly right, and 0/0 must not turn a perfect answer into a
failure or a NaN. An empty mask against a non-empty one scores 0.0.
"""

import numpy as np


def dice_score(y_true, y_pred) -> float:
    """Mean over images of the Dice coefficient 2|T ∩ P| / (|T| + |P|).

    Args:
        y_true: Ground-truth binary masks (bool or {0, 1}), shape (N, ...), e.g.
            (N, H, W) or (N, H, W, 1). Every axis after the first belongs to one image.
        y_pred: Predicted binary masks, same shape.

    Returns:
        Dice in [0, 1]; an image with both masks empty scores 1.0.

    Example:

    >>> dice_score([[1, 1, 0, 0]], [[1, 0, 0, 0]])  # 2·1 / (2 + 1)
    0.6666666666666666

    Reference:
        Dice, "Measures of the Amount of Ecologic Association Between Species",
        Ecology 26(3), 1945 — the Sørensen-Dice coefficient of Sec. 2.4 of "Exploring
        Content Based Image Retrieval for Highly Imbalanced Melanoma Data using Style
        Transfer, Semantic Image Segmentation and Ensemble Learning".
    """
    intersection, true_area, predicted_area = _overlap_counts(y_true, y_pred)
    return _mean_ratio(2 * intersection, true_area + predicted_area)


def iou_score(y_true, y_pred) -> float:
    """Mean over images of the intersection over union |T ∩ P| / |T ∪ P| (Jaccard index).

    Args:
        y_true: Ground-truth binary masks (bool or {0, 1}), shape (N, ...).
        y_pred: Predicted binary masks, same shape.

    Returns:
        IoU in [0, 1]; an image with both masks empty scores 1.0.

    Example:

    >>> iou_score([[1, 1, 0, 0]], [[1, 0, 0, 1]])  # 1 / 3
    0.3333333333333333

    Reference:
        Jaccard, "The Distribution of the Flora in the Alpine Zone", New Phytologist
        11(2), 1912.
    """
    intersection, true_area, predicted_area = _overlap_counts(y_true, y_pred)
    return _mean_ratio(intersection, true_area + predicted_area - intersection)


def _overlap_counts(y_true, y_pred):
    """Per image: (|T ∩ P|, |T|, |P|) as int64 arrays of shape (N,)."""
    y_true = _as_binary(y_true, "y_true")
    y_pred = _as_binary(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(
            "y_true and y_pred must have the same shape. "
            f"Received: y_true.shape={y_true.shape}, y_pred.shape={y_pred.shape}"
        )
    if y_true.ndim < 2 or y_true.shape[0] == 0:
        raise ValueError(
            "masks must have shape (N, ...) with N >= 1 images. "
            f"Received: y_true.shape={y_true.shape}"
        )
    y_true = y_true.reshape(y_true.shape[0], -1)
    y_pred = y_pred.reshape(y_pred.shape[0], -1)
    intersection = np.count_nonzero(y_true & y_pred, axis=1)
    return intersection, np.count_nonzero(y_true, axis=1), np.count_nonzero(y_pred, axis=1)


def _mean_ratio(numerators, denominators) -> float:
    # A zero denominator means both masks are empty: a perfect prediction (module docstring).
    ratios = np.divide(
        numerators, denominators, out=np.ones(numerators.shape, np.float64), where=denominators > 0
    )
    return float(np.mean(ratios))


def _as_binary(masks, name):
    masks = np.asarray(masks)
    if masks.dtype == bool:
        return masks
    if not np.issubdtype(masks.dtype, np.number):
        raise ValueError(f"{name} must be bool or numeric. Received: {name}.dtype={masks.dtype}")
    is_one = masks == 1
    if not np.all(is_one | (masks == 0)):
        bad = np.unique(masks[~(is_one | (masks == 0))])
        raise ValueError(
            f"{name} must be a binary mask (bool or 0/1); threshold probabilities first. "
            f"Received values such as: {bad[:5].tolist()}"
        )
    return is_one
