"""Paired bootstrap interval: exact cases by hand, coverage against the normal approximation."""

import numpy as np
import pytest

from tfmir.metrics import bootstrap_mean, paired_bootstrap
from tfmir.metrics.bootstrap import bootstrap_statistic


def test_identical_models_have_a_zero_width_interval_at_zero():
    outcomes = np.array([1, 0, 1, 1, 0])
    result = paired_bootstrap(outcomes, outcomes, num_resamples=200)
    assert (result["difference"], result["low"], result["high"]) == (0.0, 0.0, 0.0)


def test_a_gain_on_every_query_is_exact():
    # Every resample of "second beats first on each query" has mean difference exactly 1.
    result = paired_bootstrap(np.zeros(7), np.ones(7), num_resamples=200)
    assert (result["difference"], result["low"], result["high"]) == (1.0, 1.0, 1.0)
    assert result["num_queries"] == 7


def test_interval_matches_the_normal_approximation_on_many_queries():
    # 2000 queries: 30 % gained, 10 % lost, the rest unchanged -> per-query difference d with
    # mean 0.2 and variance E[d^2] - 0.2^2 = 0.4 - 0.04 = 0.36; standard error 0.6 / sqrt(2000).
    # The percentile interval is then mean +- 1.96 SE up to resampling noise.
    rng = np.random.default_rng(3)
    first = np.zeros(2000)
    second = np.zeros(2000)
    order = rng.permutation(2000)
    second[order[:600]] = 1          # gained
    first[order[600:800]] = 1        # lost
    first[order[800:1200]] = 1       # both right
    second[order[800:1200]] = 1
    result = paired_bootstrap(first, second, num_resamples=4000, seed=1)
    half_width = 1.96 * 0.6 / np.sqrt(2000)
    assert result["difference"] == pytest.approx(0.2)
    assert result["low"] == pytest.approx(0.2 - half_width, abs=0.004)
    assert result["high"] == pytest.approx(0.2 + half_width, abs=0.004)


def test_pairing_narrows_the_interval_of_correlated_outcomes():
    # The same 1000 outcomes with 20 queries flipped to right: paired, the difference is 0.02
    # and never negative; unpaired resampling would straddle 0 widely.
    rng = np.random.default_rng(0)
    first = (rng.uniform(size=1000) < 0.5).astype(float)
    second = first.copy()
    second[np.flatnonzero(first == 0)[:20]] = 1
    result = paired_bootstrap(first, second, num_resamples=2000)
    assert result["difference"] == pytest.approx(0.02)
    assert 0 < result["low"] < 0.02 < result["high"]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"same length.*\(3,\) and \(2,\)"):
        paired_bootstrap([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="confidence must be in"):
        paired_bootstrap([1], [0], confidence=1.5)
    with pytest.raises(ValueError, match="num_resamples must be a positive integer"):
        paired_bootstrap([1], [0], num_resamples=0)


def test_groups_average_the_group_means_unweighted():
    # Group "a": 10 queries all gained (mean 1); group "b": 2 queries unchanged (mean 0). The
    # unweighted mean over groups is 0.5 (pooled over queries it would be 10 / 12), and as each
    # group's difference is constant every stratified resample gives exactly 0.5.
    first = np.zeros(12)
    second = np.r_[np.ones(10), np.zeros(2)]
    groups = np.array(["a"] * 10 + ["b"] * 2)
    result = paired_bootstrap(first, second, groups=groups, num_resamples=300)
    assert (result["difference"], result["low"], result["high"]) == (0.5, 0.5, 0.5)
    assert (result["num_queries"], result["num_groups"]) == (12, 2)


def test_grouped_interval_matches_the_normal_approximation():
    # Two groups of 1500 queries with per-query differences of variance 0.36 (group a, as above:
    # 30 % gained, 10 % lost) and 0.25 (group b: 50 % gained, 0 lost, mean 0.5). The average of
    # the two group means has standard error sqrt(0.36 / 1500 + 0.25 / 1500) / 2.
    rng = np.random.default_rng(5)
    first = np.zeros(3000)
    second = np.zeros(3000)
    order = rng.permutation(1500)
    second[order[:450]] = 1
    first[order[450:600]] = 1
    second[1500 + rng.permutation(1500)[:750]] = 1
    groups = np.repeat([0, 1], 1500)
    result = paired_bootstrap(first, second, groups=groups, num_resamples=4000, seed=2)
    half_width = 1.96 * np.sqrt(0.36 / 1500 + 0.25 / 1500) / 2
    assert result["difference"] == pytest.approx((0.2 + 0.5) / 2)
    assert result["low"] == pytest.approx(0.35 - half_width, abs=0.003)
    assert result["high"] == pytest.approx(0.35 + half_width, abs=0.003)


def test_groups_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"one group per query. Received shape \(2,\) for 3"):
        paired_bootstrap([1, 0, 1], [1, 1, 1], groups=["a", "b"])


