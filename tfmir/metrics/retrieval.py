"""Retrieval metrics on ranked neighbour labels: Recall@K, Precision@K, mAP@k.

Relevance is always "same class as the query". The functions take the labels of
each query's neighbours, best first, so any search (exact, ScaNN, Hamming) can be
scored the same way.
"""

import numbers

import numpy as np

from tfmir.index.exact import exact_search


def recall_at_k(query_labels, neighbor_labels, k: int) -> float:
    """Fraction of queries with at least one same-class item among the first k.

    Args:
        query_labels: Labels of the queries, shape (Q,) or (Q, 1).
        neighbor_labels: Labels of each query's neighbours, best first, shape
            (Q, K') with K' >= k. The query itself must already be excluded.
        k: Number of leading neighbours to look at.

    Returns:
        Recall@k in [0, 1].

    Example:

    >>> recall_at_k([0, 1], [[1, 0], [0, 0]], k=2)
    0.5

    Reference:
        Song et al., "Deep Metric Learning via Lifted Structured Feature
        Embedding", CVPR 2016, https://arxiv.org/abs/1511.06452 — the protocol
        of Feng et al., "Universal Model for Multi-Domain Medical Image
        Retrieval", https://arxiv.org/abs/2007.08628, Sec. IV (Table I).
    """
    return float(np.mean(recall_hits(query_labels, neighbor_labels, k)))


def recall_hits(query_labels, neighbor_labels, k: int) -> np.ndarray:
    """Per query, whether a same-class item is among the first k (Recall@k before the mean).

    Args:
        query_labels: Labels of the queries, shape (Q,) or (Q, 1).
        neighbor_labels: Labels of each query's neighbours, best first, (Q, K'), K' >= k.
        k: Number of leading neighbours to look at.

    Returns:
        Boolean array (Q,); its mean is `recall_at_k`. Paired per-query outcomes of two models
        on the same queries are what `paired_bootstrap` compares.

    Example:

    >>> recall_hits([0, 1], [[1, 0], [0, 0]], k=2).tolist()
    [True, False]
    """
    return np.any(_relevance(query_labels, neighbor_labels, k), axis=1)


def precision_at_k(query_labels, neighbor_labels, k: int) -> float:
    """Mean over queries of (number of same-class items in the first k) / k.

    Args:
        query_labels: Labels of the queries, shape (Q,) or (Q, 1).
        neighbor_labels: Labels of each query's neighbours, best first, (Q, K').
        k: Number of leading neighbours to look at, 1 <= k <= K'.

    Returns:
        Precision@k in [0, 1].

    Example:

    >>> precision_at_k([0, 1], [[1, 0], [0, 0]], k=2)
    0.25
    """
    relevant = _relevance(query_labels, neighbor_labels, k)
    return float(np.mean(relevant.sum(axis=1) / k))


def average_precisions(query_labels, neighbor_labels, k: int) -> np.ndarray:
    """Each query's average precision over its first k neighbours (`map_at_k` is their mean).

    Per query, AP@k = sum_{i<=k} P(i) rel(i) / sum_{i<=k} rel(i), where P(i) is
    the precision of the first i neighbours and rel(i) is 1 when neighbour i has
    the query's class; 0 when no relevant item is in the first k. Per-query
    values are what a bootstrap interval over queries resamples.

    Args:
        query_labels: Labels of the queries, shape (Q,) or (Q, 1).
        neighbor_labels: Labels of each query's neighbours, best first, (Q, K').
        k: Number of leading neighbours to look at, 1 <= k <= K'.

    Returns:
        float64 array (Q,) in [0, 1].

    Example:

    >>> average_precisions([0, 1], [[0, 1, 0], [0, 0, 0]], k=3)  # (1/1 + 2/3) / 2, 0
    array([0.83333333, 0.        ])

    Reference:
        Fang et al., "Combating Ambiguity for Hash-code Learning in Medical
        Instance Retrieval" (mAP@top-k, Sec. IV, eq. 3).
    """
    relevant = _relevance(query_labels, neighbor_labels, k).astype(np.float64)
    ranks = np.arange(1, k + 1)
    precision = np.cumsum(relevant, axis=1) / ranks
    num_relevant = relevant.sum(axis=1)
    return np.divide(
        (precision * relevant).sum(axis=1),
        num_relevant,
        out=np.zeros_like(num_relevant),
        where=num_relevant > 0,
    )


