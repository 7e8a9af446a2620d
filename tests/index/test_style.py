"""StyleDatabase against a brute-force oracle built from the similarity functions on full Grams."""

import json

import numpy as np
import pytest

from tfmir.index import FingerprintMismatchError, StyleDatabase
from tfmir.index.style import mask_bits, unpack_mask_bits
from tfmir.similarity import (MEASURES, dice_coefficient, euclidean_score, harmonic_mean,
                              rescaled_cosine, style_losses)

CHANNELS = [3, 4, 5]
LAYER_WEIGHTS = [0.5, 1.0, 2.0]
DIMENSION = 6
MASK_SIZE = 8
NUM_ITEMS = 20


def random_items(count, seed, positions=10, rank=2):
    """Vectors, Grams of low-rank (plus noise) feature maps, and blob masks (some empty)."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(count, DIMENSION)).astype(np.float32)
    grams = []
    for channels in CHANNELS:
        features = (rng.normal(size=(count, positions, rank)) @ rng.normal(size=(rank, channels))
                    + 0.3 * rng.normal(size=(count, positions, channels)))
        grams.append(np.einsum("npc,npd->ncd", features, features) / positions)
    masks = rng.random((count, MASK_SIZE, MASK_SIZE)) > rng.uniform(0.3, 0.9, (count, 1, 1))
    masks[::7] = False  # empty predicted masks: Dice defined by the similarity module
    return vectors, grams, masks


def query_of(vectors, grams, masks, row):
    return {"vector": vectors[row], "grams": [gram[row] for gram in grams], "mask": masks[row]}


def oracle(measure, query, vectors, grams, masks):
    """The paper's scores over the whole database, from the full (unpacked) Grams in float64."""
    losses = style_losses(query["grams"], grams, LAYER_WEIGHTS)
    components = {
        "euclidean": euclidean_score(query["vector"], vectors),
        "cosine": rescaled_cosine(query["vector"], vectors),
        "style": 1.0 - losses / losses.max(),
        "dice": dice_coefficient(query["mask"], masks),
    }
    names = {"euclidean": ["euclidean"], "cosine": ["cosine"], "style": ["style"],
             "I1_ED": ["euclidean", "dice"], "I1_CD": ["cosine", "dice"],
             "I1_ECD": ["euclidean", "cosine", "dice"], "I1_SE": ["style", "euclidean"],
             "I1_SC": ["style", "cosine"], "I1_SD": ["style", "dice"]}[measure]
    return harmonic_mean(*[components[name] for name in names])


def make_database(vectors, grams, masks, **kwargs):
    settings = dict(channels=CHANNELS, layer_weights=LAYER_WEIGHTS, mask_size=MASK_SIZE,
                    model_fingerprint="style-model", segmenter_fingerprint="segmenter",
                    preprocessing={"resize_size": 36}, gram_dtype="float32")
    settings.update(kwargs)
    database = StyleDatabase(**settings)
    ids = [f"item{row:02d}" for row in range(len(vectors))]
    return database.build(vectors, grams=grams, masks=masks, ids=ids,
                          labels=["melanoma" if row % 3 else "nevus" for row in range(len(ids))],
                          sources=["isic"] * len(ids), paths=[f"/x/{i}.jpg" for i in ids])


@pytest.fixture(scope="module")
def items():
    return random_items(NUM_ITEMS + 3, seed=0)


@pytest.fixture(scope="module")
def database(items):
    vectors, grams, masks = items
    return make_database(vectors[:NUM_ITEMS], [gram[:NUM_ITEMS] for gram in grams],
                         masks[:NUM_ITEMS])


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("query_row", [NUM_ITEMS, NUM_ITEMS + 1, 3])
def test_exact_search_equals_the_brute_force_oracle(database, items, measure, query_row):
    vectors, grams, masks = items
    query = query_of(vectors, grams, masks, query_row)
    expected = oracle(measure, query, vectors[:NUM_ITEMS], [g[:NUM_ITEMS] for g in grams],
                      masks[:NUM_ITEMS])
    results = database.search(query, k=NUM_ITEMS, measure=measure)
    scores = np.array([row["score"] for row in results])
    # Every item, best first, with the oracle's score (ties, e.g. Dice 0, keep index order).
    np.testing.assert_allclose(scores, expected[[int(r["id"][4:]) for r in results]], atol=1e-6)
    np.testing.assert_allclose(scores, np.sort(expected)[::-1], atol=1e-6)
    assert [row["rank"] for row in results] == list(range(1, NUM_ITEMS + 1))
    top = results[0]
    assert (top["source"], top["path"]) == ("isic", f"/x/{top['id']}.jpg")


@pytest.mark.parametrize("measure", ["style", "I1_SE", "I1_SD"])
def test_float16_storage_moves_scores_by_little(items, measure):
    vectors, grams, masks = items
    database = make_database(vectors[:NUM_ITEMS], [g[:NUM_ITEMS] for g in grams],
                             masks[:NUM_ITEMS], gram_dtype="float16")
    assert database.packed_grams.dtype == np.float16
    query = query_of(vectors, grams, masks, NUM_ITEMS)
    expected = oracle(measure, query, vectors[:NUM_ITEMS], [g[:NUM_ITEMS] for g in grams],
                      masks[:NUM_ITEMS])
    results = database.search(query, k=NUM_ITEMS, measure=measure)
    np.testing.assert_allclose([row["score"] for row in results],
                               expected[[int(r["id"][4:]) for r in results]], atol=2e-3)


