"""ScannIndex against exact search: recall@10 and the true scores of the returned items.

ANN results are compared by recall and by distance, never by index order. The
data is small (5,000 × 32 clustered vectors), so every configuration is forced
with `mode=...` rather than reached by size; the size rules are checked on
`plan_for`, which builds nothing.
"""

import json

import numpy as np
import pytest

from tfmir.index import METRICS
from tfmir.index import ExactIndex
from tfmir.index import Index
from tfmir.index import ScannIndex

NUM_ITEMS, DIMENSION, K = 5000, 32, 10


@pytest.fixture(scope="module")
def clustered():
    """50 Gaussian clusters; queries are fresh points from the same clusters."""
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, DIMENSION))
    items = centers[rng.integers(0, 50, NUM_ITEMS)] + 0.4 * rng.normal(size=(NUM_ITEMS, DIMENSION))
    queries = centers[rng.integers(0, 50, 100)] + 0.4 * rng.normal(size=(100, DIMENSION))
    return items.astype("float32"), queries.astype("float32")


def true_scores(queries, items, rows, metric):
    """Float64 score of every (query, returned row) pair, computed directly."""
    queries = np.asarray(queries, np.float64)
    chosen = np.asarray(items, np.float64)[rows]  # (Q, k, D)
    if metric == "cosine":
        queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        chosen = chosen / np.linalg.norm(chosen, axis=2, keepdims=True)
    if metric == "l2":
        return np.sqrt(((chosen - queries[:, None, :]) ** 2).sum(axis=2))
    return np.einsum("qkd,qd->qk", chosen, queries)


def recall(rows, exact_rows):
    pairs = zip(rows.tolist(), exact_rows.tolist())
    return np.mean([len(set(found) & set(exact)) / len(exact) for found, exact in pairs])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("mode", ["brute_force", "asymmetric_hashing", "tree"])
def test_recall_and_scores_against_exact(clustered, metric, mode):
    items, queries = clustered
    index = ScannIndex(metric=metric, dimension=DIMENSION, mode=mode)
    index.build(items, ids=range(NUM_ITEMS))
    assert index.plan["mode"] == mode
    scores, rows = index.search_arrays(queries, k=K)
    exact = ExactIndex(metric=metric, dimension=DIMENSION).build(items, ids=range(NUM_ITEMS))
    exact_scores, exact_rows = exact.search_arrays(queries, k=K)

    assert rows.shape == scores.shape == (100, K) and rows.dtype == np.int64
    assert recall(rows, exact_rows) >= (0.99 if mode == "brute_force" else 0.9)
    # Scores are the true scores of the returned items (rescored exactly, l2 square-rooted).
    expected = true_scores(queries, items, rows, metric)
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-3)
    # Best first, on the same scale as exact search.
    steps = np.diff(scores, axis=1)
    assert np.all(steps >= -1e-4) if metric == "l2" else np.all(steps <= 1e-4)
    same_best = np.isclose(scores[:, 0], exact_scores[:, 0], rtol=1e-3, atol=1e-3)
    assert np.mean(same_best) >= (1.0 if mode == "brute_force" else 0.9)


def test_plan_follows_the_size_rules():
    index = ScannIndex(dimension=8)
    assert index.plan_for(19_999)["mode"] == "brute_force"
    assert index.plan_for(20_000) == {
        "mode": "asymmetric_hashing",
        "trained_count": 20_000,
        "upserted_count": 0,
        "training_sample_size": 20_000,
    }
    # √100,000 = 316.2 leaves, ceil(5 %) = 16 searched.
    plan = index.plan_for(100_000)
    assert (plan["mode"], plan["num_leaves"], plan["num_leaves_to_search"]) == ("tree", 316, 16)
    assert plan["training_sample_size"] == 100_000
    plan = index.plan_for(1_000_000)
    assert (plan["num_leaves"], plan["num_leaves_to_search"]) == (1000, 50)
    assert plan["training_sample_size"] == 250_000
    custom = ScannIndex(dimension=8, brute_force_threshold=10, tree_threshold=50, num_leaves=20)
    assert [custom.plan_for(n)["mode"] for n in (9, 10, 49, 50)] == [
        "brute_force", "asymmetric_hashing", "asymmetric_hashing", "tree"
    ]
    assert custom.plan_for(60)["num_leaves"] == 20


@pytest.mark.parametrize("num_leaves", [None, 500])
def test_tree_never_has_more_leaves_than_points(num_leaves):
    rng = np.random.default_rng(1)
    items = rng.normal(size=(50, 8)).astype("float32")
    index = ScannIndex(metric="l2", dimension=8, mode="tree", num_leaves=num_leaves)
    index.build(items, ids=range(50))
    assert index.plan["num_leaves"] == (7 if num_leaves is None else 50)
    assert index.plan["num_leaves_to_search"] <= index.plan["num_leaves"]
    # k = 20 is more than the searched leaves can hold for some queries (for all
    # of them with one point per leaf): those queries are answered exactly.
    scores, rows = index.search_arrays(items[:5], k=20)
    assert all(len(set(row)) == 20 for row in rows.tolist())
    np.testing.assert_allclose(scores, true_scores(items[:5], items, rows, "l2"), atol=1e-2)
    if num_leaves == 500:
        exact = ExactIndex(metric="l2", dimension=8).build(items, ids=range(50))
        np.testing.assert_array_equal(rows, exact.search_arrays(items[:5], k=20)[1])


