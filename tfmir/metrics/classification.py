"""kNN classification on embeddings and its metrics: accuracy, MCR, RS."""

import numpy as np

from tfmir.index.exact import exact_search
from tfmir.metrics.retrieval import _as_label_vector, _is_int

# Bounds the (rows, k, k) comparison tensor of knn_predict to ~16M booleans.
_MAX_VOTE_ELEMENTS = 1 << 24


def knn_predict(neighbor_labels, k: int) -> np.ndarray:
    """Majority label of the first k neighbours of every query.

    Ties are broken by the nearest neighbour: among the classes with the most
    votes, the one that appears earliest in the ranking wins. For example with
    neighbours [2, 1, 1, 2] and k=4, classes 1 and 2 have two votes each and 2
    wins because the first neighbour is a 2.

    Args:
        neighbor_labels: Labels of each query's neighbours, best first, (Q, K').
        k: Number of neighbours that vote, 1 <= k <= K'.

    Returns:
        Array (Q,) of predicted labels, with the dtype of `neighbor_labels`.

    Example:

    >>> knn_predict([[2, 1, 1, 2], [0, 1, 1, 1]], k=4)
    array([2, 1])

    Reference:
        Zhuang et al., "Deep kNN for Medical Image Classification", MICCAI 2020,
        https://doi.org/10.1007/978-3-030-59710-8_13
    """
    neighbor_labels = np.asarray(neighbor_labels)
    if neighbor_labels.ndim != 2:
        raise ValueError(
            "neighbor_labels must be 2-D (queries, neighbours). "
            f"Received: neighbor_labels.shape={neighbor_labels.shape}"
        )
    num_neighbors = neighbor_labels.shape[1]
    if not _is_int(k) or not 1 <= k <= num_neighbors:
        raise ValueError(
            f"k must be an integer in [1, {num_neighbors}] (the number of neighbours given). "
            f"Received: k={k!r}"
        )
    voters = neighbor_labels[:, :k]
    predictions = np.empty(voters.shape[0], dtype=voters.dtype)
    rows_per_chunk = max(1, _MAX_VOTE_ELEMENTS // (k * k))
    for start in range(0, voters.shape[0], rows_per_chunk):
        chunk = voters[start : start + rows_per_chunk]
        # votes[q, j]: how many of the k voters share the label of voter j.
        votes = (chunk[:, :, None] == chunk[:, None, :]).sum(axis=2)
        # argmax returns the first maximum, i.e. the nearest voter of a tied class.
        winner = np.argmax(votes, axis=1)
        predictions[start : start + rows_per_chunk] = chunk[np.arange(chunk.shape[0]), winner]
    return predictions


def classification_metrics(
    y_true,
    y_pred,
    *,
    smallest_class: int | None = None,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Accuracy, mean class recall and smallest-class recall.

    Args:
        y_true: True labels, shape (N,) or (N, 1).
        y_pred: Predicted labels, same length.
        smallest_class: The class whose recall is "smallest_class_recall". By
            default the class with the fewest items in `y_true` (the lowest
            label among equally small classes).
        num_classes: If given, every label must lie in [0, num_classes). Classes
            absent from `y_true` never count in the mean class recall, since
            their recall is undefined.

    Returns:
        `{"accuracy", "mean_class_recall", "smallest_class_recall"}` as floats in
        [0, 1]: overall accuracy (Acc), the mean over the classes present in
        `y_true` of their recall (MCR), and the recall of `smallest_class` (RS).

    Example:

    >>> classification_metrics([0, 0, 0, 1], [0, 0, 1, 1])
    {'accuracy': 0.75, 'mean_class_recall': 0.8333333333333333, 'smallest_class_recall': 1.0}

    Reference:
        Zhuang et al., "Deep kNN for Medical Image Classification", MICCAI 2020,
        https://doi.org/10.1007/978-3-030-59710-8_13 (Acc, MCR, RS).
    """
    y_true = _as_label_vector(y_true, "y_true")
    y_pred = _as_label_vector(y_pred, "y_pred")
    if y_true.shape[0] != y_pred.shape[0]:
        raise ValueError(
            "y_true and y_pred must have the same length. "
            f"Received: {y_true.shape[0]} true labels, {y_pred.shape[0]} predictions"
        )
    if y_true.shape[0] == 0:
        raise ValueError("At least one example is needed. Received: 0 labels")
    if num_classes is not None:
        if not _is_int(num_classes) or num_classes <= 0:
            raise ValueError(
                f"num_classes must be a positive integer. Received: num_classes={num_classes!r}"
            )
        for name, values in (("y_true", y_true), ("y_pred", y_pred)):
            if values.min() < 0 or values.max() >= num_classes:
                raise ValueError(
                    f"{name} must lie in [0, {num_classes}) for num_classes={num_classes}. "
                    f"Received: {name} in [{values.min()}, {values.max()}]"
                )

    classes, counts = np.unique(y_true, return_counts=True)
    correct = y_true == y_pred
    recalls = {label: float(np.mean(correct[y_true == label])) for label in classes}
    if smallest_class is None:
        smallest_class = classes[np.argmin(counts)]
    elif smallest_class not in recalls:
        raise ValueError(
            "smallest_class must be a class present in y_true "
            f"(present: {classes.tolist()}). Received: smallest_class={smallest_class!r}"
        )
    return {
        "accuracy": float(np.mean(correct)),
        "mean_class_recall": float(np.mean(list(recalls.values()))),
        "smallest_class_recall": recalls[smallest_class],
    }


def knn_classification(
    train_embeddings,
    train_labels,
    test_embeddings,
    test_labels,
    *,
    k: int = 5,
    metric: str = "cosine",
    smallest_class: int | None = None,
) -> dict[str, float]:
    """Classifies test embeddings by majority vote of their k nearest training embeddings.

    Args:
        train_embeddings: Array (N_train, D), the gallery.
        train_labels: Labels (N_train,) or (N_train, 1).
        test_embeddings: Array (N_test, D), the queries.
        test_labels: Labels (N_test,) or (N_test, 1).
        k: Number of voting neighbours (the paper's K_p).
        metric: Search metric, one of `tfmir.index.exact.METRICS`.
        smallest_class: Class for "smallest_class_recall"; by default the class
            with the fewest test items (see `classification_metrics`).

    Returns:
        `classification_metrics` of the kNN predictions: `{"accuracy",
        "mean_class_recall", "smallest_class_recall"}`. Ties are broken as in
        `knn_predict`.

    Example:

    >>> train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> knn_classification(train, [0, 0, 1], [[1.0, 0.2], [0.1, 1.0]], [0, 1], k=1)
    {'accuracy': 1.0, 'mean_class_recall': 1.0, 'smallest_class_recall': 1.0}

    Reference:
        Zhuang et al., "Deep kNN for Medical Image Classification", MICCAI 2020,
        https://doi.org/10.1007/978-3-030-59710-8_13
    """
    train_labels = _as_label_vector(train_labels, "train_labels")
    test_labels = _as_label_vector(test_labels, "test_labels")
    num_train = np.shape(train_embeddings)[0] if np.ndim(train_embeddings) else 0
    num_test = np.shape(test_embeddings)[0] if np.ndim(test_embeddings) else 0
    if num_train != train_labels.shape[0] or num_test != test_labels.shape[0]:
        raise ValueError(
            "Embeddings and labels must have the same lengths. Received: "
            f"{num_train} train embeddings, {train_labels.shape[0]} train labels, "
            f"{num_test} test embeddings, {test_labels.shape[0]} test labels"
        )
    _, indices = exact_search(test_embeddings, train_embeddings, k, metric=metric)
    predictions = knn_predict(train_labels[indices], k)
    return classification_metrics(test_labels, predictions, smallest_class=smallest_class)

