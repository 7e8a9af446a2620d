"""Exact search against NumPy brute force (full matrix + argsort)."""

import numpy as np
import pytest

import tfmir.index.exact as exact_module
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


def integer_vectors(rng, count, dimension):
    """Entries in {-1, 0, 1}: every dot product and squared distance is a small integer, exact in
    float32 whatever the summation order, so equal scores are equal in faiss and in the oracle."""
    return rng.integers(-1, 2, size=(count, dimension)).astype("float32")


@pytest.mark.parametrize("metric", ["dot", "l2"])
@pytest.mark.parametrize("k", [1, 7, 150])
def test_ties_come_in_index_order_with_many_ties(metric, k):
    # 12,000 items of 6 values in {-1, 0, 1}: hundreds share each score, so ties straddle the
    # k-th place. faiss's own order among ties is not row order: for inner products it keeps
    # the later rows, and for one query over 10,000+ items its split-database path mixes them
    # (faiss 1.15: 30/30 and 7/30 such queries out of row order, for dot and l2 at k = 7).
    rng = np.random.default_rng(5)
    gallery = integer_vectors(rng, 12_000, 6)
    queries = integer_vectors(rng, 30, 6)
    expected_scores, expected_indices = brute_force(queries, gallery, k, metric)
    scores, indices = exact_search(queries, gallery, k, metric=metric, batch_size=4)
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)
    for position in (0, 17):
        scores, indices = exact_search(queries[position:position + 1], gallery, k, metric=metric)
        np.testing.assert_array_equal(indices, expected_indices[position:position + 1])


@pytest.mark.parametrize("num_bits", [36, 64])
def test_exclude_self_ties_of_sign_codes(num_bits):
    # As the hash-code evaluators search: ±1 codes with "dot" (= bits - 2 × Hamming distance),
    # integer scores with many ties, every item a query that must not find itself.
    rng = np.random.default_rng(num_bits)
    codes = np.where(rng.random((400, num_bits)) < 0.5, 1.0, -1.0).astype("float32")
    codes[200:260] = codes[:60]  # duplicates: another item scores as high as the query itself
    expected_scores, expected_indices = brute_force(codes, codes, 25, "dot", exclude_self=True)
    for batch_size in (1, 1024):
        scores, indices = exact_search(
            codes, codes, 25, metric="dot", batch_size=batch_size, exclude_self=True
        )
        np.testing.assert_array_equal(indices, expected_indices)
        np.testing.assert_array_equal(scores, expected_scores)


def test_ties_past_every_candidate_are_searched_again_in_batches(monkeypatch):
    # Query (1, 0) scores 2 on rows 500, 700, 950 and 1 on the other 897 of rows 0-899:
    # the 4th to 10th places tie with 890 more, so the candidates are fetched again, 4 times
    # more each round (11, 44, 176, 704), up to the whole gallery. Query (0, 1) scores 1 on
    # rows 900-999 and 0 elsewhere: resolved once 176 are fetched (the last one scores 0).
    gallery = np.zeros((1000, 2), dtype="float32")
    gallery[:900, 0] = 1.0
    gallery[[500, 700, 950], 0] = 2.0
    gallery[900:, 1] = 1.0
    queries = np.array([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 2, dtype="float32")
    calls = []
    knn = exact_module.faiss.knn

    def recording_knn(xq, xb, k, metric):
        calls.append((len(xq), k))
        return knn(xq, xb, k, metric)

    monkeypatch.setattr(exact_module.faiss, "knn", recording_knn)
    batch_size = 2
    scores, indices = exact_search(queries, gallery, 10, metric="dot", batch_size=batch_size)
    expected_scores, expected_indices = brute_force(queries, gallery, 10, "dot")
    np.testing.assert_array_equal(indices, expected_indices)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(indices[0], [500, 700, 950, 0, 1, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(indices[5], np.arange(900, 910))
    # Every query once with k + 1 candidates; then only the unresolved ones, never more than
    # batch_size × N candidates at once: 7 and 7 queries, then 5 (2 + 2 + 1) twice.
    assert calls == [(7, 11), (7, 44), (7, 176)] + [(2, 704), (2, 704), (1, 704)] + [
        (2, 1000), (2, 1000), (1, 1000)]
    assert all(count * fetched <= batch_size * len(gallery) for count, fetched in calls[1:])


def test_a_few_queries_over_a_large_gallery_are_padded_to_a_blas_block(monkeypatch):
    # faiss scores fewer than distance_compute_blas_threshold values (1,000 queries of 128) one
    # query at a time; over a gallery past the caches, from 1/8 of that on, zero rows fill the
    # block. The gallery size limit is lowered so that a small gallery counts as large.
    calls = []
    knn = exact_module.faiss.knn

    def recording_knn(xq, xb, k, metric):
        calls.append(len(xq))
        return knn(xq, xb, k, metric)

    monkeypatch.setattr(exact_module.faiss, "knn", recording_knn)
    rng = np.random.default_rng(8)
    gallery = rng.normal(size=(500, 128)).astype("float32")
    block = -(-exact_module.faiss.cvar.distance_compute_blas_threshold // 128)
    for large, num_queries in [(False, block // 2), (True, 1), (True, block // 8 + 1),
                               (True, block - 1), (True, block + 3)]:
        monkeypatch.setattr(exact_module, "_CACHED_GALLERY_BYTES", 0 if large else 1 << 30)
        queries = rng.normal(size=(num_queries, 128)).astype("float32")
        for metric in ("cosine", "l2"):
            scores, indices = exact_search(queries, gallery, 5, metric=metric)
            expected_scores, expected_indices = brute_force(queries, gallery, 5, metric)
            assert_same_neighbours(indices, expected_indices, scores, expected_scores)
    assert calls == [block // 2] * 2 + [1] * 2 + [block] * 4 + [block + 3] * 2


def test_nan_is_refused():
    gallery = np.ones((5, 3), dtype="float32")
    with pytest.raises(ValueError, match="NaN"):
        exact_search(np.full((1, 3), np.nan), gallery, 2, metric="dot")
