"""The nine measures of Table 1 on a hand-worked five-item database, packed Grams, ranking."""

import re

import numpy as np
import pytest

from tfmir.similarity import COMPONENTS
from tfmir.similarity import MEASURES
from tfmir.similarity import PAPER_TABLE1
from tfmir.similarity import pack_grams
from tfmir.similarity import rank
from tfmir.similarity import similarity_scores

# Query vector (3, 4), |q| = 5. Items: (3, 4), (0, 0), (-3, -4), (6, 8), (3, -4).
#   ED = 0, 5, 10, 5, 8 and ED_max = 10   -> ES = 1, 0.5, 0, 0.5, 0.2
#   CS = 1, 0 (zero vector), -1, 1, (9 - 16)/25 = -0.28 -> CS_new = 1, 0.5, 0, 1, 0.36
# Query Gram I (2×2). Item differences from I:
#   0; [[0, 1], [1, 0]]; [[0, 2], [2, 0]]; [[2, 0], [0, 0]]; [[0, 1], [1, 2]]
#   LS = 0, 2, 8, 4, 6 and LS_max = 8     -> SS = 1, 0.75, 0, 0.5, 0.25
# Query mask [[1, 1], [0, 0]] (|X| = 2). Items: the same; [[1, 0], [0, 0]]; [[0, 0], [1, 1]];
#   all ones; [[0, 1], [1, 0]]            -> DC = 1, 2/3, 0, 4/6, 2/4
QUERY = {
    "vector": np.array([3.0, 4.0]),
    "grams": [np.eye(2)],
    "mask": np.array([[1, 1], [0, 0]]),
}
DATABASE = {
    "vector": np.array([[3.0, 4.0], [0.0, 0.0], [-3.0, -4.0], [6.0, 8.0], [3.0, -4.0]]),
    "grams": [np.array([np.eye(2), [[1.0, 1.0], [1.0, 1.0]], [[1.0, 2.0], [2.0, 1.0]],
                        [[3.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 3.0]]])],
    "mask": np.array([[[1, 1], [0, 0]], [[1, 0], [0, 0]], [[0, 0], [1, 1]],
                      [[1, 1], [1, 1]], [[0, 1], [1, 0]]]),
}
# Harmonic means n / Σ 1/s of the components above, item by item (item 0: all ones -> 1;
# item 2: a zero component -> 0):
EXPECTED = {
    "euclidean": [1.0, 0.5, 0.0, 0.5, 0.2],
    "cosine": [1.0, 0.5, 0.0, 1.0, 0.36],
    "style": [1.0, 0.75, 0.0, 0.5, 0.25],
    # 2/(2 + 3/2) = 4/7; 2/(2 + 3/2) = 4/7; 2/(5 + 2) = 2/7
    "I1_ED": [1.0, 4 / 7, 0.0, 4 / 7, 2 / 7],
    # 2/(2 + 3/2) = 4/7; 2/(1 + 3/2) = 4/5; 2/(25/9 + 2) = 18/43
    "I1_CD": [1.0, 4 / 7, 0.0, 4 / 5, 18 / 43],
    # 3/(2 + 2 + 3/2) = 6/11; 3/(2 + 1 + 3/2) = 2/3; 3/(5 + 25/9 + 2) = 27/88
    "I1_ECD": [1.0, 6 / 11, 0.0, 2 / 3, 27 / 88],
    # 2/(4/3 + 2) = 3/5; 2/(2 + 2) = 1/2; 2/(4 + 5) = 2/9
    "I1_SE": [1.0, 3 / 5, 0.0, 1 / 2, 2 / 9],
    # 2/(4/3 + 2) = 3/5; 2/(2 + 1) = 2/3; 2/(4 + 25/9) = 18/61
    "I1_SC": [1.0, 3 / 5, 0.0, 2 / 3, 18 / 61],
    # 2/(4/3 + 3/2) = 12/17; 2/(2 + 3/2) = 4/7; 2/(4 + 2) = 1/3
    "I1_SD": [1.0, 12 / 17, 0.0, 4 / 7, 1 / 3],
}


def test_tables_agree_with_the_paper():
    assert MEASURES == tuple(EXPECTED) == tuple(COMPONENTS) == tuple(PAPER_TABLE1)
    assert COMPONENTS["I1_ECD"] == ("euclidean", "cosine", "dice")
    assert COMPONENTS["I1_SE"] == ("style", "euclidean")
    assert PAPER_TABLE1["style"] == 61.2 and PAPER_TABLE1["I1_SD"] == 6.0
    # Table 1's finding: style alone is best, every I1 with Dice is below the baseline (ES).
    assert max(PAPER_TABLE1, key=PAPER_TABLE1.get) == "style"
    assert all(PAPER_TABLE1[m] < PAPER_TABLE1["euclidean"]
               for m in MEASURES if "dice" in COMPONENTS[m])


