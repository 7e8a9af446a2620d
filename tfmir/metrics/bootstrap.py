"""Bootstrap confidence intervals of a model's mean outcome and of two models' difference.

Recall@1 on a few hundred queries moves by a few points from one seed to the next, so a score is
reported with the interval of its per-query outcomes resampled over queries (`bootstrap_mean`), and
a gain with the interval of the per-query difference (`paired_bootstrap`). A score that is not a
mean of per-query outcomes (mean class recall, a class's recall) gets the interval of the statistic
recomputed on resampled queries (`bootstrap_statistic`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def bootstrap_mean(values, *, groups=None, num_resamples: int = 10_000,
                   confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean of per-query `values` and its percentile bootstrap interval.

    With `groups` (e.g. each query's source) the statistic is the unweighted mean over groups of
    each group's mean, as a multi-domain table averages its columns, and queries are resampled
    within their group (a stratified bootstrap), so every resample keeps each group's size.

    Args:
        values: per-query outcomes, shape (Q,) (e.g. `recall_hits`, 0/1).
        groups: optional group of each query, shape (Q,).
        num_resamples: bootstrap resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: seed of the resampling.

    Returns:
        {"mean": ..., "low": ..., "high": ..., "confidence": ..., "num_queries": Q}, with
        "num_groups" when `groups` is given.

    Example:

    >>> bootstrap_mean([1, 1, 0, 0], groups=["a", "a", "b", "b"])["mean"]
    0.5

    Reference:
        Efron and Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13 (percentile
        interval).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array (one outcome per query). "
                         f"Received shape {values.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1). Received: confidence={confidence!r}")
    if int(num_resamples) != num_resamples or num_resamples < 1:
        raise ValueError(f"num_resamples must be a positive integer. Received: {num_resamples!r}")
    if groups is None:
        members = [values]
    else:
        groups = np.asarray(groups)
        if groups.shape != values.shape:
            raise ValueError("groups must give one group per query. Received shape "
                             f"{groups.shape} for {values.size} queries")
        members = [values[groups == group] for group in np.unique(groups)]
    rng = np.random.default_rng(seed)
    means = np.zeros(int(num_resamples))
    for group_values in members:
        # Chunks keep the (resamples, queries) index array small for large query sets.
        chunk = max(1, 2_000_000 // group_values.size)
        for start in range(0, means.size, chunk):
            rows = rng.integers(0, group_values.size,
                                size=(min(chunk, means.size - start), group_values.size))
            means[start:start + len(rows)] += group_values[rows].mean(axis=1) / len(members)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    result = {"mean": float(np.mean([group_values.mean() for group_values in members])),
              "low": float(low), "high": float(high), "confidence": confidence,
              "num_queries": int(values.size)}
    if groups is not None:
        result["num_groups"] = len(members)
    return result


def paired_bootstrap(first, second, *, groups=None, num_resamples: int = 10_000,
                     confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean of `second - first` over queries and its percentile bootstrap interval.

    The queries are resampled with replacement, the same resample for both models, so the
    interval accounts for the two outcomes of one query being correlated. `groups` averages
    per-group means with a stratified resample, as in `bootstrap_mean`.

    Args:
        first: per-query outcomes of the baseline, shape (Q,) (e.g. `recall_hits`, 0/1).
        second: per-query outcomes of the other model on the same queries, shape (Q,).
        groups: optional group of each query, shape (Q,).
        num_resamples: bootstrap resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: seed of the resampling.

    Returns:
        {"difference": mean(second - first), "low": ..., "high": ..., "confidence": ...,
        "num_queries": Q}, with "num_groups" when `groups` is given.

    Example:

    >>> paired_bootstrap([0, 0, 1, 1], [1, 1, 1, 1])["difference"]
    0.5
    """
    first = np.asarray(first, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)
    if first.ndim != 1 or first.shape != second.shape or first.size == 0:
        raise ValueError("first and second must be non-empty 1-D arrays of the same length (one "
                         f"outcome per query). Received shapes {first.shape} and {second.shape}")
    result = bootstrap_mean(second - first, groups=groups, num_resamples=num_resamples,
                            confidence=confidence, seed=seed)
    return {"difference": result.pop("mean"), **result}


def bootstrap_statistic(statistic: Callable[..., float], *arrays, num_resamples: int = 10_000,
                        confidence: float = 0.95, seed: int = 0) -> dict:
    """Any statistic of per-query arrays and its percentile bootstrap interval.

    The queries (rows of every array together) are resampled with replacement and `statistic`
    is recomputed on each resample, e.g. the mean class recall of (true labels, predictions).
    The resamples are the ones `bootstrap_mean` draws with the same seed and query count, so
    `bootstrap_statistic(np.mean, values)` gives `bootstrap_mean(values)`'s interval.

    A resample on which the statistic is undefined (`statistic` returns NaN, e.g. the recall of
    a class that the resample happens to miss) is left out of the percentiles and counted in
    "num_undefined".

    Args:
        statistic: function of the arrays, each indexed by the same resampled queries, to a
            float; called once on the arrays themselves and once per resample.
        *arrays: per-query arrays of equal length Q (their first axis).
        num_resamples: bootstrap resamples.
        confidence: coverage of the interval, in (0, 1).
        seed: seed of the resampling.

    Returns:
        {"value": statistic(*arrays), "low": ..., "high": ..., "confidence": ...,
        "num_queries": Q, "num_undefined": resamples left out}; low and high are NaN when no
        resample is defined.

    Example:

    >>> def mean_class_recall(y_true, y_pred):
    ...     return np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)])
    >>> bootstrap_statistic(mean_class_recall, np.array([0, 0, 0, 1]),
    ...                     np.array([0, 0, 1, 1]))["value"]
    0.8333333333333333

    Reference:
        Efron and Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13 (percentile
        interval).
    """
    if not arrays:
        raise ValueError("bootstrap_statistic needs at least one per-query array")
    arrays = [np.asarray(array) for array in arrays]
    num_queries = len(arrays[0]) if arrays[0].ndim else 0
    if num_queries == 0 or any(array.ndim == 0 or len(array) != num_queries
                               for array in arrays):
        raise ValueError("arrays must be non-empty with the same length (one row per query). "
                         f"Received shapes {[array.shape for array in arrays]}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1). Received: confidence={confidence!r}")
    if int(num_resamples) != num_resamples or num_resamples < 1:
        raise ValueError(f"num_resamples must be a positive integer. Received: {num_resamples!r}")
    rng = np.random.default_rng(seed)
    values = np.empty(int(num_resamples))
    # The same chunked draws as bootstrap_mean, so equal seeds give equal resamples.
    chunk = max(1, 2_000_000 // num_queries)
    for start in range(0, values.size, chunk):
        rows = rng.integers(0, num_queries, size=(min(chunk, values.size - start), num_queries))
        for offset, row in enumerate(rows):
            values[start + offset] = statistic(*(array[row] for array in arrays))
    defined = values[np.isfinite(values)]
    tail = 100 * (1 - confidence) / 2
    low, high = (np.percentile(defined, [tail, 100 - tail]) if defined.size
                 else (np.nan, np.nan))
    return {"value": float(statistic(*arrays)), "low": float(low), "high": float(high),
            "confidence": confidence, "num_queries": int(num_queries),
            "num_undefined": int(values.size - defined.size)}