def test_bootstrap_mean_matches_the_normal_approximation():
    # 1000 outcomes, 400 right: mean 0.4, standard error sqrt(0.4 * 0.6 / 1000).
    values = np.zeros(1000)
    values[np.random.default_rng(1).permutation(1000)[:400]] = 1
    result = bootstrap_mean(values, num_resamples=4000, seed=3)
    half_width = 1.96 * np.sqrt(0.4 * 0.6 / 1000)
    assert result["mean"] == pytest.approx(0.4)
    assert result["low"] == pytest.approx(0.4 - half_width, abs=0.004)
    assert result["high"] == pytest.approx(0.4 + half_width, abs=0.004)
    with pytest.raises(ValueError, match=r"values must be a non-empty 1-D array.*\(2, 2\)"):
        bootstrap_mean(np.zeros((2, 2)))


def _mean_class_recall(y_true, y_pred):
    return np.mean([np.mean(y_pred[y_true == label] == label) for label in np.unique(y_true)])


def test_bootstrap_statistic_of_the_mean_is_bootstrap_mean():
    # Same seed and query count -> the same resamples, so the same interval to the last bit.
    values = (np.random.default_rng(4).uniform(size=301) < 0.3).astype(float)
    general = bootstrap_statistic(np.mean, values, num_resamples=500, seed=7)
    special = bootstrap_mean(values, num_resamples=500, seed=7)
    assert general["value"] == special["mean"]
    assert (general["low"], general["high"]) == (special["low"], special["high"])
    assert (general["num_queries"], general["num_undefined"]) == (301, 0)


def test_bootstrap_statistic_matches_an_explicit_resampling_loop():
    # Independent oracle: one resample of the queries at a time with NumPy's generator (drawing
    # row by row gives the same stream as bootstrap_statistic's chunked draws), the mean class
    # recall by a plain Python loop over queries, then the 2.5th and 97.5th percentiles.
    rng = np.random.default_rng(11)
    y_true = rng.integers(0, 4, size=120)
    y_pred = np.where(rng.uniform(size=120) < 0.6, y_true, rng.integers(0, 4, size=120))
    result = bootstrap_statistic(_mean_class_recall, y_true, y_pred, num_resamples=300, seed=2)

    def mean_class_recall_loop(true, predicted):
        hits, counts = {}, {}
        for label, guess in zip(true.tolist(), predicted.tolist()):
            counts[label] = counts.get(label, 0) + 1
            hits[label] = hits.get(label, 0) + (label == guess)
        return sum(hits[label] / counts[label] for label in counts) / len(counts)

    oracle_rng = np.random.default_rng(2)
    statistics = []
    for _ in range(300):
        rows = oracle_rng.integers(0, 120, size=(1, 120))[0]
        statistics.append(mean_class_recall_loop(y_true[rows], y_pred[rows]))
    assert result["value"] == pytest.approx(mean_class_recall_loop(y_true, y_pred))
    assert result["low"] == pytest.approx(np.percentile(statistics, 2.5))
    assert result["high"] == pytest.approx(np.percentile(statistics, 97.5))


def test_bootstrap_statistic_leaves_out_undefined_resamples():
    # The recall of class 1, which has a single query (always right): a resample that misses
    # it is undefined (NaN); every other resample gives exactly 1. P(miss) = (4/5)^5 ~ 0.33.
    y_true = np.array([0, 0, 0, 0, 1])
    y_pred = np.array([0, 1, 0, 1, 1])

    def recall_of_one(true, predicted):
        members = true == 1
        return np.mean(predicted[members] == 1) if members.any() else np.nan

    result = bootstrap_statistic(recall_of_one, y_true, y_pred, num_resamples=1000)
    assert (result["value"], result["low"], result["high"]) == (1.0, 1.0, 1.0)
    assert 250 < result["num_undefined"] < 420


def test_bootstrap_statistic_refuses_arrays_of_different_lengths():
    with pytest.raises(ValueError, match=r"same length.*\(3,\), \(2,\)"):
        bootstrap_statistic(_mean_class_recall, [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_statistic(np.mean)
    with pytest.raises(ValueError, match="confidence must be in"):
        bootstrap_statistic(np.mean, [1.0], confidence=0)
