"""kNN prediction, Acc / MCR / RS on hand examples, and kNN classification through an index."""

import numpy as np
import pytest

from tfmir.index import ExactIndex
from tfmir.index import HammingIndex
from tfmir.index import ScannIndex
from tfmir.metrics import classification_metrics
from tfmir.metrics import find_smallest_class
from tfmir.metrics import knn_classification
from tfmir.metrics import knn_predict
from tfmir.metrics import positive_class_index
from tfmir.metrics import roc_auc
from tfmir.metrics import neighbor_rows


def test_knn_predict_majority():
    neighbors = np.array(
        [
            [1, 2, 2, 0, 2],  # 2 has three votes
            [3, 3, 1, 1, 1],  # 1 has three votes, even though 3 is nearest
            [0, 0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(knn_predict(neighbors, 5), [2, 1, 0])
    # Only the first k vote: k=2 -> [1, 2] tie, [3, 3], [0, 0].
    np.testing.assert_array_equal(knn_predict(neighbors, 2), [1, 3, 0])
    np.testing.assert_array_equal(knn_predict(neighbors, 1), [1, 3, 0])


def test_knn_predict_ties_go_to_the_nearest_tied_class():
    # [2, 1, 1, 2]: 1 and 2 tie with two votes; 2 is the nearest -> 2.
    assert knn_predict([[2, 1, 1, 2]], 4).tolist() == [2]
    # [5, 1, 2, 2, 1]: 1 and 2 tie; 5 is nearest overall but has one vote; among the tied
    # classes 1 comes first (rank 2) -> 1.
    assert knn_predict([[5, 1, 2, 2, 1]], 5).tolist() == [1]
    # [7, 8, 9, 6]: four-way tie -> the first neighbour.
    assert knn_predict([[7, 8, 9, 6]], 4).tolist() == [7]


def test_knn_predict_keeps_dtype_and_handles_many_rows():
    rng = np.random.default_rng(0)
    neighbors = rng.integers(0, 3, size=(3000, 7)).astype("int16")
    predictions = knn_predict(neighbors, 7)
    assert predictions.dtype == np.int16
    # Independent per-row oracle: counts, then the earliest rank among the most voted.
    for row, prediction in zip(neighbors[:200], predictions[:200]):
        counts = {label: row.tolist().count(label) for label in set(row.tolist())}
        best = max(counts.values())
        expected = next(label for label in row.tolist() if counts[label] == best)
        assert prediction == expected


def test_knn_predict_invalid_arguments():
    with pytest.raises(ValueError, match=r"\[1, 3\].*k=4"):
        knn_predict(np.zeros((2, 3)), 4)
    with pytest.raises(ValueError, match=r"k=0"):
        knn_predict(np.zeros((2, 3)), 0)
    with pytest.raises(ValueError, match=r"2-D.*\(3,\)"):
        knn_predict(np.zeros(3), 1)


def test_classification_metrics_by_hand():
    # class 0: 4 items, 3 right -> recall 3/4
    # class 1: 3 items, 1 right -> recall 1/3
    # class 2: 1 item, 1 right  -> recall 1   (smallest class)
    # accuracy = (3 + 1 + 1) / 8 = 5/8;  MCR = (3/4 + 1/3 + 1) / 3 = 25/36
    y_true = [0, 0, 0, 0, 1, 1, 1, 2]
    y_pred = [0, 0, 0, 1, 1, 0, 2, 2]
    results = classification_metrics(y_true, y_pred)
    assert results == {
        "accuracy": pytest.approx(5 / 8),
        "mean_class_recall": pytest.approx(25 / 36),
        "smallest_class_recall": pytest.approx(1.0),
        "smallest_class": 2,
        "class_recall": {0: pytest.approx(3 / 4), 1: pytest.approx(1 / 3), 2: 1.0},
    }
    assert classification_metrics(y_true, y_pred, smallest_class=1)[
        "smallest_class_recall"
    ] == pytest.approx(1 / 3)
    named = classification_metrics(y_true, y_pred, class_names=["nevus", "melanoma", "bcc"])
    assert named["smallest_class"] == "bcc"
    assert named["class_recall"] == {
        "nevus": pytest.approx(3 / 4), "melanoma": pytest.approx(1 / 3), "bcc": 1.0,
    }


def test_classes_only_predicted_do_not_count_in_mcr():
    # Class 3 is predicted but never true: MCR averages over classes 0 and 1 only.
    # class 0: 1/2, class 1: 2/2 -> MCR = 3/4; both classes have 2 items, the lower label
    # (0) is the default smallest class.
    results = classification_metrics([0, 0, 1, 1], [0, 3, 1, 1], num_classes=4)
    assert results["mean_class_recall"] == pytest.approx(0.75)
    assert results["smallest_class_recall"] == pytest.approx(0.5)
    assert results["accuracy"] == pytest.approx(0.75)
    assert list(results["class_recall"]) == [0, 1]  # class 3 has no recall


def test_classification_metrics_invalid_arguments():
    with pytest.raises(ValueError, match=r"3 true labels, 2 predictions"):
        classification_metrics([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match=r"present: \[0, 1\].*smallest_class=5"):
        classification_metrics([0, 1], [0, 1], smallest_class=5)
    with pytest.raises(ValueError, match=r"y_pred must lie in \[0, 2\).*\[0, 2\]"):
        classification_metrics([0, 1], [0, 2], num_classes=2)
    with pytest.raises(ValueError, match=r"2 names.*integers in \[0, 2\).*\[0, 2\]"):
        classification_metrics([0, 2], [0, 2], class_names=["a", "b"])


def test_find_smallest_class():
    assert find_smallest_class([2, 0, 2, 1, 0]) == 1
    assert find_smallest_class([[3], [1], [3], [1]]) == 1  # a tie goes to the lowest label
    assert find_smallest_class(["nevus", "bcc", "nevus"]) == "bcc"
    with pytest.raises(ValueError, match=r"0 labels"):
        find_smallest_class([])


def _circle(degrees):
    radians = np.deg2rad(degrees)
    return np.stack([np.cos(radians), np.sin(radians)], axis=1)


def test_knn_classification_by_hand():
    # Training points on the unit circle (cosine): class 0 near 0°, class 1 near 90°,
    # class 2 a single point at 45°.
    train = _circle([0, 10, 20, 80, 90, 100, 45])
    train_labels = np.array([0, 0, 0, 1, 1, 1, 2])
    # Test at 5° -> 0/10/20 -> 0 (right); 85° -> 80/90/100 -> 1 (right);
    # 40° -> 45, 20, 10 by angle -> votes 2, 0, 0 -> 0 (true 2: wrong);
    # 60° -> 45, 80, 90 -> votes 2, 1, 1 -> 1 (true 1: right).
    test = _circle([5, 85, 40, 60])
    test_labels = np.array([0, 1, 2, 1])
    # accuracy 3/4; recalls: class 0 1/1, class 1 2/2, class 2 0/1 -> MCR 2/3;
    # RS: the training set's smallest class is 2 (one item) -> recall 0/1.
    results = knn_classification(train, train_labels, test, test_labels, k=3,
                                 class_names=["normal", "benign", "malignant"])
    assert results == {
        "accuracy": pytest.approx(0.75),
        "mean_class_recall": pytest.approx(2 / 3),
        "smallest_class_recall": 0.0,
        "smallest_class": "malignant",
        "class_recall": {"normal": 1.0, "benign": 1.0, "malignant": 0.0},
    }
    # With k=1 both 40° and 60° take the 45° point (class 2): 40° becomes right, 60° wrong.
    # accuracy 3/4; recalls: class 0 1/1, class 1 1/2, class 2 1/1 -> MCR 5/6; RS 1/1.
    results = knn_classification(train, train_labels, test, test_labels, k=1)
    assert results["accuracy"] == pytest.approx(0.75)
    assert results["mean_class_recall"] == pytest.approx(5 / 6)
    assert results["smallest_class_recall"] == 1.0
    assert results["class_recall"] == {0: 1.0, 1: 0.5, 2: 1.0}


def test_rs_is_the_training_sets_smallest_class_not_the_test_splits():
    # Training: class 0 ×3 (0°, 10°, 20°), class 1 ×2 (80°, 90°) -> smallest class 1.
    # Test: class 0 ×1 (55°), class 1 ×3 (85°, 88°, 30°) -> smallest class 0.
    # k=1: 55° -> 80° (1, wrong); 85°, 88° -> 1 (right); 30° -> 20° (0, wrong).
    # Recalls: class 0 0/1, class 1 2/3. RS (training smallest, 1) = 2/3; the test
    # split's smallest (0) would give 0.
    train = _circle([0, 10, 20, 80, 90])
    test = _circle([55, 85, 88, 30])
    train_labels, test_labels = [0, 0, 0, 1, 1], [0, 1, 1, 1]
    results = knn_classification(train, train_labels, test, test_labels, k=1)
    assert results["smallest_class"] == 1
    assert results["smallest_class_recall"] == pytest.approx(2 / 3)
    asked = knn_classification(train, train_labels, test, test_labels, k=1,
                               smallest_class=find_smallest_class(test_labels))
    assert asked["smallest_class"] == 0 and asked["smallest_class_recall"] == 0.0
    for key in ("accuracy", "mean_class_recall", "class_recall"):
        assert asked[key] == results[key]
    # The training set's smallest class must occur in the test split, or RS is undefined.
    with pytest.raises(ValueError, match=r"RS\) is undefined.*smallest_class=1"):
        knn_classification(train, train_labels, test[:1], test_labels[:1], k=1)


def test_knn_classification_ties_go_to_the_nearest():
    # 1-D, l2. Training: 0.0 (class 0), 1.0 (class 1), 3.0 (class 0), 4.0 (class 1).
    # Query 0.4: neighbours 0.0, 1.0 -> k=2 tie 0/1 -> nearest 0.0 -> class 0.
    # Query 0.6: neighbours 1.0, 0.0 -> tie -> nearest 1.0 -> class 1.
    # Query 3.4: neighbours 3.0, 4.0, 1.0, 0.0 -> k=4 tie 2/2 -> nearest 3.0 -> class 0.
    # Query 3.6: neighbours 4.0, 3.0, 1.0, 0.0 -> k=4 tie -> class 1.
    index = ExactIndex(metric="l2", dimension=1).build(
        [[0.0], [1.0], [3.0], [4.0]], ids=["a", "b", "c", "d"], labels=[0, 1, 0, 1])
    queries = [[0.4], [0.6], [3.4], [3.6]]
    for k in (2, 4):
        results = knn_classification(None, None, queries, [0, 1, 0, 1], k=k, index=index)
        assert results["accuracy"] == 1.0  # labels read from the index
    # Truth chosen so that "furthest wins" would be 100 % right and "nearest wins" 0 %.
    results = knn_classification(None, [0, 1, 0, 1], queries, [1, 0, 1, 0], k=2, index=index)
    assert results["accuracy"] == 0.0


def test_knn_classification_on_a_loaded_index_of_string_labels(tmp_path):
    train = _circle([0, 10, 80, 90, 100])
    index = ExactIndex(dimension=2).build(
        train, ids=list("abcde"), labels=["nevus", "nevus", "melanoma", "melanoma", "melanoma"])
    index.save(tmp_path / "index")
    loaded = ExactIndex.load(tmp_path / "index")
    # 5° -> nevus (right); 50° -> 80° melanoma (true nevus: wrong); 95° -> melanoma (right).
    results = knn_classification(None, None, _circle([5, 50, 95]),
                                 ["nevus", "nevus", "melanoma"], k=1, index=loaded)
    assert results["accuracy"] == pytest.approx(2 / 3)
    assert results["class_recall"] == {"melanoma": 1.0, "nevus": 0.5}
    assert results["smallest_class"] == "nevus"  # the training set's: 2 nevus, 3 melanoma


def test_knn_classification_on_a_hamming_index():
    # 4-bit codes; Hamming distances by hand: query 1100 -> rows 0 (0), 1 (1), 2 (3), 3 (4).
    codes = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool)
    index = HammingIndex(dimension=4).build(codes, ids=[0, 1, 2, 3], labels=[0, 0, 1, 1])
    queries = np.array([[1, 1, 0, 0], [0, 0, 1, 1]], bool)
    results = knn_classification(None, None, queries, [0, 1], k=2, index=index)
    assert results["accuracy"] == 1.0


def _clusters(num_per_class, seed, dimension=16, num_classes=3):
    """Gaussian clusters around random unit centres, overlapping enough to make mistakes."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dimension))
    labels = np.repeat(np.arange(num_classes), num_per_class)
    points = centres[labels] + rng.normal(scale=1.2, size=(labels.size, dimension))
    return points.astype(np.float32), labels


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exact_and_scann_indexes_agree(metric):
    train, train_labels = _clusters([60, 40, 20], seed=0)
    test, test_labels = _clusters([10, 10, 10], seed=1)
    # Independent oracle: NumPy brute force and an explicit vote (ties to the nearest).
    if metric == "cosine":
        unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
        order = np.argsort(-(unit(test) @ unit(train).T), axis=1, kind="stable")
    else:
        distances = np.linalg.norm(test[:, None] - train[None], axis=2)
        order = np.argsort(distances, axis=1, kind="stable")
    for k in (1, 5):
        predictions = []
        for neighbours in train_labels[order[:, :k]].tolist():
            most = max(neighbours.count(label) for label in neighbours)
            predictions.append(next(label for label in neighbours
                                    if neighbours.count(label) == most))
        expected = classification_metrics(test_labels, predictions, smallest_class=2)
        exact = knn_classification(train, train_labels, test, test_labels, k=k, metric=metric)
        approximate = knn_classification(train, train_labels, test, test_labels, k=k,
                                         metric=metric, index="scann")
        assert exact == expected
        assert approximate == expected
        assert 0 < exact["accuracy"] < 1  # the clusters overlap: the check has teeth
    # A ScaNN index built outside gives the same neighbours as the exact one.
    scann = ScannIndex(metric=metric, dimension=16).build(train, ids=np.arange(len(train)))
    exact = ExactIndex(metric=metric, dimension=16).build(train, ids=np.arange(len(train)))
    assert scann.plan["mode"] == "brute_force"
    np.testing.assert_array_equal(neighbor_rows(scann, test, 5), neighbor_rows(exact, test, 5))


def test_neighbor_rows_leaves_out_the_query_itself():
    # 1-D, l2: rows 0..3 at 0, 1, 2, 10. Each query is row q's own point.
    index = ExactIndex(metric="l2", dimension=1).build(
        [[0.0], [1.0], [2.0], [10.0]], ids=[0, 1, 2, 3])
    queries = [[0.0], [1.0], [2.0], [10.0]]
    rows = neighbor_rows(index, queries, 2, exclude_rows=[0, 1, 2, 3])
    assert rows.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]
    # Only the second query is in the index; the others keep their nearest.
    rows = neighbor_rows(index, queries, 2, exclude_rows=[-1, 1, -1, -1])
    assert rows.tolist() == [[0, 1], [0, 2], [2, 1], [3, 2]]
    with pytest.raises(ValueError, match=r"\[1, 3\] \(the index holds 4 items, less the query "
                                         r"itself\).*k=4"):
        neighbor_rows(index, queries, 4, exclude_rows=[0, 1, 2, 3])
    assert neighbor_rows(index, queries, 4).shape == (4, 4)
    with pytest.raises(ValueError, match=r"exclude_rows must be integers of shape \(4,\)"):
        neighbor_rows(index, queries, 1, exclude_rows=[0, 1])


def test_knn_classification_dimension_mismatch():
    train, train_labels = _clusters([5, 5], seed=0, num_classes=2, dimension=8)
    test = np.zeros((3, 4), np.float32)
    index = ExactIndex(dimension=8).build(train, ids=np.arange(10), labels=train_labels)
    with pytest.raises(ValueError, match=r"test embeddings have dimension 4, the exact index "
                                         r"has dimension 8"):
        knn_classification(None, None, test, [0, 1, 1], k=1, index=index)
    with pytest.raises(ValueError, match=r"test embeddings have dimension 4, the train "
                                         r"embeddings have dimension 8"):
        knn_classification(train, train_labels, test, [0, 1, 1], k=1, index="scann")
    with pytest.raises(ValueError, match=r"queries must have shape \(Q, 8\).*4-dimensional"):
        neighbor_rows(index, test, 1)


def test_knn_classification_invalid_arguments():
    with pytest.raises(ValueError, match=r"3 train embeddings, 2 train labels"):
        knn_classification(np.eye(3), [0, 1], np.eye(3), [0, 1, 2], k=1)
    index = ExactIndex(dimension=3).build(np.eye(3), ids=[0, 1, 2], labels=[0, 1, 2])
    with pytest.raises(ValueError, match=r"train_embeddings=None with an Index"):
        knn_classification(np.eye(3), None, np.eye(3), [0, 1, 2], k=1, index=index)
    with pytest.raises(ValueError, match=r"index must be one of \('exact', 'scann'\)"):
        knn_classification(np.eye(3), [0, 1, 2], np.eye(3), [0, 1, 2], k=1, index="faiss")
    with pytest.raises(ValueError, match=r"\[1, 3\].*k=4"):
        knn_classification(None, None, np.eye(3), [0, 1, 2], k=4, index=index)


# --- ROC AUC and the positive class (paper 003) -------------------------------------------------

def _pairwise_auc(labels, scores):
    """The AUC by its definition: over every (positive, negative) pair, 1 if the positive scores
    higher, 1/2 on a tie."""
    positives = [s for label, s in zip(labels, scores) if label]
    negatives = [s for label, s in zip(labels, scores) if not label]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return total / (len(positives) * len(negatives))


def test_roc_auc_hand_cases():
    # Pairs (pos, neg): (0.35, 0.1) right, (0.35, 0.4) wrong, (0.8, *) right: 3 of 4.
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 1], [0.2, 0.9]) == 1.0
    assert roc_auc([1, 0], [0.2, 0.9]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # every pair tied


def test_roc_auc_matches_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(3)
    labels = rng.random(60) < 0.3
    scores = rng.integers(0, 6, 60) / 5.0  # many ties
    assert roc_auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)


@pytest.mark.parametrize("labels, scores, message", [
    ([1, 1], [0.1, 0.2], "AUC needs both classes"),
    ([0, 1], [0.1], "labels and scores must have the same length"),
    ([0, 1], [0.1, float("nan")], "scores must be finite"),
])
def test_roc_auc_errors(labels, scores, message):
    with pytest.raises(ValueError, match=message):
        roc_auc(labels, scores)


def test_positive_class_index():
    assert positive_class_index(("bcc", "mel", "nv"), "mel") == 1
    assert positive_class_index(("bcc", "mel", "nv"), 2) == 2
    with pytest.raises(ValueError, match=r"positive_class must be one of the classes \['bcc', "
                                         r"'mel', 'nv'\].*Received: positive_class='melanoma'"):
        positive_class_index(("bcc", "mel", "nv"), "melanoma")
    with pytest.raises(ValueError, match="Received: positive_class=3"):
        positive_class_index(("bcc", "mel", "nv"), 3)
