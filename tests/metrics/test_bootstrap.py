"""Paired bootstrap interval: exact cases by hand, coverage against the normal approximation."""

import numpy as np
import pytest

from tfmir.metrics import paired_bootstrap


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