def test_add_upserts_then_rebuilds_when_the_plan_changes(clustered):
    items, queries = clustered
    index = ScannIndex(metric="dot", dimension=DIMENSION, brute_force_threshold=3000)
    index.build(items[:2000], ids=range(2000))
    assert index.plan["mode"] == "brute_force"
    index.add(items[2000:2900], ids=range(2000, 2900))
    # Still brute force at 2,900 items: ScaNN's upsert, no retraining.
    assert index.plan == {"mode": "brute_force", "trained_count": 2000, "upserted_count": 900}
    exact = ExactIndex(metric="dot", dimension=DIMENSION)
    exact.build(items[:2900], ids=range(2900))
    np.testing.assert_allclose(
        index.search_arrays(queries, K)[0], exact.search_arrays(queries, K)[0], rtol=1e-4
    )
    # Crossing 3,000 items changes the plan to hashing: rebuilt from all vectors.
    index.add(items[2900:3500], ids=range(2900, 3500))
    assert index.plan["mode"] == "asymmetric_hashing"
    assert (index.plan["trained_count"], index.plan["upserted_count"]) == (3500, 0)
    exact.add(items[2900:3500], ids=range(2900, 3500))
    assert recall(index.search_arrays(queries, K)[1], exact.search_arrays(queries, K)[1]) >= 0.9
    # Hashing: upsert until the index outgrows rebuild_growth_factor × its training size.
    index.add(items[3500:4000], ids=range(3500, 4000))
    assert (index.plan["trained_count"], index.plan["upserted_count"]) == (3500, 500)


def test_outgrowing_the_training_size_rebuilds(clustered):
    items, _ = clustered
    index = ScannIndex(dimension=DIMENSION, mode="tree", rebuild_growth_factor=1.5)
    index.build(items[:1000], ids=range(1000)).add(items[1000:1400], ids=range(1000, 1400))
    assert (index.plan["trained_count"], index.plan["upserted_count"]) == (1000, 400)
    index.add(items[1400:1600], ids=range(1400, 1600))
    assert (index.plan["trained_count"], index.plan["num_leaves"]) == (1600, 40)


@pytest.mark.parametrize("mode", ["brute_force", "tree"])
def test_save_load_then_add(clustered, tmp_path, mode):
    items, queries = clustered
    index = ScannIndex(
        metric="cosine",
        dimension=DIMENSION,
        mode=mode,
        model_fingerprint="m1",
        leaves_to_search_fraction=0.1,  # 6 of 55 leaves
    )
    index.build(items[:3000], ids=[f"item-{i}" for i in range(3000)])
    before = index.search_arrays(queries, K)
    path = index.save(tmp_path / "scann-index")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["searcher"] == index.plan
    assert manifest["settings"]["mode"] == mode
    assert "scann/scann_assets.pbtxt" in manifest["files"]
    assert not (path / "scann" / "scann_docids.pkl").exists()  # ids live in table.jsonl

    loaded = Index.load(path, expected_model_fingerprint="m1", expected_metric="cosine")
    after = loaded.search_arrays(queries, K)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_allclose(after[0], before[0], rtol=1e-6)

    loaded.add(items[3000:4000], ids=[f"item-{i}" for i in range(3000, 4000)])
    assert loaded.plan["upserted_count"] == 1000
    # New items find themselves (cosine 1), exactly so by brute force.
    scores, rows = loaded.search_arrays(items[3000:3200], k=1)
    found = rows[:, 0] == np.arange(3000, 3200)
    assert np.mean(found) >= (1.0 if mode == "brute_force" else 0.95)
    np.testing.assert_allclose(scores[found, 0], 1.0, rtol=1e-4)
    exact = ExactIndex(metric="cosine", dimension=DIMENSION).build(items[:4000], ids=range(4000))
    assert recall(loaded.search_arrays(queries, K)[1], exact.search_arrays(queries, K)[1]) >= 0.9
    reloaded = Index.load(loaded.save(tmp_path / "scann-index"))
    assert len(reloaded) == 4000 and reloaded.get("item-3999")["row"] == 3999


def test_settings_are_validated():
    with pytest.raises(ValueError, match=r"mode must be one of .*mode='ivf'"):
        ScannIndex(dimension=4, mode="ivf")
    with pytest.raises(ValueError, match=r"num_leaves must be an integer >= 1.*num_leaves=0"):
        ScannIndex(dimension=4, num_leaves=0)
    with pytest.raises(ValueError, match=r"tree_threshold must be >= brute_force_threshold"):
        ScannIndex(dimension=4, tree_threshold=10)
    with pytest.raises(ValueError, match=r"leaves_to_search_fraction must be in \(0, 1\]"):
        ScannIndex(dimension=4, leaves_to_search_fraction=0)