@pytest.mark.parametrize("measure", MEASURES)
def test_every_measure_by_hand(measure):
    scores = similarity_scores(measure, QUERY, DATABASE)
    assert scores.dtype == np.float64 and scores.shape == (5,)
    np.testing.assert_allclose(scores, EXPECTED[measure], rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("measure", ["style", "I1_SE", "I1_SD"])
@pytest.mark.parametrize("query_side", ["grams", "packed_grams"])
def test_packed_grams_replace_full_ones(measure, query_side):
    weights = [0.5]
    database = {**DATABASE, "packed_grams": pack_grams(DATABASE["grams"], weights, "float32")}
    del database["grams"]
    query = dict(QUERY)
    if query_side == "packed_grams":
        query["packed_grams"] = pack_grams([np.eye(2)[None]], weights, "float64")[0]
        del query["grams"]
    # β scales every loss by β² = 1/4, which cancels in LS / LS_max.
    scores = similarity_scores(measure, query, database, layer_weights=weights)
    np.testing.assert_allclose(scores, EXPECTED[measure], rtol=1e-6, atol=1e-7)


def test_maxima_replace_the_database_maxima():
    # ED_max 20: 1 - (0, 5, 10, 5, 8)/20; LS_max 16: 1 - (0, 2, 8, 4, 6)/16.
    maxima = {"euclidean": 20.0, "style": 16.0}
    np.testing.assert_allclose(similarity_scores("euclidean", QUERY, DATABASE, maxima=maxima),
                               [1.0, 0.75, 0.5, 0.75, 0.6])
    np.testing.assert_allclose(similarity_scores("style", QUERY, DATABASE, maxima=maxima),
                               [1.0, 0.875, 0.5, 0.75, 0.625])
    # I1_SE on item 4: 2 / (1/0.625 + 1/0.6) = 2 / (1.6 + 5/3) = 30/49.
    assert similarity_scores("I1_SE", QUERY, DATABASE, maxima=maxima)[4] == pytest.approx(30 / 49)
    # A candidate subset scored with the whole database's maxima keeps the whole one's scores.
    subset = {field: value[3:] for field, value in DATABASE.items() if field != "grams"}
    subset["grams"] = [DATABASE["grams"][0][3:]]
    np.testing.assert_allclose(
        similarity_scores("I1_SE", QUERY, subset, maxima={"euclidean": 10.0, "style": 8.0}),
        EXPECTED["I1_SE"][3:])
    with pytest.raises(ValueError, match=r"maxima must be a dict with keys among "
                                         r"\('euclidean', 'style'\)"):
        similarity_scores("style", QUERY, DATABASE, maxima={"ED_max": 3.0})


def test_threshold_reaches_the_dice_component():
    query = {"mask": np.array([[0.9, 0.3]])}
    database = {"mask": np.array([[[0.9, 0.3]], [[0.3, 0.9]]]), "vector": np.ones((2, 1))}
    query["vector"] = np.ones(1)
    # At 0.5 the masks are [1, 0] vs [1, 0] and [0, 1]: DC 1, 0. At 0.2 all ones: DC 1, 1.
    np.testing.assert_array_equal(similarity_scores("I1_CD", query, database), [1.0, 0.0])
    np.testing.assert_array_equal(similarity_scores("I1_CD", query, database, threshold=0.2),
                                  [1.0, 1.0])


def test_unknown_measure():
    message = ("measure must be one of ('euclidean', 'cosine', 'style', 'I1_ED', 'I1_CD', "
               "'I1_ECD', 'I1_SE', 'I1_SC', 'I1_SD'). Received: measure='I1_EC'")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        similarity_scores("I1_EC", QUERY, DATABASE)


@pytest.mark.parametrize("measure, side, field, message", [
    ("I1_SD", "database", "mask", "measure 'I1_SD' needs masks: the database has no 'mask'"),
    ("I1_CD", "query", "mask", "measure 'I1_CD' needs masks: the query has no 'mask'"),
    ("euclidean", "query", "vector",
     "measure 'euclidean' needs feature vectors: the query has no 'vector'"),
    ("style", "database", "grams",
     "measure 'style' needs Gram matrices: the database has no 'grams' or 'packed_grams'"),
    ("I1_SC", "query", "grams", "measure 'I1_SC' needs Gram matrices: the query has no 'grams'"),
])
def test_missing_fields_are_named(measure, side, field, message):
    query, database = dict(QUERY), dict(DATABASE)
    del (query if side == "query" else database)[field]
    with pytest.raises(ValueError, match=f"^{message}"):
        similarity_scores(measure, query, database)


def test_query_without_any_grams_against_packed_database():
    database = {"packed_grams": pack_grams(DATABASE["grams"])}
    with pytest.raises(ValueError, match="measure 'style' needs Gram matrices: the query has no "
                                         "'grams' or 'packed_grams'"):
        similarity_scores("style", {"vector": QUERY["vector"]}, database)


def test_non_finite_inputs_are_named():
    grams = DATABASE["grams"][0].copy()
    grams[3, 1, 1] = np.nan
    with pytest.raises(ValueError, match="database item 3's Gram matrix of layer 0 contains NaN"):
        similarity_scores("I1_SD", QUERY, {**DATABASE, "grams": [grams]})
    with pytest.raises(ValueError, match="the query's Gram matrix of layer 0 contains NaN"):
        similarity_scores("style", {"grams": [np.full((2, 2), np.nan)]},
                          {"packed_grams": pack_grams(DATABASE["grams"])})
    with pytest.raises(ValueError, match="the query feature vector contains NaN or inf; "
                                         ".*all-black image"):
        similarity_scores("cosine", {"vector": np.array([np.inf, 0.0])}, DATABASE)


def test_shape_disagreements_name_both_shapes():
    with pytest.raises(ValueError, match=r"query.shape=\(3,\), database.shape=\(5, 2\)"):
        similarity_scores("euclidean", {"vector": np.ones(3)}, DATABASE)
    with pytest.raises(ValueError, match=r"query shapes \[\(3, 3\)\], database shapes "
                                         r"\[\(5, 2, 2\)\]"):
        similarity_scores("style", {"grams": [np.eye(3)]}, DATABASE)
    packed = {"packed_grams": pack_grams(DATABASE["grams"])}
    with pytest.raises(ValueError, match=r"query_packed.shape=\(6,\), "
                                         r"database_packed.shape=\(5, 3\)"):
        similarity_scores("style", {"grams": [np.eye(3)]}, packed)
    with pytest.raises(ValueError, match=r"same number of items. Received per component: "
                                         r"\{'euclidean': 5, 'dice': 4\}"):
        similarity_scores("I1_ED", QUERY, {**DATABASE, "mask": DATABASE["mask"][:4]})
    with pytest.raises(ValueError, match="database must be a dict with some of the fields"):
        similarity_scores("cosine", QUERY, DATABASE["vector"])


def test_rank_orders_by_score_and_breaks_ties_by_index():
    # I1_ED: 1, 4/7, 0, 4/7, 2/7 -> item 0, then the tied items 1 and 3 in index order.
    indices, scores = rank("I1_ED", QUERY, DATABASE, k=3)
    assert indices.dtype == np.int64 and scores.dtype == np.float64
    assert indices.tolist() == [0, 1, 3]
    np.testing.assert_allclose(scores, [1.0, 4 / 7, 4 / 7])
    # ES 1, 0.5, 0, 0.5, 0.2 over all five: ties (1, 3) keep index order, zero last.
    indices, scores = rank("euclidean", QUERY, DATABASE, k=5)
    assert indices.tolist() == [0, 1, 3, 4, 2]
    # Keyword arguments reach similarity_scores: with ED_max 20 the order is unchanged.
    indices, scores = rank("euclidean", QUERY, DATABASE, k=2, maxima={"euclidean": 20.0})
    assert indices.tolist() == [0, 1] and scores.tolist() == [1.0, 0.75]


def test_rank_is_stable_among_many_equal_scores():
    database = {"vector": np.tile([[1.0, 0.0], [0.0, 1.0]], (50, 1))}
    indices, _ = rank("cosine", {"vector": np.array([1.0, 0.0])}, database, k=50)
    assert indices.tolist() == list(range(0, 100, 2))


@pytest.mark.parametrize("k", [0, 6, 2.0, True])
def test_rank_rejects_bad_k(k):
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 5\] \(the database "
                                         r"size\). Received: k="):
        rank("cosine", QUERY, DATABASE, k=k)


def test_bad_maxima_values_are_named():
    with pytest.raises(ValueError, match=r"maxima\['euclidean'\] must be a finite number >= 0"):
        similarity_scores("I1_SE", QUERY, DATABASE, maxima={"euclidean": -1.0})
    with pytest.raises(ValueError, match=r"maxima\['style'\] must be a finite number >= 0"):
        similarity_scores("I1_SE", QUERY, DATABASE, maxima={"style": float("nan")})
    # Checked even where the measure does not use it: a bad value is a bug at the caller.
    with pytest.raises(ValueError, match=r"maxima\['style'\] must be a finite number >= 0"):
        similarity_scores("cosine", QUERY, DATABASE, maxima={"style": "8"})