@pytest.mark.parametrize("measure", MEASURES)
def test_fast_equals_exact_when_candidates_cover_the_database(database, items, measure):
    vectors, grams, masks = items
    query = query_of(vectors, grams, masks, NUM_ITEMS + 2)
    exact = database.search(query, k=10, measure=measure)
    fast = database.search(query, k=10, measure=measure, mode="fast", candidates=NUM_ITEMS)
    assert fast == exact


@pytest.fixture(scope="module")
def larger():
    """400 items, projected to 10 of the 31 packed dimensions: fast mode has to choose."""
    vectors, grams, masks = random_items(430, seed=1, rank=3)
    database = make_database(vectors[:400], [g[:400] for g in grams], masks[:400],
                             projection_dim=10, gram_dtype="float16")
    queries = [query_of(vectors, grams, masks, row) for row in range(400, 430)]
    return database, queries


@pytest.mark.parametrize("measure", ["style", "I1_SE", "I1_SC", "I1_SD"])
def test_fast_mode_agrees_with_exact_mode(larger, measure):
    database, queries = larger
    recalls = []
    for query in queries:
        exact = database.search(query, k=5, measure=measure)
        fast, info = database.search(query, k=5, measure=measure, mode="fast", candidates=20,
                                     max_refine=len(database), details=True)
        assert info["candidates"] < len(database) and info["style_max"] == "exact"
        # LS_max is exact, so a returned item has its exact score: fast mode may miss items
        # but never misorders or misscores the ones it finds.
        exact_scores = {row["id"]: row["score"]
                        for row in database.search(query, k=len(database), measure=measure)}
        for row in fast:
            assert row["score"] == pytest.approx(exact_scores[row["id"]], abs=1e-12)
        recalls.append(len({r["id"] for r in fast} & {r["id"] for r in exact}) / 5)
    # Documented threshold: with 20 candidates per list (~40-55 re-ranked of 400) and 10 of 31
    # PCA dimensions, mean recall@5 over the 30 queries measured 1.0 for these four measures
    # (with 6 dimensions: style 0.91, I1_SD 0.99, I1_SE and I1_SC 1.0). 0.95 keeps that margin.
    assert np.mean(recalls) >= 0.95


def test_a_small_refinement_budget_estimates_ls_max(larger):
    database, queries = larger
    fast, info = database.search(queries[0], k=5, measure="I1_SE", mode="fast", candidates=20,
                                 max_refine=1, details=True)
    exact = {row["id"]: row["score"]
             for row in database.search(queries[0], k=len(database), measure="I1_SE")}
    assert info["style_max"] in ("exact", "estimated") and len(fast) == 5
    # The seeds' exact maximum or an estimate: scores move by the estimate's small error only.
    for row in fast:
        assert row["score"] == pytest.approx(exact[row["id"]], abs=0.05)


def test_style_loss_bounds_of_the_projection_hold(larger):
    database, queries = larger
    packed = database._query_packed(queries[0], "q")
    projected = database._project_query(packed)
    exact = np.array([((database.packed_grams[row].astype(np.float64) - packed) ** 2).sum()
                      for row in range(len(database))])
    kept = ((database.projected_grams - projected[:-1]) ** 2).sum(axis=1)
    residuals = database.gram_residuals.astype(np.float64)
    assert np.all(kept <= exact * (1 + 1e-4) + 1e-9)
    assert np.all(exact <= (kept + (projected[-1] + residuals) ** 2) * (1 + 1e-4) + 1e-9)
    assert np.all(exact >= (kept + (projected[-1] - residuals) ** 2) * (1 - 1e-4) - 1e-9)


def test_save_and_load_round_trip(database, items, tmp_path):
    vectors, grams, masks = items
    path = database.save(tmp_path / "ris")
    loaded = StyleDatabase.load(path, expected_model_fingerprint="style-model",
                                expected_segmenter_fingerprint="segmenter",
                                expected_preprocessing={"resize_size": 36})
    assert isinstance(loaded.packed_grams, np.memmap)
    assert loaded.describe() == database.describe()
    manifest = json.loads((path / "manifest.json").read_text())
    assert (manifest["kind"], manifest["count"], manifest["channels"], manifest["layer_weights"],
            manifest["mask_size"]) == ("style", NUM_ITEMS, CHANNELS, LAYER_WEIGHTS, MASK_SIZE)
    assert manifest["model_fingerprint"] == "style-model"
    assert manifest["bytes_per_image"] == database.bytes_per_image()
    for measure in MEASURES:
        for mode in ("exact", "fast"):
            query = query_of(vectors, grams, masks, NUM_ITEMS + 1)
            assert loaded.search(query, 5, measure, mode=mode, candidates=5) == \
                database.search(query, 5, measure, mode=mode, candidates=5)


