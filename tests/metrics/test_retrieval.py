"""Retrieval metrics on hand-made rankings with hand-computed values."""

import numpy as np
import pytest

from tfmir.metrics import average_precisions
from tfmir.metrics import map_at_k
from tfmir.metrics import precision_at_k
from tfmir.metrics import recall_at_k
from tfmir.metrics import recall_hits
from tfmir.metrics import retrieval_metrics

# Four queries, five ranked neighbours each (labels), best first.
QUERY_LABELS = np.array([0, 1, 2, 0])
NEIGHBOR_LABELS = np.array(
    [
        [0, 1, 0, 2, 2],  # relevant at ranks 1, 3
        [0, 1, 1, 0, 1],  # relevant at ranks 2, 3, 5
        [0, 1, 1, 0, 0],  # no relevant item at all
        [1, 2, 1, 2, 0],  # relevant only at rank 5
    ]
)


def test_recall_at_k_by_hand():
    # k=1: only query 0 hits -> 1/4.  k=2: queries 0, 1 -> 2/4.
    # k=4: still queries 0, 1 -> 2/4.  k=5: queries 0, 1, 3 -> 3/4.
    assert recall_at_k(QUERY_LABELS, NEIGHBOR_LABELS, 1) == 0.25
    assert recall_at_k(QUERY_LABELS, NEIGHBOR_LABELS, 2) == 0.5
    assert recall_at_k(QUERY_LABELS, NEIGHBOR_LABELS, 4) == 0.5
    assert recall_at_k(QUERY_LABELS, NEIGHBOR_LABELS, 5) == 0.75


def test_recall_hits_by_hand():
    # Per query: a relevant item within the first k (see the ranks above).
    assert recall_hits(QUERY_LABELS, NEIGHBOR_LABELS, 1).tolist() == [True, False, False, False]
    assert recall_hits(QUERY_LABELS, NEIGHBOR_LABELS, 5).tolist() == [True, True, False, True]


def test_precision_at_k_by_hand():
    # k=1: hits 1, 0, 0, 0 -> (1 + 0 + 0 + 0) / 4 = 0.25.
    # k=3: hits 2, 2, 0, 0 -> (2/3 + 2/3 + 0 + 0) / 4 = 1/3.
    # k=5: hits 2, 3, 0, 1 -> (2/5 + 3/5 + 0 + 1/5) / 4 = 0.3.
    assert precision_at_k(QUERY_LABELS, NEIGHBOR_LABELS, 1) == pytest.approx(0.25)
    assert precision_at_k(QUERY_LABELS, NEIGHBOR_LABELS, 3) == pytest.approx(1 / 3)
    assert precision_at_k(QUERY_LABELS, NEIGHBOR_LABELS, 5) == pytest.approx(0.3)


def test_map_at_k_by_hand():
    # k=5:
    #   query 0: relevant at 1, 3 -> (1/1 + 2/3) / 2 = 5/6
    #   query 1: relevant at 2, 3, 5 -> (1/2 + 2/3 + 3/5) / 3 = (15 + 20 + 18) / 90 = 53/90
    #   query 2: none -> 0
    #   query 3: relevant at 5 -> (1/5) / 1 = 1/5
    #   mean = (75/90 + 53/90 + 0 + 18/90) / 4 = 146/360
    assert map_at_k(QUERY_LABELS, NEIGHBOR_LABELS, 5) == pytest.approx(146 / 360)
    # k=3:
    #   query 0: (1 + 2/3) / 2 = 5/6;  query 1: (1/2 + 2/3) / 2 = 7/12;  queries 2, 3: 0
    #   mean = (10/12 + 7/12) / 4 = 17/48
    assert map_at_k(QUERY_LABELS, NEIGHBOR_LABELS, 3) == pytest.approx(17 / 48)


def test_average_precisions_by_hand():
    # The per-query values of the k=5 case above: 5/6, 53/90, 0, 1/5.
    values = average_precisions(QUERY_LABELS, NEIGHBOR_LABELS, 5)
    np.testing.assert_allclose(values, [5 / 6, 53 / 90, 0.0, 1 / 5])


def test_map_without_any_relevant_item_is_zero():
    assert map_at_k([3, 3], [[0, 1], [2, 0]], 2) == 0.0


def test_perfect_ranking_scores_one():
    labels = np.array([[4], [5]])  # (Q, 1) labels are accepted
    neighbors = np.array([[4, 4, 4], [5, 5, 5]])
    for metric in (recall_at_k, precision_at_k, map_at_k):
        assert metric(labels, neighbors, 3) == 1.0


def test_string_labels():
    assert recall_at_k(["cat", "dog"], [["cat", "dog"], ["cat", "cat"]], 2) == 0.5


@pytest.mark.parametrize("metric", [recall_at_k, precision_at_k, map_at_k])
def test_invalid_arguments(metric):
    with pytest.raises(ValueError, match=r"\[1, 5\].*k=6"):
        metric(QUERY_LABELS, NEIGHBOR_LABELS, 6)
    with pytest.raises(ValueError, match=r"k=0"):
        metric(QUERY_LABELS, NEIGHBOR_LABELS, 0)
    with pytest.raises(ValueError, match=r"3 query labels.*\(4, 5\)"):
        metric(QUERY_LABELS[:3], NEIGHBOR_LABELS, 1)
    with pytest.raises(ValueError, match=r"2-D.*\(4,\)"):
        metric(QUERY_LABELS, NEIGHBOR_LABELS[:, 0], 1)


def test_retrieval_metrics_excludes_each_query():
    # Points on a line (cosine would see them all as one direction, so use l2):
    #   index: 0    1    2    3     4
    #   x:     0.0  0.1  1.0  1.15  5.0
    #   label: 0    0    1    0     1
    # Nearest other item: 0 -> 1 (same), 1 -> 0 (same), 2 -> 3 (diff), 3 -> 2 (diff),
    # 4 -> 3 (diff).  recall@1 = 2/5.
    # Two nearest: 0 -> {1, 2}, 1 -> {0, 2}, 2 -> {3, 1}, 3 -> {2, 1}, 4 -> {3, 2}:
    # only query 2 (label 1) misses, its two neighbours have label 0 -> recall@2 = 4/5.
    embeddings = np.array([[0.0], [0.1], [1.0], [1.15], [5.0]])
    labels = np.array([0, 0, 1, 0, 1])
    results = retrieval_metrics(embeddings, labels, ks=(1, 2), metric="l2", batch_size=2)
    assert results == {"recall@1": pytest.approx(0.4), "recall@2": pytest.approx(0.8)}


def test_retrieval_metrics_matches_brute_force_recall():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=120)
    embeddings = rng.normal(size=(4, 8))[labels] + rng.normal(size=(120, 8))
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1)
    expected = {}
    for k in (1, 2, 4, 8):
        hits = [np.any(labels[order[i, :k]] == labels[i]) for i in range(120)]
        expected[f"recall@{k}"] = pytest.approx(np.mean(hits))
    assert retrieval_metrics(embeddings, labels, batch_size=50) == expected


def test_retrieval_metrics_invalid_arguments():
    embeddings = np.eye(3)
    with pytest.raises(ValueError, match=r"ks=\(\)"):
        retrieval_metrics(embeddings, [0, 1, 2], ks=())
    with pytest.raises(ValueError, match=r"\[1, 2\].*k=4"):
        retrieval_metrics(embeddings, [0, 1, 2], ks=(1, 4))
    with pytest.raises(ValueError, match=r"3 embeddings, 2 labels"):
        retrieval_metrics(embeddings, [0, 1])
