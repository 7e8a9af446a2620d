"""The nine similarity measures of paper 003's Table 1, scoring one query against a database.

Three single scores, each in [0, 1] with higher meaning more similar — the Euclidean score
ES (eq. 2), the rescaled cosine CS_new (eq. 4) and the style score SS (eq. 7) — and six I1
scores, the harmonic means of two or three of them and the Dice coefficient DC of the
segmentation masks (eq. 9-14). `COMPONENTS` lists what each measure combines and
`PAPER_TABLE1` the paper's top-5 success rate for each.
"""

import numbers
from collections.abc import Mapping

import numpy as np

from tfmir.similarity.cosine import rescaled_cosine
from tfmir.similarity.dice import dice_coefficient
from tfmir.similarity.euclidean import _distance_score
from tfmir.similarity.euclidean import euclidean_distances
from tfmir.similarity.gram_storage import pack_grams
from tfmir.similarity.gram_storage import style_losses_packed
from tfmir.similarity.i1 import harmonic_mean
from tfmir.similarity.style import style_losses

MEASURES = ("euclidean", "cosine", "style", "I1_ED", "I1_CD", "I1_ECD", "I1_SE", "I1_SC", "I1_SD")

# Component names: "euclidean" -> ES, "cosine" -> CS_new, "style" -> SS, "dice" -> DC.
COMPONENTS = {
    "euclidean": ("euclidean",),
    "cosine": ("cosine",),
    "style": ("style",),
    "I1_ED": ("euclidean", "dice"),
    "I1_CD": ("cosine", "dice"),
    "I1_ECD": ("euclidean", "cosine", "dice"),
    "I1_SE": ("style", "euclidean"),
    "I1_SC": ("style", "cosine"),
    "I1_SD": ("style", "dice"),
}

# Top-5 success rate (%) of each measure on 50 manually judged ISIC test queries, Table 1.
PAPER_TABLE1 = {
    "euclidean": 40.8,
    "cosine": 34.0,
    "style": 61.2,
    "I1_ED": 18.0,
    "I1_CD": 10.0,
    "I1_ECD": 18.4,
    "I1_SE": 44.4,
    "I1_SC": 46.4,
    "I1_SD": 6.0,
}

# maxima keys: the components normalised by a database maximum (eq. 2 and eq. 7).
MAXIMA_KEYS = ("euclidean", "style")

_FIELDS = ("vector", "grams", "packed_grams", "mask")
_NEEDS = {"vector": "feature vectors", "mask": "masks"}


def similarity_scores(measure: str, query: Mapping, database: Mapping, *,
                      layer_weights=None, maxima: Mapping | None = None,
                      threshold: float = 0.5) -> np.ndarray:
    """Scores every database item against the query with one of the paper's nine measures.

    Each component is computed from its field — ES and CS_new from "vector", SS from "grams"
    or "packed_grams", DC from "mask" — and an I1 measure is their harmonic mean. A measure
    reads only the fields its components need.

    Style losses come from the database's full "grams" when it has them; otherwise from its
    "packed_grams" (`pack_grams` rows) against the query's "packed_grams", or the query's
    "grams" packed here in float64 with `layer_weights`. Packed rows already hold their layer
    weights: the database and the query must have been packed with the same ones.

    Args:
        measure: one of `MEASURES`.
        query: the query's fields: "vector" (D,), "grams" (L arrays (C_l, C_l)),
            "packed_grams" (P,), "mask" (H, W) or (H, W, 1).
        database: the N items' fields: "vector" (N, D), "grams" (L arrays (N, C_l, C_l)),
            "packed_grams" (N, P), "mask" (N, H, W) or (N, H, W, 1).
        layer_weights: β_l of the style loss, one per Gram layer (None: all 1).
        maxima: optional {"euclidean": ED_max, "style": LS_max} to normalise with instead of
            the database maxima, e.g. the whole archive's when re-ranking a candidate subset.
        threshold: mask probability above which a pixel is lesion, for the Dice coefficient.

    Returns:
        float64 array (N,) in [0, 1], higher is more similar.

    Example:

    >>> query = {"vector": np.array([1.0, 0.0]), "mask": np.array([[1, 1], [0, 0]])}
    >>> database = {"vector": np.array([[1.0, 0.0], [0.0, 1.0]]),
    ...             "mask": np.array([[[1, 1], [0, 0]], [[1, 0], [0, 0]]])}
    >>> similarity_scores("I1_CD", query, database)  # CS_new 1, 0.5; DC 1, 2/3 -> 1, 4/7
    array([1.        , 0.57142857])

    Reference:
        Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data
        using Style Transfer, Semantic Image Segmentation and Ensemble Learning", 2021,
        https://arxiv.org/abs/2110.06331, Sec. 2 (eq. 1-14) and Table 1.
    """
    if not isinstance(measure, str) or measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}. Received: measure={measure!r}")
    for side, fields in (("query", query), ("database", database)):
        if not isinstance(fields, Mapping):
            raise ValueError(f"{side} must be a dict with some of the fields {_FIELDS}. "
                             f"Received: {type(fields).__name__}")
    maxima = _maxima(maxima)
    scores = {}
    for component in COMPONENTS[measure]:
        if component == "euclidean":
            distances = euclidean_distances(*_field(measure, query, database, "vector"))
            scores[component] = _distance_score(distances, maxima.get("euclidean"),
                                                "maxima['euclidean']")
        elif component == "cosine":
            scores[component] = rescaled_cosine(*_field(measure, query, database, "vector"))
        elif component == "dice":
            query_mask, database_masks = _field(measure, query, database, "mask")
            scores[component] = dice_coefficient(query_mask, database_masks, threshold)
        else:
            losses = _style_losses(measure, query, database, layer_weights)
            scores[component] = _distance_score(losses, maxima.get("style"), "maxima['style']")
    sizes = {component: score.shape[0] for component, score in scores.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"the database fields must hold the same number of items. "
                         f"Received per component: {sizes}")
    if len(scores) == 1:
        return scores[COMPONENTS[measure][0]]
    return harmonic_mean(*scores.values(), names=list(scores))


