"""kNN classification through a search index, and its metrics: accuracy, MCR, RS.

The neighbours come from a `tfmir.index.Index` (exact, ScaNN or Hamming), so the same code
classifies against a few hundred training embeddings or an archive's index on disk.
"""

import numpy as np

from tfmir.index.base import Index
from tfmir.metrics.retrieval import _as_label_vector, _is_int

INDEX_KINDS = ("exact", "scann")

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


def find_smallest_class(labels):
    """The class with the fewest items: the lowest label among equally small classes.

    Args:
        labels: Labels, shape (N,) or (N, 1), N >= 1.

    Returns:
        The label (a Python scalar).

    Example:

    >>> find_smallest_class([2, 0, 2, 1, 0])
    1
    """
    labels = _as_label_vector(labels, "labels")
    if labels.shape[0] == 0:
        raise ValueError("At least one label is needed. Received: 0 labels")
    classes, counts = np.unique(labels, return_counts=True)
    return _scalar(classes[np.argmin(counts)])  # argmin: the first (lowest) of the smallest


def classification_metrics(
    y_true,
    y_pred,
    *,
    smallest_class=None,
    num_classes: int | None = None,
    class_names=None,
) -> dict:
    """Accuracy, mean class recall, smallest-class recall and the recall of every class.

    Args:
        y_true: True labels, shape (N,) or (N, 1).
        y_pred: Predicted labels, same length.
        smallest_class: The class whose recall is "smallest_class_recall". By
            default the class with the fewest items in `y_true` (the lowest
            label among equally small classes); callers that know the data
            set's smallest class (`knn_classification`) pass it.
        num_classes: If given, every label must lie in [0, num_classes). Classes
            absent from `y_true` never count in the mean class recall, since
            their recall is undefined.
        class_names: Optional names of the integer labels (label i is
            `class_names[i]`); they key "class_recall" and name
            "smallest_class".

    Returns:
        `{"accuracy", "mean_class_recall", "smallest_class_recall",
        "smallest_class", "class_recall"}`: overall accuracy (Acc), the mean
        over the classes present in `y_true` of their recall (MCR), the recall
        of `smallest_class` (RS), that class, and `{class: recall}` for every
        class present in `y_true` (in label order). Recalls are floats in
        [0, 1].

    Example:

    >>> scores = classification_metrics([0, 0, 0, 1], [0, 0, 1, 1], class_names=["no", "yes"])
    >>> scores["accuracy"], scores["mean_class_recall"], scores["smallest_class_recall"]
    (0.75, 0.8333333333333333, 1.0)
    >>> scores["smallest_class"], scores["class_recall"]
    ('yes', {'no': 0.6666666666666666, 'yes': 1.0})

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
    name_of = _class_namer(class_names, y_true)

    classes = np.unique(y_true)
    correct = y_true == y_pred
    recalls = {_scalar(label): float(np.mean(correct[y_true == label])) for label in classes}
    smallest_class = (find_smallest_class(y_true) if smallest_class is None
                      else _scalar(smallest_class))
    if smallest_class not in recalls:
        raise ValueError(
            "smallest_class must be a class present in y_true, or its recall (RS) is undefined "
            f"(present: {classes.tolist()}). Received: smallest_class={smallest_class!r}"
        )
    return {
        "accuracy": float(np.mean(correct)),
        "mean_class_recall": float(np.mean(list(recalls.values()))),
        "smallest_class_recall": recalls[smallest_class],
        "smallest_class": name_of(smallest_class),
        "class_recall": {name_of(label): recall for label, recall in recalls.items()},
    }


def neighbor_rows(index: Index, queries, k: int, *, exclude_rows=None) -> np.ndarray:
    """Rows of the k best index items of every query, best first, optionally leaving one out.

    Args:
        index: Any `tfmir.index.Index` (exact, ScaNN, Hamming).
        queries: Array (Q, index.dimension): embeddings, or bit codes for a
            Hamming index.
        k: Neighbours per query, 1 <= k <= len(index) (len(index) - 1 when a
            row is excluded).
        exclude_rows: Optional int array (Q,): the index row that query q must
            not return (the query itself, when the index holds it), or -1 for
            none. Such a query gets the k best of the other rows.

    Returns:
        int64 array (Q, k) of index rows (`index.labels[rows]`).

    Raises:
        ValueError: on a dimension mismatch, a k the index cannot answer, or
            `exclude_rows` of the wrong shape.

    Example:

    >>> from tfmir.index import ExactIndex
    >>> index = ExactIndex(metric="l2", dimension=1).build([[0.0], [1.0], [3.0]], ids=[0, 1, 2])
    >>> neighbor_rows(index, [[0.0], [1.0]], k=1, exclude_rows=[0, -1]).tolist()
    [[1], [1]]
    """
    queries = np.asarray(queries)
    if queries.ndim != 2 or queries.shape[1] != index.dimension:
        shape = queries.shape
        raise ValueError(
            f"The queries must have shape (Q, {index.dimension}) for this {index.kind} index "
            f"of dimension {index.dimension}. Received: queries.shape={shape}"
            + (f": {shape[-1]}-dimensional queries" if queries.ndim == 2 else "")
        )
    size = len(index)
    if exclude_rows is None:
        excluding = False
    else:
        exclude_rows = np.asarray(exclude_rows)
        if exclude_rows.shape != (queries.shape[0],) or not np.issubdtype(
            exclude_rows.dtype, np.integer
        ):
            raise ValueError(
                f"exclude_rows must be integers of shape ({queries.shape[0]},), one per query. "
                f"Received: exclude_rows.shape={exclude_rows.shape}, dtype={exclude_rows.dtype}"
            )
        excluding = bool(np.any(exclude_rows >= 0))
    available = size - 1 if excluding else size
    if not _is_int(k) or not 1 <= k <= available:
        reason = f"the index holds {size} items" + (
            ", less the query itself" if excluding else ""
        )
        raise ValueError(f"k must be an integer in [1, {available}] ({reason}). Received: k={k!r}")
    if not excluding:
        return index.search_arrays(queries, k)[1]
    _, rows = index.search_arrays(queries, k + 1)
    # Kept rows first, each group in rank order: drops the excluded row when it was found,
    # else the (k + 1)-th.
    order = np.argsort(rows == exclude_rows[:, None], axis=1, kind="stable")
    return np.take_along_axis(rows, order, axis=1)[:, :k]


def knn_classification(
    train_embeddings,
    train_labels,
    test_embeddings,
    test_labels,
    *,
    k: int = 5,
    metric: str = "cosine",
    smallest_class=None,
    index: Index | str = "exact",
    class_names=None,
    exclude_rows=None,
) -> dict:
    """Classifies test embeddings by majority vote of their k nearest training items in an index.

    The neighbours come from a search index: by default an `ExactIndex` built here
    from `train_embeddings`, a `ScannIndex` with `index="scann"` (brute force below
    20k items, then ScaNN's approximate search), or any `Index` already holding
    the training items (e.g. an archive's index loaded from disk).

    Args:
        train_embeddings: Array (N_train, D), the gallery; None when `index` is
            an `Index` (which holds the gallery).
        train_labels: Labels (N_train,) or (N_train, 1), in the row order of the
            gallery; None with an `Index` reads `index.labels`.
        test_embeddings: Array (N_test, D), the queries (bit codes for a Hamming
            index).
        test_labels: Labels (N_test,) or (N_test, 1).
        k: Number of voting neighbours (the paper's K_p).
        metric: Search metric of an index built here, one of
            `tfmir.index.exact.METRICS`; a given `Index` keeps its own.
        smallest_class: Class whose recall is RS. By default the smallest class
            of the TRAINING labels (the lowest label among equally small ones):
            the minority class is a property of the data set, not of the test
            sample. For the test split's smallest class, pass
            `find_smallest_class(test_labels)`. It must occur in `test_labels`.
        index: `"exact"`, `"scann"`, or an `Index` of the training items.
        class_names: Optional names of integer labels, keying "class_recall".
        exclude_rows: Optional int array (N_test,): the gallery row each query
            must not vote with (the query itself when the gallery holds it), -1
            for none; see `neighbor_rows`.

    Returns:
        `classification_metrics` of the kNN predictions: `{"accuracy",
        "mean_class_recall", "smallest_class_recall", "smallest_class",
        "class_recall"}`. Ties are broken by the nearest neighbour, as in
        `knn_predict`.

    Raises:
        ValueError: on lengths that differ, a gallery or index whose dimension
            differs from the test embeddings', a k outside the gallery, or a
            smallest class absent from `test_labels`.

    Example:

    >>> train = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    >>> scores = knn_classification(train, [0, 0, 1], [[1.0, 0.2], [0.1, 1.0]], [0, 1], k=1)
    >>> scores["accuracy"], scores["smallest_class"], scores["class_recall"]
    (1.0, 1, {0: 1.0, 1: 1.0})

    Reference:
        Zhuang et al., "Deep kNN for Medical Image Classification", MICCAI 2020,
        https://doi.org/10.1007/978-3-030-59710-8_13
    """
    test_labels = _as_label_vector(test_labels, "test_labels")
    test_embeddings = np.asarray(test_embeddings)
    num_test = test_embeddings.shape[0] if test_embeddings.ndim else 0
    if test_embeddings.ndim != 2:
        raise ValueError(
            "test_embeddings must be 2-D (items, dimensions). "
            f"Received: test_embeddings.shape={test_embeddings.shape}"
        )
    if isinstance(index, Index):
        if train_embeddings is not None:
            raise ValueError(
                "Pass train_embeddings=None with an Index: the index holds the gallery. "
                f"Received: train_embeddings of shape {np.shape(train_embeddings)} and {index!r}"
            )
        train_labels = index.labels if train_labels is None else train_labels
        train_labels = _as_label_vector(train_labels, "train_labels")
        num_train = len(index)
        gallery = f"the {index.kind} index has dimension {index.dimension}"
        dimension = index.dimension
    elif index in INDEX_KINDS:
        train_labels = _as_label_vector(train_labels, "train_labels")
        train_embeddings = np.asarray(train_embeddings)
        if train_embeddings.ndim != 2:
            raise ValueError(
                "train_embeddings must be 2-D (items, dimensions). "
                f"Received: train_embeddings.shape={train_embeddings.shape}"
            )
        num_train = train_embeddings.shape[0]
        gallery = f"the train embeddings have dimension {train_embeddings.shape[1]}"
        dimension = train_embeddings.shape[1]
    else:
        raise ValueError(
            f"index must be one of {INDEX_KINDS} or a tfmir.index.Index. Received: index={index!r}"
        )
    if num_train != train_labels.shape[0] or num_test != test_labels.shape[0]:
        raise ValueError(
            "Embeddings and labels must have the same lengths. Received: "
            f"{num_train} train embeddings, {train_labels.shape[0]} train labels, "
            f"{num_test} test embeddings, {test_labels.shape[0]} test labels"
        )
    if test_embeddings.shape[1] != dimension:
        raise ValueError(
            f"Dimension mismatch: the test embeddings have dimension {test_embeddings.shape[1]}, "
            f"{gallery}. They must come from the same model."
        )
    if not isinstance(index, Index):
        index = _build_index(index, metric, train_embeddings)
    if smallest_class is None:
        smallest_class = find_smallest_class(train_labels)
    rows = neighbor_rows(index, test_embeddings, k, exclude_rows=exclude_rows)
    predictions = knn_predict(train_labels[rows], k)
    return classification_metrics(
        test_labels, predictions, smallest_class=smallest_class, class_names=class_names
    )


def _build_index(kind, metric, embeddings):
    from tfmir.index import ExactIndex, ScannIndex

    index_class = ExactIndex if kind == "exact" else ScannIndex
    index = index_class(metric=metric, dimension=embeddings.shape[1])
    return index.build(embeddings, ids=np.arange(embeddings.shape[0]))


def _class_namer(class_names, y_true):
    """label -> its name in `class_names`, or the label itself when there are no names."""
    if class_names is None:
        return lambda label: label
    class_names = [str(name) for name in class_names]
    if not np.issubdtype(y_true.dtype, np.integer) or (
        y_true.min() < 0 or y_true.max() >= len(class_names)
    ):
        raise ValueError(
            f"With class_names ({len(class_names)} names), labels must be integers in "
            f"[0, {len(class_names)}). Received: y_true of dtype {y_true.dtype} "
            f"in [{y_true.min()}, {y_true.max()}]"
        )
    return lambda label: class_names[label]


def _scalar(value):
    """A NumPy scalar as the Python value (dict keys, JSON); anything else as it is."""
    return value.item() if isinstance(value, np.generic) else value


def positive_class_index(class_names, positive_class) -> int:
    """The label index of a binary task's positive class, given by name or by index.

    Args:
        class_names: label index -> class name (a split's `class_names`).
        positive_class: a class name (e.g. "mel") or a label index.

    Returns:
        The index into `class_names`.

    Raises:
        ValueError: an unknown name or an index out of range; the message lists the classes.

    Example:

    >>> positive_class_index(("bcc", "mel", "nv"), "mel")
    1
    """
    names = [str(name) for name in class_names]
    if _is_int(positive_class):
        index = int(positive_class)
        if 0 <= index < len(names):
            return index
    elif str(positive_class) in names:
        return names.index(str(positive_class))
    raise ValueError(f"positive_class must be one of the classes {names} (a name or an index "
                     f"below {len(names)}). Received: positive_class={positive_class!r}")


def roc_auc(labels, scores) -> float:
    """The exact area under the ROC curve of binary `labels` ranked by `scores`.

    AUC = P(score of a random positive > score of a random negative) + P(equal) / 2, the
    Mann-Whitney U statistic over n_pos * n_neg pairs, computed from mid-ranks (ties share their
    mean rank). `keras.metrics.AUC` instead integrates a curve sampled at fixed thresholds
    (200 by default), which misplaces scores that fall between two thresholds.

    Args:
        labels: (N,) booleans or 0/1, 1 = positive.
        scores: (N,) real scores, higher = more positive.

    Returns:
        The AUC in [0, 1].

    Raises:
        ValueError: lengths differ, scores are not finite, or one class is absent (AUC undefined).

    Example:

    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])  # 3 of the 4 pairs ordered right
    0.75

    Reference:
        Hanley & McNeil, "The meaning and use of the area under a ROC curve", Radiology 1982.
    """
    labels = np.asarray(labels).reshape(-1).astype(bool)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores must have the same length. Received {labels.size} "
                         f"labels and {scores.size} scores")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite. Received NaN or infinite scores")
    num_positive = int(labels.sum())
    num_negative = labels.size - num_positive
    if num_positive == 0 or num_negative == 0:
        raise ValueError(f"AUC needs both classes. Received {num_positive} positive and "
                         f"{num_negative} negative items")
    order = np.argsort(scores, kind="mergesort")
    # Mid-ranks: a run of equal scores at sorted positions first .. first + count - 1 shares
    # the mean of its 1-based ranks, first + (count + 1) / 2.
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(scores.size)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    u_statistic = ranks[labels].sum() - num_positive * (num_positive + 1) / 2.0
    return float(u_statistic / (num_positive * num_negative))
