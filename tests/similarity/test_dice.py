"""Dice coefficient of masks (eq. 8): hand arithmetic, empty masks, thresholds, a pixel loop."""

import warnings

import numpy as np
import pytest

import tfmir.similarity.dice as dice_module
from tfmir.similarity import dice_coefficient

QUERY = np.array([[1, 1], [0, 0]])  # |X| = 2


def test_dice_by_hand():
    database = np.array([
        [[1, 0], [0, 0]],  # |Y| = 1, |X ∩ Y| = 1 -> 2/3
        [[0, 0], [1, 1]],  # disjoint -> 0
        [[1, 1], [0, 0]],  # identical -> 1
        [[1, 1], [1, 1]],  # |Y| = 4, |X ∩ Y| = 2 -> 4/6
    ])
    scores = dice_coefficient(QUERY, database)
    assert scores.dtype == np.float64 and scores.shape == (4,)
    np.testing.assert_allclose(scores, [2 / 3, 0.0, 1.0, 2 / 3])


def test_empty_masks():
    empty = np.zeros((2, 2))
    # Both empty: "no lesion" twice is perfect agreement -> 1; one empty -> 0, either way round.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(dice_coefficient(empty, [empty, QUERY]), [1.0, 0.0])
        np.testing.assert_array_equal(dice_coefficient(QUERY, [empty]), [0.0])


def test_probabilities_are_binarised_above_the_threshold():
    query = np.array([[0.9, 0.6], [0.3, 0.5]])
    database = np.array([[[0.9, 0.2], [0.4, 0.5]]])
    # At 0.5 (strictly above): X = {00, 01}, Y = {00} -> 2·1 / (2 + 1) = 2/3; 0.5 is background.
    np.testing.assert_allclose(dice_coefficient(query, database), [2 / 3])
    # At 0.25: X = {00, 01, 10, 11}, Y = {00, 10, 11} -> 2·3 / (4 + 3) = 6/7.
    np.testing.assert_allclose(dice_coefficient(query, database, threshold=0.25), [6 / 7])
    # At 0.95 both are empty -> 1.
    np.testing.assert_array_equal(dice_coefficient(query, database, threshold=0.95), [1.0])


def test_channel_axis_and_bool_masks_give_the_same_scores():
    rng = np.random.default_rng(0)
    query = rng.uniform(size=(5, 4))
    database = rng.uniform(size=(6, 5, 4))
    expected = dice_coefficient(query, database)
    np.testing.assert_array_equal(dice_coefficient(query[..., None], database[..., None]),
                                  expected)
    np.testing.assert_array_equal(dice_coefficient(query > 0.5, database > 0.5), expected)


def test_dice_matches_a_pixel_loop(monkeypatch):
    rng = np.random.default_rng(1)
    query = rng.uniform(size=(4, 5)) ** 2
    database = rng.uniform(size=(7, 4, 5)) ** 3
    database[2] = 0.0  # one empty mask against a non-empty query
    expected = []
    for mask in database:
        both = sum(1 for q, d in zip(query.flat, mask.flat) if q > 0.5 and d > 0.5)
        total = sum(1 for q in query.flat if q > 0.5) + sum(1 for d in mask.flat if d > 0.5)
        expected.append(2 * both / total if total else 1.0)
    np.testing.assert_allclose(dice_coefficient(query, database), expected, rtol=1e-15)
    monkeypatch.setattr(dice_module, "_CHUNK_ELEMENTS", 40)  # two masks per block
    np.testing.assert_allclose(dice_coefficient(query, database), expected, rtol=1e-15)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"same height and width. Received: "
                                         r"query_mask.shape=\(2, 2\), "
                                         r"database_masks.shape=\(1, 3, 3\)"):
        dice_coefficient(QUERY, np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match=r"query_mask must be \(H, W\) or \(H, W, 1\).*"
                                         r"database_masks.shape=\(2, 2\)"):
        dice_coefficient(QUERY, QUERY)


def test_nan_masks_and_bad_threshold():
    database = np.zeros((3, 2, 2))
    database[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="database mask 1 contains NaN"):
        dice_coefficient(QUERY, database)
    with pytest.raises(ValueError, match="the query mask contains NaN"):
        dice_coefficient(np.full((2, 2), np.nan), np.zeros((1, 2, 2)))
    for threshold in (0.0, 1.0, float("nan"), True):
        with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
            dice_coefficient(QUERY, database, threshold=threshold)
