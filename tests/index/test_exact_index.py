"""ExactIndex against NumPy brute force (full float64 score matrix + stable argsort)."""

import numpy as np
import pytest

from tfmir.index import METRICS
from tfmir.index import ExactIndex
from tfmir.index import Index


def brute_force(queries, gallery, k, metric):
    queries = np.asarray(queries, np.float64)
    gallery = np.asarray(gallery, np.float64)
    if metric == "cosine":
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    if metric == "l2":
        scores = np.sqrt(((queries[:, None, :] - gallery[None, :, :]) ** 2).sum(axis=2))
        order = np.argsort(scores, axis=1, kind="stable")[:, :k]
    else:
        scores = queries @ gallery.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("batch_size", [7, 1024])
def test_matches_brute_force(metric, batch_size):
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(300, 6)).astype("float32")
    queries = rng.normal(size=(40, 6)).astype("float32")
    index = ExactIndex(metric=metric, dimension=6, batch_size=batch_size)
    index.build(gallery[:100], ids=range(100)).add(gallery[100:], ids=range(100, 300))
    scores, rows = index.search_arrays(queries, k=10)
    expected_scores, expected_rows = brute_force(queries, gallery, 10, metric)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-4)
    # Continuous random data has no ties: the same neighbours in the same order.
    np.testing.assert_array_equal(rows, expected_rows)
    hits = index.search(queries[:1], k=3)[0]
    assert [hit["id"] for hit in hits] == expected_rows[0, :3].tolist()


def test_hand_example():
    # Query (3, 4). Gallery a = (1, 0), b = (0, 2), c = (6, 8).
    # cosine: 0.6, 0.8, 1.0; dot: 3, 8, 50; l2: sqrt(4 + 16), sqrt(9 + 4), sqrt(9 + 16) = 5.
    gallery = np.array([[1.0, 0.0], [0.0, 2.0], [6.0, 8.0]])
    expected = {
        "cosine": (["c", "b", "a"], [1.0, 0.8, 0.6]),
        "dot": (["c", "b", "a"], [50.0, 8.0, 3.0]),
        "l2": (["b", "a", "c"], [np.sqrt(13.0), np.sqrt(20.0), 5.0]),
    }
    for metric, (ids, scores) in expected.items():
        index = ExactIndex(metric=metric, dimension=2).build(gallery, ids=["a", "b", "c"])
        hits = index.search([[3.0, 4.0]], k=3)[0]
        assert [hit["id"] for hit in hits] == ids
        np.testing.assert_allclose([hit["score"] for hit in hits], scores, rtol=1e-6)


def test_ties_come_in_row_order():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    index = ExactIndex(metric="dot", dimension=2).build(gallery, ids=["w", "x", "y", "z"])
    assert [hit["id"] for hit in index.search([[1.0, 0.0]], k=3)[0]] == ["w", "y", "z"]


def test_cosine_vectors_are_stored_normalised(tmp_path):
    index = ExactIndex(metric="cosine", dimension=2).build([[3.0, 4.0], [0.0, 0.0]], ids=[0, 1])
    path = index.save(tmp_path / "exact")
    stored = np.load(path / "vectors.npy")
    np.testing.assert_allclose(stored, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
    # A zero vector scores 0 against anything, as in exact_search.
    scores, rows = Index.load(path).search_arrays([[1.0, 0.0]], k=2)
    np.testing.assert_allclose(scores, [[0.6, 0.0]], rtol=1e-6)


def test_batch_size_is_validated_and_recorded(tmp_path):
    with pytest.raises(ValueError, match="batch_size=0"):
        ExactIndex(dimension=2, batch_size=0)
    path = ExactIndex(dimension=2, batch_size=16).build(np.eye(2), ids=[0, 1]).save(tmp_path / "e")
    assert Index.load(path).settings == {"batch_size": 16}


@pytest.mark.parametrize("metric", ["dot", "l2"])
def test_many_ties_come_in_row_order_after_add_and_load(metric, tmp_path):
    # Entries in {-1, 0, 1}: integer scores, exact in float32 and float64, hundreds of items
    # sharing each one; 12,000 items take faiss's split-database path for a single query.
    rng = np.random.default_rng(7)
    gallery = rng.integers(-1, 2, size=(12_000, 5)).astype("float32")
    queries = rng.integers(-1, 2, size=(20, 5)).astype("float32")
    index = ExactIndex(metric=metric, dimension=5, batch_size=3)
    index.build(gallery[:5000], ids=range(5000)).add(gallery[5000:], ids=range(5000, 12_000))
    expected_scores, expected_rows = brute_force(queries, gallery, 12, metric)
    loaded = Index.load(index.save(tmp_path / "exact"))
    for searched in (index, loaded):
        scores, rows = searched.search_arrays(queries, k=12)
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)
        scores, rows = searched.search_arrays(queries[3], k=12)
        np.testing.assert_array_equal(rows, expected_rows[3:4])