def test_an_existing_database_is_replaced_only_with_overwrite(database, tmp_path):
    database.save(tmp_path / "ris")
    with pytest.raises(ValueError, match="already holds an index; pass overwrite=True"):
        database.save(tmp_path / "ris")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not an index")
    with pytest.raises(ValueError, match="it exists and is not an index directory"):
        database.save(tmp_path / "other", overwrite=True)
    database.save(tmp_path / "ris", overwrite=True)
    assert len(StyleDatabase.load(tmp_path / "ris")) == NUM_ITEMS


def test_another_model_segmenter_or_preprocessing_is_refused(database, tmp_path):
    path = database.save(tmp_path / "ris")
    with pytest.raises(FingerprintMismatchError, match="model fingerprint mismatch"):
        StyleDatabase.load(path, expected_model_fingerprint="another")
    with pytest.raises(FingerprintMismatchError, match="segmenter fingerprint mismatch"):
        StyleDatabase.load(path, expected_segmenter_fingerprint="another")
    with pytest.raises(FingerprintMismatchError, match="query preprocessing mismatch"):
        StyleDatabase.load(path, expected_preprocessing={"resize_size": 40})


def test_a_modified_file_is_refused(database, tmp_path):
    path = database.save(tmp_path / "ris")
    np.save(path / "vectors.npy", np.zeros((NUM_ITEMS, DIMENSION), np.float32))
    with pytest.raises(ValueError, match="does not match its sha256"):
        StyleDatabase.load(path)


@pytest.mark.parametrize("measure", ["I1_ED", "I1_CD", "I1_ECD", "I1_SD"])
def test_dice_measures_need_a_database_with_masks(items, measure):
    vectors, grams, masks = items
    database = make_database(vectors[:5], [g[:5] for g in grams], None,
                             segmenter_fingerprint=None)
    query = query_of(vectors, grams, masks, 6)
    with pytest.raises(ValueError, match=f"measure '{measure}' needs masks: the database was "
                                         "built without --segmenter"):
        database.search(query, 2, measure)
    assert len(database.search(query, 2, "I1_SE", mode="fast")) == 2


def test_an_unknown_measure_or_mode_is_refused(database, items):
    query = query_of(*items, NUM_ITEMS)
    with pytest.raises(ValueError, match=r"measure must be one of \('euclidean'.*Received: "
                                         "measure='gram'"):
        database.search(query, 2, "gram")
    with pytest.raises(ValueError, match="mode must be one of"):
        database.search(query, 2, "style", mode="approximate")


def test_a_query_with_nan_grams_is_refused_by_name(database, items):
    query = query_of(*items, NUM_ITEMS)
    query["grams"] = [np.full_like(gram, np.nan) for gram in query["grams"]]
    for mode in ("exact", "fast"):
        with pytest.raises(ValueError, match="query black.png's Gram matrix of layer 1 contains "
                                             "NaN"):
            database.search(query, 2, "style", mode=mode, query_name="query black.png")


def test_a_query_of_another_shape_is_refused_naming_both(database, items):
    query = query_of(*items, NUM_ITEMS)
    with pytest.raises(ValueError, match=r"Gram matrices have shapes \[\(3, 3\), \(4, 4\)\], "
                                         r"the database's \[\(3, 3\), \(4, 4\), \(5, 5\)\]"):
        database.search({**query, "grams": query["grams"][:2]}, 2, "style")
    with pytest.raises(ValueError, match=r"vector has shape \(7,\), the database's vectors "
                                         r"\(20, 6\)"):
        database.search({**query, "vector": np.zeros(7)}, 2, "cosine")
    with pytest.raises(ValueError, match=r"mask has shape \(4, 4\), the database's masks "
                                         r"\(8, 8\)"):
        database.search({**query, "mask": np.zeros((4, 4))}, 2, "I1_SD")


def test_bytes_per_image_is_computed_from_the_arrays(database):
    packed_size = sum(c * (c + 1) // 2 for c in CHANNELS)  # 6 + 10 + 15 = 31
    rank = database.projection.shape[0]
    expected = {"vector": DIMENSION * 4, "packed_grams": packed_size * 4,
                "mask": MASK_SIZE * MASK_SIZE // 8, "projection": rank * 4 + 4}
    expected["total"] = sum(expected.values())
    assert database.bytes_per_image() == expected
    assert database.describe()["bytes_per_image"] == expected


def test_mask_bits_round_trip():
    masks = np.random.default_rng(3).random((4, 5, 5))
    bits = mask_bits(masks, mask_size=5)
    assert bits.shape == (4, 4) and bits.dtype == np.uint8  # ceil(25 / 8) bytes
    np.testing.assert_array_equal(unpack_mask_bits(bits, 5), masks > 0.5)
    # 0.9 0.1 / 0.2 0.7 -> pixels 1 0 0 1 -> 0b10010000.
    assert mask_bits(np.array([[[0.9, 0.1], [0.2, 0.7]]]), mask_size=2).tolist() == [[144]]
    with pytest.raises(ValueError, match=r"masks must have shape \(N, 5, 5\)"):
        mask_bits(masks[:, :4], mask_size=5)
