"""Packed Gram storage: layout by hand, round trips, equality with the full style loss."""

import math

import numpy as np
import pytest

import tfmir.similarity.gram_storage as storage_module
from tfmir.similarity import pack_grams
from tfmir.similarity import packed_size
from tfmir.similarity import style_losses
from tfmir.similarity import style_losses_packed
from tfmir.similarity import unpack_grams

SQRT2 = math.sqrt(2.0)
FLOAT16_UNIT_ROUNDOFF = 2.0**-11


def random_grams(rng, num_items, channels, positions=6):
    """N symmetric Gram matrices per layer, F^T F / positions of random feature maps."""
    grams = []
    for num_channels in channels:
        features = rng.normal(size=(num_items, positions, num_channels))
        grams.append(np.einsum("npi,npj->nij", features, features) / positions)
    return grams


def realistic_grams(rng, num_items, channels, positions=144):
    """Grams of correlated, offset features normalised by H·W (GramMatrix's convention).

    Entries reach ~20 with a median ~0.5, like EfficientNet block outputs after BN.
    """
    grams = []
    for num_channels in channels:
        mixing = rng.normal(size=(num_channels, num_channels)) / math.sqrt(num_channels)
        features = (rng.normal(size=(num_items, positions, num_channels)) @ mixing
                    + rng.normal(size=(num_items, 1, num_channels)))
        grams.append(np.einsum("npi,npj->nij", features, features) / positions)
    return grams


def test_packed_size():
    assert packed_size([2, 3]) == 3 + 6
    assert packed_size([32, 40]) == 32 * 33 // 2 + 40 * 41 // 2 == 1348
    for channels in ([], [0], [2.0], "3", 3):
        with pytest.raises(ValueError, match="channels must be a non-empty sequence of integers"):
            packed_size(channels)


def test_layout_by_hand():
    # Layer 0: [[1, 2], [2, 3]] -> G00, sqrt(2)·G01, G11; layer 1: [[5]] -> 5.
    grams = [np.array([[[1.0, 2.0], [2.0, 3.0]]]), np.array([[[5.0]]])]
    np.testing.assert_allclose(pack_grams(grams, dtype="float64"), [[1.0, 2 * SQRT2, 3.0, 5.0]])
    # β = (0.5, 2) multiplies each layer's entries.
    np.testing.assert_allclose(pack_grams(grams, layer_weights=[0.5, 2.0], dtype="float64"),
                               [[0.5, SQRT2, 1.5, 10.0]])
    packed = pack_grams(grams)
    assert packed.dtype == np.float16 and packed.shape == (1, packed_size([2, 1]))


def test_squared_distance_of_packed_rows_is_the_style_loss():
    # The identity the storage exists for, checked with plain NumPy against the full loss.
    rng = np.random.default_rng(0)
    grams = random_grams(rng, 5, [2, 3, 4])
    weights = [0.5, 1.0, 3.0]
    packed = pack_grams(grams, weights, dtype="float64")
    for x in range(5):
        expected = style_losses([gram[x] for gram in grams], grams, weights)
        np.testing.assert_allclose(((packed[x] - packed) ** 2).sum(-1), expected,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-13), ("float32", 1e-6)])
def test_round_trip(dtype, rtol):
    rng = np.random.default_rng(1)
    grams = random_grams(rng, 4, [3, 5])
    packed = pack_grams(grams, [0.5, 2.0], dtype=dtype)
    assert packed.dtype == np.dtype(dtype) and packed.shape == (4, 6 + 15)
    restored = unpack_grams(packed, [3, 5], [0.5, 2.0])
    for gram, back in zip(grams, restored):
        assert back.dtype == np.float64 and back.shape == gram.shape
        np.testing.assert_allclose(back, gram, rtol=rtol, atol=rtol)
        np.testing.assert_array_equal(back, back.transpose(0, 2, 1))


def test_float32_packed_losses_equal_full_losses():
    rng = np.random.default_rng(2)
    channels = [4, 8, 16]
    database = random_grams(rng, 20, channels)
    query = [gram[0] for gram in random_grams(rng, 1, channels)]
    weights = [1.0, 0.5, 0.25]
    expected = style_losses(query, database, weights)
    query_packed = pack_grams([gram[None] for gram in query], weights, dtype="float64")[0]
    packed = pack_grams(database, weights, dtype="float32")
    np.testing.assert_allclose(style_losses_packed(query_packed, packed), expected, rtol=1e-6)


