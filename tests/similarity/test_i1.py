"""The I1 score (eq. 9-14): the harmonic mean, its zeros, identities and input checks."""

import warnings

import numpy as np
import pytest

from tfmir.similarity import harmonic_mean


def test_harmonic_mean_by_hand():
    # 2 / (1/0.5 + 1/1) = 2/3; 3 / (1/0.5 + 1/0.25 + 1/1) = 3/7; 2 / (1/0.8 + 1/0.2) = 0.32.
    np.testing.assert_allclose(harmonic_mean([0.5, 0.8], [1.0, 0.2]), [2 / 3, 0.32])
    np.testing.assert_allclose(harmonic_mean([0.5], [0.25], [1.0]), [3 / 7])
    assert harmonic_mean([0.3, 0.7]).tolist() == pytest.approx([0.3, 0.7])


def test_harmonic_mean_matches_a_python_loop():
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.01, 1.0, size=(3, 10))
    expected = [3 / sum(1 / s for s in column) for column in scores.T]
    np.testing.assert_allclose(harmonic_mean(*scores), expected, rtol=1e-14)


def test_a_zero_component_gives_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(harmonic_mean([0.0, 0.5, 0.0], [1.0, 0.0, 0.0]),
                                      [0.0, 0.0, 0.0])
        # 1/5e-324 overflows; the limit n / inf = 0 is kept, silently.
        assert harmonic_mean([5e-324], [1.0])[0] <= 1e-300


@pytest.mark.parametrize("value", [0.0, 1e-9, 0.37, 1.0])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_equal_scores_are_their_own_mean(value, count):
    np.testing.assert_allclose(harmonic_mean(*[[value]] * count), [value], rtol=1e-15)


def test_all_ones_score_one():
    np.testing.assert_array_equal(harmonic_mean(np.ones(4), np.ones(4), np.ones(4)), np.ones(4))


def test_bad_scores_are_named():
    with pytest.raises(ValueError, match=r"dice must lie in \[0, 1\]. Received values in "
                                         r"\[0.5, 1.5\]"):
        harmonic_mean([0.5], [0.5, 1.5], names=["euclidean", "dice"])
    with pytest.raises(ValueError, match=r"score 1 must lie in \[0, 1\]"):
        harmonic_mean([0.5], [-0.1])
    with pytest.raises(ValueError, match="style contains NaN"):
        harmonic_mean([np.nan], names=["style"])
    with pytest.raises(ValueError, match="needs at least one score array"):
        harmonic_mean()
    with pytest.raises(ValueError, match="names must name each of the 2 scores"):
        harmonic_mean([0.5], [0.5], names=["style"])
    with pytest.raises(ValueError, match=r"broadcast together. Received: .*'score 1': \(3,\)"):
        harmonic_mean([0.5, 0.5], [0.5, 0.5, 0.5])
