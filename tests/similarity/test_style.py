"""Style loss (eq. 6) and style score (eq. 7) against hand arithmetic and an l, i, j loop."""

import numpy as np
import pytest

import tfmir.similarity.style as style_module
from tfmir.similarity import style_losses
from tfmir.similarity import style_score

QUERY = [np.eye(2)]
# Differences from I: [[0, 1], [1, 0]] -> 1 + 1 = 2; [[0, 2], [2, 0]] -> 4 + 4 = 8;
# [[2, 0], [0, 0]] -> 4.
DATABASE = [np.array([np.eye(2), [[1.0, 1.0], [1.0, 1.0]], [[1.0, 2.0], [2.0, 1.0]],
                      [[3.0, 0.0], [0.0, 1.0]]])]


def random_grams(rng, num_items, channels):
    """N symmetric Gram matrices F^T F per layer, from random feature maps."""
    grams = []
    for num_channels in channels:
        features = rng.normal(size=(num_items, 6, num_channels))
        grams.append(np.einsum("npi,npj->nij", features, features))
    return grams


def loop_style_loss(query_grams, item_grams, weights):
    """Eq. 6 literally: Σ_l Σ_ij (β_l G^x_l,ij − β_l G^y_l,ij)²."""
    total = 0.0
    for query, item, weight in zip(query_grams, item_grams, weights):
        for i in range(query.shape[0]):
            for j in range(query.shape[1]):
                total += (weight * float(query[i, j]) - weight * float(item[i, j])) ** 2
    return total


def test_losses_and_scores_by_hand():
    losses = style_losses(QUERY, DATABASE)
    assert losses.dtype == np.float64 and losses.shape == (4,)
    np.testing.assert_array_equal(losses, [0.0, 2.0, 8.0, 4.0])
    # LS_max = 8: 1 - LS/8 = 1, 0.75, 0, 0.5.
    np.testing.assert_array_equal(style_score(QUERY, DATABASE), [1.0, 0.75, 0.0, 0.5])


def test_layer_weights_multiply_inside_the_square():
    # Layer 0 as above; layer 1 is 1×1: query 0, items 1, 0, 3, 0 -> squared 1, 0, 9, 0.
    # β = (0.5, 2): 0.25·(0, 2, 8, 4) + 4·(1, 0, 9, 0) = (4, 0.5, 38, 1).
    query = QUERY + [np.zeros((1, 1))]
    database = DATABASE + [np.array([1.0, 0.0, 3.0, 0.0]).reshape(4, 1, 1)]
    np.testing.assert_allclose(style_losses(query, database, layer_weights=[0.5, 2.0]),
                               [4.0, 0.5, 38.0, 1.0])
    np.testing.assert_allclose(style_score(query, database, layer_weights=[0.5, 2.0]),
                               [1 - 4 / 38, 1 - 0.5 / 38, 0.0, 1 - 1 / 38])


def test_losses_match_the_loop_oracle():
    rng = np.random.default_rng(0)
    channels = [2, 3, 5]
    database = random_grams(rng, 6, channels)
    query = [gram[0] for gram in random_grams(rng, 1, channels)]
    weights = [0.3, 1.0, 2.5]
    expected = [loop_style_loss(query, [gram[n] for gram in database], weights)
                for n in range(6)]
    np.testing.assert_allclose(style_losses(query, database, weights), expected, rtol=1e-12)
    expected_unweighted = [loop_style_loss(query, [gram[n] for gram in database], [1, 1, 1])
                           for n in range(6)]
    np.testing.assert_allclose(style_losses(query, database), expected_unweighted, rtol=1e-12)


def test_blocks_and_low_precision_databases_give_the_same_losses(monkeypatch):
    rng = np.random.default_rng(1)
    database = random_grams(rng, 7, [3, 4])
    query = [gram[0] for gram in random_grams(rng, 1, [3, 4])]
    whole = style_losses(query, database)
    monkeypatch.setattr(style_module, "_CHUNK_ELEMENTS", 20)  # one or two items per block
    np.testing.assert_array_equal(style_losses(query, database), whole)
    # A float32 archive is read as float64 block by block: the same as converting it first.
    database32 = [gram.astype(np.float32) for gram in database]
    np.testing.assert_array_equal(
        style_losses(query, database32),
        style_losses(query, [gram.astype(np.float64) for gram in database32]))


def test_max_loss_and_identical_database():
    # LS 0, 2, 8, 4 with LS_max 16 -> 1, 0.875, 0.5, 0.75; with 4 -> 8 clips to 0.
    np.testing.assert_array_equal(style_score(QUERY, DATABASE, max_loss=16.0),
                                  [1.0, 0.875, 0.5, 0.75])
    np.testing.assert_array_equal(style_score(QUERY, DATABASE, max_loss=4.0),
                                  [1.0, 0.5, 0.0, 0.0])
    np.testing.assert_array_equal(style_score(QUERY, [np.array([np.eye(2)] * 3)]), np.ones(3))
    with pytest.raises(ValueError, match="max_loss must be a finite number >= 0"):
        style_score(QUERY, DATABASE, max_loss=-1.0)


def test_shape_errors_name_both_sides():
    with pytest.raises(ValueError, match="same number L >= 1 of layers. Received: 2 and 1"):
        style_losses(QUERY * 2, DATABASE)
    with pytest.raises(ValueError, match=r"Received: query shapes \[\(3, 3\)\], "
                                         r"database shapes \[\(4, 2, 2\)\]"):
        style_losses([np.eye(3)], DATABASE)
    with pytest.raises(ValueError, match=r"database shapes \[\(4, 2, 2\), \(3, 1, 1\)\]"):
        style_losses(QUERY + [np.zeros((1, 1))], DATABASE + [np.zeros((3, 1, 1))])
    with pytest.raises(ValueError, match="sequences \\(one entry per layer\\), not single arrays"):
        style_losses(np.eye(2), DATABASE[0])


def test_non_finite_grams_are_named():
    with pytest.raises(ValueError, match="the query's Gram matrix of layer 0 contains NaN"):
        style_losses([np.full((2, 2), np.nan)], DATABASE)
    database = [DATABASE[0].copy()]
    database[0][3, 0, 1] = np.inf
    with pytest.raises(ValueError, match="database item 3's Gram matrix of layer 0 contains "
                                         "NaN or inf; .*all black"):
        style_score(QUERY, database)


@pytest.mark.parametrize("layer_weights",
                         [[1.0, 2.0], [-1.0], [float("nan")], "1", 1.0, [True]])
def test_bad_layer_weights(layer_weights):
    with pytest.raises(ValueError, match="layer_weights must be 1 finite numbers >= 0"):
        style_losses(QUERY, DATABASE, layer_weights)