def rank(measure: str, query: Mapping, database: Mapping, k: int,
         **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The k database items most similar to the query, best first.

    Args:
        measure: one of `MEASURES`.
        query: the query's fields (see `similarity_scores`).
        database: the N items' fields (see `similarity_scores`).
        k: how many items to return, 1 <= k <= N.
        **kwargs: `layer_weights`, `maxima`, `threshold` of `similarity_scores`.

    Returns:
        (indices, scores): int64 (k,) database indices by descending score, equal scores in
        increasing index order, and their float64 (k,) scores.

    Example:

    >>> query = {"vector": np.array([3.0, 4.0])}
    >>> database = {"vector": np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [3.0, 4.0]])}
    >>> rank("euclidean", query, database, k=3)  # ES 0, 1, 0, 1: the two copies, then item 0
    (array([1, 3, 0]), array([1., 1., 0.]))
    """
    scores = similarity_scores(measure, query, database, **kwargs)
    if (isinstance(k, bool) or not isinstance(k, numbers.Integral)
            or not 1 <= k <= scores.shape[0]):
        raise ValueError(f"k must be an integer in [1, {scores.shape[0]}] (the database size). "
                         f"Received: k={k!r}")
    # A stable sort on the negated scores keeps tied items in index order.
    indices = np.argsort(-scores, kind="stable")[:k].astype(np.int64)
    return indices, scores[indices]


def _field(measure: str, query: Mapping, database: Mapping, field: str) -> tuple:
    """The query's and the database's `field`, or an error naming the side that lacks it."""
    for side, fields in (("query", query), ("database", database)):
        if field not in fields:
            raise ValueError(f"measure {measure!r} needs {_NEEDS[field]}: the {side} has no "
                             f"{field!r}")
    return query[field], database[field]


def _style_losses(measure: str, query: Mapping, database: Mapping, layer_weights) -> np.ndarray:
    """LS from full Grams when the database has them, else from packed rows."""
    if "grams" in database:
        if "grams" not in query:
            raise ValueError(f"measure {measure!r} needs Gram matrices: the query has no "
                             "'grams' (a database of full 'grams' is compared with full ones)")
        return style_losses(query["grams"], database["grams"], layer_weights)
    if "packed_grams" not in database:
        raise ValueError(f"measure {measure!r} needs Gram matrices: the database has no "
                         "'grams' or 'packed_grams'")
    if "packed_grams" in query:
        query_packed = query["packed_grams"]
    elif "grams" in query:
        query_packed = pack_grams(_query_grams(query["grams"]), layer_weights, "float64")[0]
    else:
        raise ValueError(f"measure {measure!r} needs Gram matrices: the query has no "
                         "'grams' or 'packed_grams'")
    return style_losses_packed(query_packed, database["packed_grams"])


def _query_grams(grams) -> list[np.ndarray]:
    """The query's L (C_l, C_l) Grams as a batch of one, checked before packing."""
    grams = [np.asarray(gram, np.float64) for gram in grams]
    for layer, gram in enumerate(grams):
        if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
            raise ValueError(f"the query's Gram matrices must be (C_l, C_l). Received shapes: "
                             f"{[gram.shape for gram in grams]}")
        if not np.all(np.isfinite(gram)):
            raise ValueError(
                f"the query's Gram matrix of layer {layer} contains NaN or inf; the feature "
                "extractor produced a non-finite output (e.g. a blank or all-black image "
                "normalised by zero, or a float16 overflow)"
            )
    return [gram[None] for gram in grams]


def _maxima(maxima) -> dict:
    """The caller's ED_max / LS_max, checked even when the measure does not use them."""
    if maxima is None:
        return {}
    if not isinstance(maxima, Mapping) or not set(maxima) <= set(MAXIMA_KEYS):
        raise ValueError(f"maxima must be a dict with keys among {MAXIMA_KEYS}. "
                         f"Received: maxima={maxima!r}")
    for key, value in maxima.items():
        if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not np.isfinite(value) or value < 0):
            raise ValueError(f"maxima[{key!r}] must be a finite number >= 0. "
                             f"Received: maxima={dict(maxima)!r}")
    return dict(maxima)
