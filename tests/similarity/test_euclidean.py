"""Euclidean distance and score (eq. 1-2) against hand arithmetic and a Python loop."""

import math

import numpy as np
import pytest

from tfmir.similarity import euclidean_distances
from tfmir.similarity import euclidean_score

QUERY = [3.0, 4.0]
# ED from (3, 4): to (0, 0) sqrt(9 + 16) = 5; to itself 0; to (6, 8) 5; to (3, 0) 4.
DATABASE = [[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [3.0, 0.0]]


def test_distances_by_hand():
    distances = euclidean_distances(QUERY, DATABASE)
    assert distances.dtype == np.float64 and distances.shape == (4,)
    np.testing.assert_array_equal(distances, [5.0, 0.0, 5.0, 4.0])


def test_distances_match_a_python_loop():
    rng = np.random.default_rng(0)
    query = rng.normal(size=7)
    database = rng.normal(size=(9, 7)).astype(np.float32)
    expected = [math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(query, row)))
                for row in database]
    np.testing.assert_allclose(euclidean_distances(query, database), expected, rtol=1e-12)


def test_near_duplicates_keep_their_small_distance():
    # |x|² − 2x·y + |y|² would cancel to 0 (or noise) at this magnitude; differences do not.
    distances = euclidean_distances([1e8, 0.0], [[1e8 + 1.0, 0.0], [1e8, 0.0]])
    np.testing.assert_array_equal(distances, [1.0, 0.0])


def test_score_by_hand():
    # ED 5, 0, 5, 4 and ED_max = 5 -> 1 - ED/5 = 0, 1, 0, 0.2.
    np.testing.assert_allclose(euclidean_score(QUERY, DATABASE), [0.0, 1.0, 0.0, 0.2])


def test_score_with_a_given_max_distance_clips_above_it():
    # ED_max 10: 1 - (5, 0, 5, 4)/10 = 0.5, 1, 0.5, 0.6.
    np.testing.assert_allclose(euclidean_score(QUERY, DATABASE, max_distance=10.0),
                               [0.5, 1.0, 0.5, 0.6])
    # ED_max 4.5 (a candidate subset's): 5 > 4.5 clips to 0; 4 -> 1 - 4/4.5 = 1/9.
    np.testing.assert_allclose(euclidean_score(QUERY, DATABASE, max_distance=4.5),
                               [0.0, 1.0, 0.0, 1 / 9])


def test_identical_database_scores_one():
    np.testing.assert_array_equal(euclidean_score(QUERY, [QUERY, QUERY]), [1.0, 1.0])
    # A given ED_max of 0: the item at distance 0 scores 1, the others lie beyond it.
    np.testing.assert_array_equal(euclidean_score(QUERY, DATABASE, max_distance=0.0),
                                  [0.0, 1.0, 0.0, 0.0])


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"query.shape=\(2,\), database.shape=\(2, 3\)"):
        euclidean_distances(QUERY, np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"query must be a vector \(D,\) and database a matrix"):
        euclidean_distances([QUERY], DATABASE)
    with pytest.raises(ValueError, match=r"N >= 1. Received: query.shape=\(2,\), "):
        euclidean_distances(QUERY, np.zeros((0, 2)))


def test_non_finite_vectors_are_named():
    with pytest.raises(ValueError, match="the query feature vector contains NaN or inf"):
        euclidean_score([np.nan, 0.0], DATABASE)
    database = np.array(DATABASE)
    database[2, 1] = np.inf
    with pytest.raises(ValueError, match="database item 2 contains NaN or inf; .*all black"):
        euclidean_score(QUERY, database)


@pytest.mark.parametrize("max_distance", [-1.0, float("nan"), float("inf"), "5", True])
def test_bad_max_distance(max_distance):
    with pytest.raises(ValueError, match="max_distance must be a finite number >= 0"):
        euclidean_score(QUERY, DATABASE, max_distance=max_distance)
