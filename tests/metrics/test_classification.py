"""kNN prediction, Acc / MCR / RS on hand examples, and end-to-end kNN classification."""

import numpy as np
import pytest

from tfmir.metrics import classification_metrics
from tfmir.metrics import knn_classification
from tfmir.metrics import knn_predict


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
    }
    assert classification_metrics(y_true, y_pred, smallest_class=1)[
        "smallest_class_recall"
    ] == pytest.approx(1 / 3)


def test_classes_only_predicted_do_not_count_in_mcr():
    # Class 3 is predicted but never true: MCR averages over classes 0 and 1 only.
    # class 0: 1/2, class 1: 2/2 -> MCR = 3/4; both classes have 2 items, the lower label
    # (0) is the default smallest class.
    results = classification_metrics([0, 0, 1, 1], [0, 3, 1, 1], num_classes=4)
    assert results["mean_class_recall"] == pytest.approx(0.75)
    assert results["smallest_class_recall"] == pytest.approx(0.5)
    assert results["accuracy"] == pytest.approx(0.75)


def test_classification_metrics_invalid_arguments():
    with pytest.raises(ValueError, match=r"3 true labels, 2 predictions"):
        classification_metrics([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match=r"present: \[0, 1\].*smallest_class=5"):
        classification_metrics([0, 1], [0, 1], smallest_class=5)
    with pytest.raises(ValueError, match=r"y_pred must lie in \[0, 2\).*\[0, 2\]"):
        classification_metrics([0, 1], [0, 2], num_classes=2)


def test_knn_classification_by_hand():
    # Training points on the unit circle (cosine): class 0 near 0°, class 1 near 90°,
    # class 2 a single point at 45°.
    angles = np.deg2rad([0, 10, 20, 80, 90, 100, 45])
    train = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    train_labels = np.array([0, 0, 0, 1, 1, 1, 2])
    # Test at 5° -> 0/10/20 -> 0 (right); 85° -> 80/90/100 -> 1 (right);
    # 40° -> 45, 20, 10 by angle -> votes 2, 0, 0 -> 0 (true 2: wrong);
    # 60° -> 45, 80, 90 -> votes 2, 1, 1 -> 1 (true 1: right).
    test_angles = np.deg2rad([5, 85, 40, 60])
    test = np.stack([np.cos(test_angles), np.sin(test_angles)], axis=1)
    test_labels = np.array([0, 1, 2, 1])
    # accuracy 3/4; recalls: class 0 1/1, class 1 2/2, class 2 0/1 -> MCR 2/3;
    # smallest test class: 0 and 2 have one item each -> class 0 -> RS 1.
    results = knn_classification(train, train_labels, test, test_labels, k=3)
    assert results == {
        "accuracy": pytest.approx(0.75),
        "mean_class_recall": pytest.approx(2 / 3),
        "smallest_class_recall": pytest.approx(1.0),
    }
    results = knn_classification(train, train_labels, test, test_labels, k=3, smallest_class=2)
    assert results["smallest_class_recall"] == 0.0
    # With k=1 both 40° and 60° take the 45° point (class 2): 40° becomes right, 60° wrong.
    # accuracy 3/4; recalls: class 0 1/1, class 1 1/2, class 2 1/1 -> MCR 5/6.
    results = knn_classification(train, train_labels, test, test_labels, k=1)
    assert results["accuracy"] == pytest.approx(0.75)
    assert results["mean_class_recall"] == pytest.approx(5 / 6)


def test_knn_classification_length_mismatch():
    with pytest.raises(ValueError, match=r"3 train embeddings, 2 train labels"):
        knn_classification(np.eye(3), [0, 1], np.eye(3), [0, 1, 2], k=1)
