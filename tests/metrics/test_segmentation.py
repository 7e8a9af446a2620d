"""Dice and IoU of binary masks against hand arithmetic, empty masks included."""

import numpy as np
import pytest

from tfmir.metrics import dice_score
from tfmir.metrics import iou_score


def _masks():
    """Four 3×3 images; per-image (Dice, IoU) worked out by hand in the comments."""
    true = np.zeros((4, 3, 3), np.uint8)
    pred = np.zeros((4, 3, 3), np.uint8)
    # A: |T| = 4, |P| = 2, |T ∩ P| = 2 -> Dice 2·2/(4+2) = 2/3, IoU 2/4 = 1/2.
    true[0, :2, :2] = 1
    pred[0, 0, :2] = 1
    # B: both empty -> 1, 1 by convention.
    # C: T empty, |P| = 1 -> 0, 0.
    pred[2, 2, 2] = 1
    # D: |T| = 2, P empty -> 0, 0.
    true[3, 1, :2] = 1
    return true, pred


def test_dice_and_iou_by_hand():
    true, pred = _masks()
    assert dice_score(true, pred) == pytest.approx((2 / 3 + 1 + 0 + 0) / 4)  # 5/12
    assert iou_score(true, pred) == pytest.approx((1 / 2 + 1 + 0 + 0) / 4)  # 3/8
    # Per image, not pooled: pooled pixels would give Dice 2·2/(6+3) = 4/9 instead.
    assert dice_score(true[:1], pred[:1]) == pytest.approx(2 / 3)
    assert iou_score(true[:1], pred[:1]) == pytest.approx(1 / 2)


def test_empty_versus_empty_scores_one():
    empty = np.zeros((2, 4, 4, 1), bool)
    assert dice_score(empty, empty) == 1.0
    assert iou_score(empty, empty) == 1.0


def test_empty_versus_non_empty_scores_zero():
    true, pred = _masks()
    assert dice_score(true[2:], pred[2:]) == 0.0
    assert iou_score(true[2:], pred[2:]) == 0.0


def test_perfect_prediction_and_symmetry():
    true, pred = _masks()
    assert dice_score(true, true) == 1.0
    assert iou_score(pred, pred) == 1.0
    assert dice_score(true, pred) == dice_score(pred, true)
    assert iou_score(true, pred) == iou_score(pred, true)


def test_bool_and_channel_axis_give_the_same_scores():
    true, pred = _masks()
    assert dice_score(true.astype(bool)[..., None], pred.astype(bool)[..., None]) == pytest.approx(
        dice_score(true, pred))
    assert iou_score(true.astype(np.float32), pred.astype(np.float32)) == pytest.approx(
        iou_score(true, pred))


def test_dice_matches_a_numpy_loop_on_random_masks():
    rng = np.random.default_rng(0)
    true = rng.random((20, 5, 5)) < 0.3
    pred = rng.random((20, 5, 5)) < 0.3
    pred[3] = False
    true[3] = False  # one empty-vs-empty image
    dices, ious = [], []
    for t, p in zip(true, pred):
        intersection, union = np.sum(t & p), np.sum(t | p)
        total = t.sum() + p.sum()
        dices.append(1.0 if total == 0 else 2 * intersection / total)
        ious.append(1.0 if union == 0 else intersection / union)
    assert dice_score(true, pred) == pytest.approx(np.mean(dices))
    assert iou_score(true, pred) == pytest.approx(np.mean(ious))


def test_errors():
    with pytest.raises(ValueError, match=r"y_pred must be a binary mask.*threshold probabilities "
                                         r"first.*\[0\.7\]"):
        dice_score(np.zeros((1, 2, 2)), np.full((1, 2, 2), 0.7))
    with pytest.raises(ValueError, match=r"same shape.*\(1, 2, 2\).*\(1, 2, 3\)"):
        iou_score(np.zeros((1, 2, 2)), np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match=r"N >= 1 images.*\(0, 2, 2\)"):
        dice_score(np.zeros((0, 2, 2)), np.zeros((0, 2, 2)))
    with pytest.raises(ValueError, match=r"\(N, \.\.\.\).*\(4,\)"):
        dice_score(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match=r"y_true must be bool or numeric"):
        dice_score(np.array([["a"]]), np.zeros((1, 1)))