def map_at_k(query_labels, neighbor_labels, k: int) -> float:
    """Mean average precision over the first k neighbours.

    The mean over queries of `average_precisions`: per query, AP@k = sum_{i<=k}
    P(i) rel(i) / sum_{i<=k} rel(i), 0 when no relevant item is in the first k.

    Args:
        query_labels: Labels of the queries, shape (Q,) or (Q, 1).
        neighbor_labels: Labels of each query's neighbours, best first, (Q, K').
        k: Number of leading neighbours to look at, 1 <= k <= K'.

    Returns:
        mAP@k in [0, 1].

    Example:

    >>> map_at_k([0], [[0, 1, 0]], k=3)  # (1/1 + 2/3) / 2
    0.8333333333333333

    Reference:
        Fang et al., "Combating Ambiguity for Hash-code Learning in Medical
        Instance Retrieval" (mAP@top-k, Sec. IV).
    """
    return float(np.mean(average_precisions(query_labels, neighbor_labels, k)))


def retrieval_metrics(
    embeddings,
    labels,
    *,
    ks=(1, 2, 4, 8),
    metric: str = "cosine",
    batch_size: int = 1024,
) -> dict[str, float]:
    """Recall@K of a test split searched against itself, each query excluded.

    The split is both query set and gallery; a query never retrieves itself (by
    index, so exact duplicates of it still count as neighbours).

    Args:
        embeddings: Array (N, D).
        labels: Class labels, shape (N,) or (N, 1).
        ks: The K values to report, each in [1, N - 1].
        metric: Search metric, one of `tfmir.index.exact.METRICS`.
        batch_size: Queries searched at once.

    Returns:
        `{"recall@1": ..., "recall@2": ..., ...}`, one entry per K in `ks`.

    Example:

    >>> retrieval_metrics(np.eye(3)[[0, 0, 1, 1]], [0, 0, 1, 1], ks=(1,))
    {'recall@1': 1.0}

    Reference:
        Song et al., CVPR 2016, https://arxiv.org/abs/1511.06452 (Recall@K), as
        used by Feng et al., "Universal Model for Multi-Domain Medical Image
        Retrieval", https://arxiv.org/abs/2007.08628, Sec. IV (Table I).
    """
    labels = _as_label_vector(labels, "labels")
    ks = tuple(ks)
    if not ks or not all(_is_int(k) and k > 0 for k in ks):
        raise ValueError(
            f"ks must be a non-empty sequence of positive integers. Received: ks={ks!r}"
        )
    num_items = np.shape(embeddings)[0] if np.ndim(embeddings) else 0
    if num_items != labels.shape[0]:
        raise ValueError(
            "embeddings and labels must have the same length. "
            f"Received: {num_items} embeddings, {labels.shape[0]} labels"
        )
    _, indices = exact_search(
        embeddings,
        embeddings,
        max(ks),
        metric=metric,
        batch_size=batch_size,
        exclude_self=True,
    )
    neighbor_labels = labels[indices]
    return {f"recall@{k}": recall_at_k(labels, neighbor_labels, k) for k in ks}


def _relevance(query_labels, neighbor_labels, k):
    """Boolean (Q, k): whether each of the first k neighbours has the query's class."""
    query_labels = _as_label_vector(query_labels, "query_labels")
    neighbor_labels = np.asarray(neighbor_labels)
    if neighbor_labels.ndim != 2:
        raise ValueError(
            "neighbor_labels must be 2-D (queries, neighbours). "
            f"Received: neighbor_labels.shape={neighbor_labels.shape}"
        )
    if neighbor_labels.shape[0] != query_labels.shape[0]:
        raise ValueError(
            "query_labels and neighbor_labels must have the same number of queries. "
            f"Received: {query_labels.shape[0]} query labels, "
            f"neighbor_labels.shape={neighbor_labels.shape}"
        )
    if query_labels.shape[0] == 0:
        raise ValueError("At least one query is needed. Received: 0 queries")
    num_neighbors = neighbor_labels.shape[1]
    if not _is_int(k) or not 1 <= k <= num_neighbors:
        raise ValueError(
            f"k must be an integer in [1, {num_neighbors}] (the number of neighbours given). "
            f"Received: k={k!r}"
        )
    return neighbor_labels[:, :k] == query_labels[:, None]


def _as_label_vector(labels, name):
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(
            f"{name} must have shape (N,) or (N, 1). Received: {name}.shape={labels.shape}"
        )
    return labels


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
