"""Exact search against NumPy brute force (full matrix + argsort)."""

import numpy as np
import pytest

from tfmir.index import METRICS
from tfmir.index import exact_search


def brute_force(queries, gallery, k, metric, exclude_self=False):
    """Full Q × N score matrix in float64 and a stable argsort, best first."""
    queries = np.asarray(queries, np.float64)
    gallery = np.asarray(gallery, np.float64)
    if metric == "cosine":
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    if metric == "l2":
        difference = queries[:, None, :] - gallery[None, :, :]
        scores = np.sqrt((difference**2).sum(axis=2))
        sign = 1.0  # lower is better
    else:
        scores = queries @ gallery.T
        sign = -1.0
    if exclude_self:
        np.fill_diagonal(scores, np.inf if metric == "l2" else -np.inf)
    order = np.argsort(sign * scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def assert_same_neighbours(indices, expected_indices, scores, expected_scores):
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-4)
    # Continuous random data has no ties, so the sets must be equal.
    for row, expected_row in zip(indices, expected_indices):
        assert set(row.tolist()) == set(expected_row.tolist())


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("batch_size", [7, 64, 1024])
def test_matches_brute_force(metric, batch_size):
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(50, 6)).astype("float32")
    gallery = rng.normal(size=(300, 6)).astype("float32")
    scores, indices = exact_search(queries, gallery, 10, metric=metric, batch_size=batch_size)
    assert scores.shape == indices.shape == (50, 10)
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    expected_scores, expected_indices = brute_force(queries, gallery, 10, metric)
    assert_same_neighbours(indices, expected_indices, scores, expected_scores)
    # Best first: similarities decrease, distances increase.
    steps = np.diff(scores, axis=1)
    assert np.all(steps >= -1e-6) if metric == "l2" else np.all(steps <= 1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_exclude_self(metric):
    rng = np.random.default_rng(1)
    items = rng.normal(size=(45, 5)).astype("float32")
    scores, indices = exact_search(
        items, items, 44, metric=metric, batch_size=10, exclude_self=True
    )
    assert not np.any(indices == np.arange(45)[:, None])
    expected_scores, expected_indices = brute_force(items, items, 44, metric, exclude_self=True)
    assert_same_neighbours(indices, expected_indices, scores, expected_scores)


def test_exclude_self_by_index_keeps_duplicates():
    items = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype="float32")
    scores, indices = exact_search(items, items, 1, metric="l2", exclude_self=True)
    np.testing.assert_array_equal(indices[:, 0], [1, 0, 0])
    np.testing.assert_allclose(scores[:, 0], [0.0, 0.0, np.sqrt(2.0)], rtol=1e-6)


def test_hand_example_per_metric():
    # Query (3, 4): |q| = 5. Gallery g0 = (1, 0), g1 = (0, 2), g2 = (3, 4).
    # dot: 3, 8, 25 -> order 2, 1, 0.  cosine: 0.6, 0.8, 1.0 -> order 2, 1, 0.
    # l2: sqrt(4 + 16) = 4.472, sqrt(9 + 4) = 3.606, 0 -> order 2, 1, 0.
    query = np.array([[3.0, 4.0]])
    gallery = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    expected = {
        "dot": [25.0, 8.0, 3.0],
        "cosine": [1.0, 0.8, 0.6],
        "l2": [0.0, np.sqrt(13.0), np.sqrt(20.0)],
    }
    for metric, expected_scores in expected.items():
        scores, indices = exact_search(query, gallery, 3, metric=metric)
        np.testing.assert_array_equal(indices, [[2, 1, 0]])
        np.testing.assert_allclose(scores, [expected_scores], rtol=1e-6, atol=1e-6)


def test_ties_come_in_index_order():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    _, indices = exact_search([[1.0, 0.0]], gallery, 3, metric="dot")
    np.testing.assert_array_equal(indices, [[0, 2, 3]])


def test_large_gallery_small_batches():
    rng = np.random.default_rng(2)
    gallery = rng.normal(size=(20000, 16)).astype("float32")
    queries = gallery[rng.choice(20000, size=600, replace=False)] + 0.05 * rng.normal(
        size=(600, 16)
    ).astype("float32")
    scores, indices = exact_search(queries, gallery, 5, metric="l2", batch_size=256)
    subset = np.arange(0, 600, 40)
    expected_scores, expected_indices = brute_force(queries[subset], gallery, 5, "l2")
    assert_same_neighbours(indices[subset], expected_indices, scores[subset], expected_scores)


def test_no_queries():
    scores, indices = exact_search(np.zeros((0, 3)), np.ones((4, 3)), 2)
    assert scores.shape == indices.shape == (0, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(k=0), r"k must be an integer in \[1, 4\].*k=0"),
        (dict(k=5), r"k must be an integer in \[1, 4\].*k=5"),
        (dict(k=2.0), r"k=2.0"),
        (dict(k=4, exclude_self=True), r"\[1, 3\].*exclude_self=True.*k=4"),
        (dict(k=1, metric="hamming"), r"metric must be one of .*'hamming'"),
        (dict(k=1, batch_size=0), r"batch_size=0"),
    ],
)
def test_invalid_arguments(kwargs, message):
    items = np.ones((4, 3), dtype="float32")
    with pytest.raises(ValueError, match=message):
        exact_search(items, items, **kwargs)


def test_shape_errors():
    with pytest.raises(ValueError, match=r"same dimension.*\(2, 3\).*\(4, 5\)"):
        exact_search(np.ones((2, 3)), np.ones((4, 5)), 1)
    with pytest.raises(ValueError, match=r"2-D.*queries.shape=\(3,\)"):
        exact_search(np.ones(3), np.ones((4, 3)), 1)
    with pytest.raises(ValueError, match=r"exclude_self=True.*2 queries, 4 gallery"):
        exact_search(np.ones((2, 3)), np.ones((4, 3)), 1, exclude_self=True)