def test_float16_error_stays_within_the_documented_bounds():
    rng = np.random.default_rng(3)
    channels = [32, 40, 72]
    database = realistic_grams(rng, 60, channels)
    query = [gram[0] for gram in realistic_grams(rng, 1, channels)]
    expected = style_losses(query, database)
    query_packed = pack_grams([gram[None] for gram in query], dtype="float64")[0]
    losses = style_losses_packed(query_packed, pack_grams(database))
    # The module docstring's measurement for these channels: at most 4e-5 between unrelated
    # images.
    assert np.max(np.abs(losses - expected) / expected) < 1e-4
    # And the worst-case bound 2u‖y‖sqrt(LS) + u²‖y‖², y the exact packed database row.
    norms = np.linalg.norm(pack_grams(database, dtype="float64"), axis=1)
    bound = (2 * FLOAT16_UNIT_ROUNDOFF * norms * np.sqrt(expected)
             + FLOAT16_UNIT_ROUNDOFF**2 * norms**2)
    assert np.all(np.abs(losses - expected) <= bound)
    # Near-duplicates: a large relative error of a tiny loss, but the score barely moves.
    near = [gram[:1] + 1e-3 * other[:30]
            for gram, other in zip(database, realistic_grams(rng, 30, channels))]
    mixed = [np.concatenate([a, b]) for a, b in zip(near, database)]
    query = [gram[0] for gram in database]
    expected = style_losses(query, mixed)
    query_packed = pack_grams([gram[None] for gram in query], dtype="float64")[0]
    losses = style_losses_packed(query_packed, pack_grams(mixed))
    score_error = np.abs((1 - losses / losses.max()) - (1 - expected / expected.max()))
    assert score_error.max() < 1e-4  # measured: at most 5e-5


def test_blocks_give_the_same_result(monkeypatch):
    rng = np.random.default_rng(4)
    grams = random_grams(rng, 9, [3, 4])
    packed = pack_grams(grams, dtype="float32")
    losses = style_losses_packed(packed[0].astype(np.float64), packed)
    monkeypatch.setattr(storage_module, "_CHUNK_ELEMENTS", 30)  # about two items per block
    np.testing.assert_array_equal(pack_grams(grams, dtype="float32"), packed)
    np.testing.assert_array_equal(style_losses_packed(packed[0].astype(np.float64), packed),
                                  losses)


def test_float16_overflow_is_refused():
    gram = np.array([[[70000.0, 0.0], [0.0, 1.0]]])
    with pytest.raises(ValueError, match=r"reach 7e\+04 \(layer 0, item 0\), above float16's "
                                         r"largest finite value 65504; pack with "
                                         r"dtype='float32'"):
        pack_grams([gram])
    # Off-diagonal entries are multiplied by sqrt(2): 50000 -> 70711 overflows too.
    gram = np.array([[[1.0, 50000.0], [50000.0, 1.0]]])
    with pytest.raises(ValueError, match="above float16's largest finite value"):
        pack_grams([gram])
    packed = pack_grams([gram], dtype="float32")
    assert np.all(np.isfinite(packed))


def test_bad_grams_are_refused():
    grams = [np.array([np.eye(2), np.eye(2)])]
    grams[0][1, 0, 1] = np.nan
    with pytest.raises(ValueError, match="item 1's Gram matrix of layer 0 contains NaN or inf"):
        pack_grams(grams)
    with pytest.raises(ValueError, match=r"item 0's Gram matrix of layer 0 is not symmetric"):
        pack_grams([np.array([[[1.0, 2.0], [0.0, 1.0]]])])
    with pytest.raises(ValueError, match=r"with the same N >= 1. Received shapes: "
                                         r"\[\(2, 2, 2\), \(3, 1, 1\)\]"):
        pack_grams([np.zeros((2, 2, 2)), np.zeros((3, 1, 1))])
    with pytest.raises(ValueError, match="grams must be a sequence of L arrays"):
        pack_grams(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match=r"dtype must be one of \('float16', 'float32', "
                                         r"'float64'\). Received: dtype='int8'"):
        pack_grams([np.zeros((1, 2, 2))], dtype="int8")


def test_packed_loss_errors():
    with pytest.raises(ValueError, match=r"query_packed.shape=\(3,\), "
                                         r"database_packed.shape=\(2, 4\)"):
        style_losses_packed(np.zeros(3), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="the query's packed Grams contain NaN or inf"):
        style_losses_packed(np.full(3, np.nan), np.zeros((2, 3)))
    database = np.zeros((3, 3), np.float16)
    database[2, 1] = np.inf
    with pytest.raises(ValueError, match="database item 2's packed Grams contain NaN or inf"):
        style_losses_packed(np.zeros(3), database)


def test_unpack_errors():
    with pytest.raises(ValueError, match=r"packed must have shape \(N, 9\) for "
                                         r"channels=\[2, 3\]. Received: packed.shape=\(1, 8\)"):
        unpack_grams(np.zeros((1, 8)), [2, 3])
    with pytest.raises(ValueError, match="layer_weights must all be > 0 to unpack"):
        unpack_grams(np.zeros((1, 3)), [2], layer_weights=[0.0])
