"""Cosine similarity (eq. 3) and its [0, 1] rescaling (eq. 4) against hand arithmetic."""

import math
import warnings

import numpy as np
import pytest

from tfmir.similarity import cosine_similarity
from tfmir.similarity import rescaled_cosine

QUERY = [1.0, 0.0]
# CS from (1, 0): (2, 0) 1; (0, 3) 0; (-1, 0) -1; (1, 1) 1/sqrt(2); the zero vector 0 by definition.
DATABASE = [[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0], [0.0, 0.0]]


def test_cosine_by_hand():
    cosines = cosine_similarity(QUERY, DATABASE)
    assert cosines.dtype == np.float64 and cosines.shape == (5,)
    np.testing.assert_allclose(cosines, [1.0, 0.0, -1.0, 1 / math.sqrt(2), 0.0], atol=1e-15)


def test_rescaled_cosine_by_hand():
    # (CS + 1) / 2: 1, 0.5, 0, (1 + 1/sqrt(2)) / 2, 0.5.
    np.testing.assert_allclose(rescaled_cosine(QUERY, DATABASE),
                               [1.0, 0.5, 0.0, (1 + 1 / math.sqrt(2)) / 2, 0.5], atol=1e-15)


def test_zero_vectors_give_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(cosine_similarity([0.0, 0.0], DATABASE), np.zeros(5))
        np.testing.assert_array_equal(rescaled_cosine([0.0, 0.0], [[0.0, 0.0]]), [0.5])


def test_cosine_matches_a_python_loop():
    rng = np.random.default_rng(0)
    query = rng.normal(size=6)
    database = rng.normal(size=(8, 6))
    expected = [sum(x * y for x, y in zip(query, row))
                / math.sqrt(sum(x * x for x in query)) / math.sqrt(sum(y * y for y in row))
                for row in database]
    np.testing.assert_allclose(cosine_similarity(query, database), expected, rtol=1e-12)


def test_parallel_vectors_stay_within_range():
    # Rounding can put x·y a hair above |x||y|; clipping keeps CS_new <= 1 for the I1 score.
    rng = np.random.default_rng(1)
    query = rng.uniform(0.1, 1.0, size=5)
    database = query * rng.uniform(0.5, 3.0, size=(200, 1))
    cosines = cosine_similarity(query, database)
    assert cosines.max() <= 1.0 and cosines.min() > 1.0 - 1e-12
    assert rescaled_cosine(query, database).max() <= 1.0


def test_errors_name_the_input():
    with pytest.raises(ValueError, match=r"query.shape=\(2,\), database.shape=\(1, 3\)"):
        cosine_similarity(QUERY, [[1.0, 2.0, 3.0]])
    database = np.array(DATABASE)
    database[1, 0] = np.nan
    with pytest.raises(ValueError, match="database item 1 contains NaN or inf"):
        rescaled_cosine(QUERY, database)
