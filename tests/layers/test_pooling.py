"""R-MAC regions by hand, and every pooling against an explicit-loop NumPy oracle."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmir.layers import RMAC
from tfmir.layers import CAMPooling
from tfmir.layers import CroW
from tfmir.layers import GeM
from tfmir.layers import SPoC
from tfmir.layers import rmac_regions

# 8 x 8, 3 levels (Tolias' rule; Y-Net's 14 regions). Level l has side floor(16 / (l + 1)) and l
# starts per axis spread from 0 to 8 - side: level 1 side 8 at 0; level 2 side 5, step
# (8 - 5) / 1 = 3, starts 0, 3; level 3 side 4, step (8 - 4) / 2 = 2, starts 0, 2, 4.
REGIONS_8x8 = [
    (0, 0, 8, 8),
    (0, 0, 5, 5), (0, 3, 5, 5), (3, 0, 5, 5), (3, 3, 5, 5),
    (0, 0, 4, 4), (0, 2, 4, 4), (0, 4, 4, 4),
    (2, 0, 4, 4), (2, 2, 4, 4), (2, 4, 4, 4),
    (4, 0, 4, 4), (4, 2, 4, 4), (4, 4, 4, 4),
]

# 8 rows x 12 columns, 3 levels. Longer side: level-1 regions of side 8; n of them over 12
# columns step by 4 / (n - 1), overlapping by 1 - step / 8: n = 2 -> 0.5, n = 3 -> 0.75, ...
# 0.5 is closest to 0.4, so one extra region per level along the columns (l + 1 of them).
# Level 1: side 8, rows [0], columns 0, 4.
# Level 2: side 5, rows 0, 3; columns 0, 3.5, 7 -> 0, 4, 7 (rounded half up).
# Level 3: side 4, rows 0, 2, 4; columns 0, 8/3, 16/3, 8 -> 0, 3, 5, 8.
REGIONS_8x12 = (
    [(0, x, 8, 8) for x in (0, 4)]
    + [(y, x, 5, 5) for y in (0, 3) for x in (0, 4, 7)]
    + [(y, x, 4, 4) for y in (0, 2, 4) for x in (0, 3, 5, 8)]
)


def test_rmac_regions_8x8_by_hand():
    assert rmac_regions(8, 8, levels=3) == REGIONS_8x8


def test_rmac_regions_8x12_by_hand():
    assert rmac_regions(8, 12, levels=3) == REGIONS_8x12


def test_rmac_regions_of_a_tall_map_are_the_transposed_wide_ones():
    transposed = {(x, y, w, h) for y, x, h, w in rmac_regions(8, 12)}
    assert set(rmac_regions(12, 8)) == transposed


@pytest.mark.parametrize("height, width, levels", [
    (8, 8, 3), (8, 12, 3), (12, 8, 3), (7, 7, 3), (16, 16, 4), (5, 9, 2), (6, 20, 3), (3, 3, 2),
])
def test_rmac_regions_cover_the_map_and_stay_inside(height, width, levels):
    regions = rmac_regions(height, width, levels)
    for level_side in {side for _, _, side, _ in regions}:
        covered = np.zeros((height, width), bool)
        for y, x, h, w in regions:
            assert h == w and 0 <= y and y + h <= height and 0 <= x and x + w <= width
            if h == level_side:
                covered[y:y + h, x:x + w] = True
        # Each level on its own tiles the whole map, not only the union of all levels.
        assert covered.all(), (level_side, covered)


def test_rmac_regions_neighbours_overlap_and_overlap_picks_the_long_side_count():
    # Square map: neighbours within a level overlap (the grid is a sliding window).
    for _, level in itertools.groupby(rmac_regions(16, 16, 4), key=lambda region: region[2]):
        starts = sorted({x for _, x, _, _ in level})
        side = 2 * 16 // (len(starts) + 1)
        for left, right in zip(starts, starts[1:]):
            assert 0 < left + side - right < side

    # 8 x 20, level 1 (side 8) over 20 columns: 3 regions step 6 (overlap 0.25), 4 regions step
    # 4 (overlap 0.5). 0.5 is closest to 0.4, 0.25 closest to 0.2.
    def level_one_columns(overlap):
        return [x for _, x, side, _ in rmac_regions(8, 20, 1, overlap=overlap)]

    assert level_one_columns(0.4) == [0, 4, 8, 12]
    assert level_one_columns(0.2) == [0, 6, 12]


@pytest.mark.parametrize("height, width, levels", [(1, 1, 2), (2, 2, 3), (2, 9, 3)])
def test_rmac_regions_too_small_map_raises(height, width, levels):
    with pytest.raises(ValueError, match=f"height={height}, width={width}, levels={levels}"):
        rmac_regions(height, width, levels)


@pytest.mark.parametrize("kwargs", [
    {"height": 0, "width": 8}, {"height": 8, "width": 8.0}, {"height": 8, "width": 8, "levels": 0},
    {"height": 8, "width": 8, "overlap": 1.0}, {"height": 8, "width": 8, "overlap": -0.1},
])
def test_rmac_regions_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="Received"):
        rmac_regions(**kwargs)


# --- NumPy oracles: plain loops over images, regions, locations and classes. ---


def unit(vector):
    norm = np.sqrt(np.sum(vector ** 2))
    return vector / norm if norm > 0 else vector


def oracle_rmac(features, regions):
    batch, _, _, channels = features.shape
    out = np.zeros((batch, channels))
    for b in range(batch):
        total = np.zeros(channels)
        for y, x, h, w in regions:
            region_max = np.full(channels, -np.inf)
            for i in range(y, y + h):
                for j in range(x, x + w):
                    region_max = np.maximum(region_max, features[b, i, j])
            total += unit(region_max)
        out[b] = unit(total)
    return out


def oracle_spoc(features):
    batch, height, width, channels = features.shape
    out = np.zeros((batch, channels))
    for b in range(batch):
        total = np.zeros(channels)
        for i in range(height):
            for j in range(width):
                total += features[b, i, j]
        out[b] = unit(total)
    return out


def oracle_gem(features, p=3.0, epsilon=1e-6):
    batch, height, width, channels = features.shape
    out = np.zeros((batch, channels))
    for b in range(batch):
        for c in range(channels):
            values = [max(features[b, i, j, c], epsilon) ** p
                      for i in range(height) for j in range(width)]
            out[b, c] = (sum(values) / len(values)) ** (1 / p)
        out[b] = unit(out[b])
    return out


def oracle_crow(features, a=2, b=2):
    """After Kalantidis et al.'s reference `crow.py`, on one (H, W, C) image at a time."""
    batch, height, width, channels = features.shape
    out = np.zeros((batch, channels))
    for n in range(batch):
        x = np.maximum(features[n], 0)
        channel_sums = np.array([[x[i, j].sum() for j in range(width)] for i in range(height)])
        norm = sum(s ** a for s in channel_sums.ravel()) ** (1 / a)
        spatial = (channel_sums / norm) ** (1 / b)
        nonzero = np.array([np.count_nonzero(x[:, :, c]) / (height * width)
                            for c in range(channels)])
        channel_weights = np.log(nonzero.sum() / (1e-6 + nonzero))
        for c in range(channels):
            pooled = sum(spatial[i, j] * x[i, j, c] for i in range(height) for j in range(width))
            out[n, c] = channel_weights[c] * pooled
        out[n] = unit(out[n])
    return out


def oracle_cam(features, class_weights, classes_per_image=None):
    batch, height, width, channels = features.shape
    num_classes = class_weights.shape[1]
    out = np.zeros((batch, channels))
    for b in range(batch):
        chosen = range(num_classes) if classes_per_image is None else classes_per_image[b]
        total = np.zeros(channels)
        for c in chosen:
            cam = np.zeros((height, width))
            for i in range(height):
                for j in range(width):
                    cam[i, j] = max(float(features[b, i, j] @ class_weights[:, c]), 0.0)
            cam /= cam.max()
            vector = np.zeros(channels)
            for i in range(height):
                for j in range(width):
                    vector += cam[i, j] * features[b, i, j]
            total += unit(vector)
        out[b] = unit(total)
    return out


FEATURES = np.random.default_rng(0).normal(size=(2, 8, 8, 5)).astype("float32")
CLASS_WEIGHTS = np.random.default_rng(1).normal(size=(5, 4)).astype("float32")


def make_cam(**kwargs):
    layer = CAMPooling(num_classes=4, **kwargs)
    layer.build(FEATURES.shape)
    layer.class_weights.assign(CLASS_WEIGHTS)
    return layer


def top_classes(scores, k):
    return [list(np.argsort(-row)[:k]) for row in scores]


# (id, layer factory, oracle output on FEATURES)
CASES = [
    ("rmac", lambda: RMAC(levels=3), lambda: oracle_rmac(FEATURES, REGIONS_8x8)),
    ("spoc", SPoC, lambda: oracle_spoc(FEATURES)),
    ("gem", lambda: GeM(p=3.0), lambda: oracle_gem(FEATURES, p=3.0)),
    ("gem_p2", lambda: GeM(p=2.0, trainable_p=True), lambda: oracle_gem(FEATURES, p=2.0)),
    ("crow", CroW, lambda: oracle_crow(FEATURES)),
    ("crow_a1_b3", lambda: CroW(a=1, b=3), lambda: oracle_crow(FEATURES, a=1, b=3)),
    ("cam_all", make_cam, lambda: oracle_cam(FEATURES, CLASS_WEIGHTS)),
    # Without scores, top classes rank by the bias-free logits mean_hw(X) . W.
    ("cam_top2", lambda: make_cam(num_top_classes=2),
     lambda: oracle_cam(FEATURES, CLASS_WEIGHTS,
                        top_classes(FEATURES.mean(axis=(1, 2)) @ CLASS_WEIGHTS, 2))),
]
CASE_IDS = [case[0] for case in CASES]


@pytest.mark.parametrize("name, make_layer, oracle", CASES, ids=CASE_IDS)
def test_matches_oracle_eagerly_and_in_tf_function(name, make_layer, oracle):
    layer = make_layer()
    expected = oracle()
    np.testing.assert_allclose(layer(FEATURES), expected, atol=1e-5)
    np.testing.assert_allclose(tf.function(layer)(tf.constant(FEATURES)), expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(expected, axis=-1), 1.0, atol=1e-6)


@pytest.mark.parametrize("name, make_layer, oracle", CASES, ids=CASE_IDS)
def test_in_a_tf_data_map(name, make_layer, oracle):
    layer = make_layer()
    layer(FEATURES)  # weights are created eagerly, not inside the dataset's graph
    dataset = tf.data.Dataset.from_tensor_slices(FEATURES).batch(2).map(layer)
    np.testing.assert_allclose(next(iter(dataset)), oracle(), atol=1e-5)


def test_cam_pooling_top_classes_follow_given_scores():
    scores = np.array([[0.1, 0.9, 0.5, 0.0], [0.7, 0.2, 0.3, 0.8]], dtype="float32")
    expected = oracle_cam(FEATURES, CLASS_WEIGHTS, [[1, 2], [3, 0]])
    layer = make_cam(num_top_classes=2)
    np.testing.assert_allclose(layer(FEATURES, scores=scores), expected, atol=1e-5)
    # num_top_classes=None sums every class, whatever the scores.
    np.testing.assert_allclose(make_cam()(FEATURES, scores=scores),
                               oracle_cam(FEATURES, CLASS_WEIGHTS), atol=1e-5)


def test_gem_p_is_trained_only_when_asked():
    fixed, learned = GeM(p=3.0), GeM(p=3.0, trainable_p=True)
    fixed.build(FEATURES.shape)
    learned.build(FEATURES.shape)
    assert not fixed.trainable_weights and len(fixed.non_trainable_weights) == 1
    assert len(learned.trainable_weights) == 1
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(learned(FEATURES)[:, 0])
    gradient = tape.gradient(loss, learned.trainable_weights[0])
    assert np.isfinite(gradient) and gradient != 0


@pytest.mark.parametrize("layer", [RMAC(), SPoC(), GeM(), CroW(), CAMPooling(4),
                                   CAMPooling(4, num_top_classes=1)],
                         ids=lambda layer: type(layer).__name__)
def test_all_zero_map_gives_a_finite_descriptor(layer):
    assert np.isfinite(layer(np.zeros((1, 8, 8, 5), "float32"))).all()


@pytest.mark.parametrize("name, make_layer, oracle", CASES, ids=CASE_IDS)
def test_config_round_trip(name, make_layer, oracle):
    layer = make_layer()
    layer(FEATURES)
    rebuilt = type(layer).from_config(layer.get_config())
    assert rebuilt.get_config() == layer.get_config()
    rebuilt(FEATURES)
    rebuilt.set_weights(layer.get_weights())
    np.testing.assert_allclose(rebuilt(FEATURES), layer(FEATURES), atol=1e-6)


@pytest.mark.parametrize("name, make_layer, oracle", CASES, ids=CASE_IDS)
def test_keras_save_and_load(name, make_layer, oracle, tmp_path):
    inputs = keras.Input((8, 8, 5))
    features = keras.layers.Conv2D(5, 1, name="conv")(inputs)
    model = keras.Model(inputs, make_layer()(features))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(restored(FEATURES), model(FEATURES), atol=1e-6)


def test_cam_pooling_with_scores_saves_and_loads(tmp_path):
    features, scores = keras.Input((8, 8, 5)), keras.Input((4,))
    model = keras.Model([features, scores],
                        CAMPooling(4, num_top_classes=2)(features, scores=scores))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    score_values = np.random.default_rng(2).normal(size=(2, 4)).astype("float32")
    np.testing.assert_allclose(restored([FEATURES, score_values]), model([FEATURES, score_values]),
                               atol=1e-6)


def test_rmac_needs_a_static_spatial_size():
    with pytest.raises(ValueError, match="static height and width"):
        RMAC()(keras.Input((None, None, 5)))


@pytest.mark.parametrize("make_layer, match", [
    (lambda: RMAC(levels=0), "levels"),
    (lambda: RMAC(overlap=1.5), "overlap"),
    (lambda: GeM(p=0), "p"),
    (lambda: GeM(trainable_p="yes"), "trainable_p"),
    (lambda: CroW(a=-1), "a"),
    (lambda: CAMPooling(0), "num_classes"),
    (lambda: CAMPooling(3, num_top_classes=4), "num_top_classes"),
])
def test_rejects_bad_arguments(make_layer, match):
    with pytest.raises(ValueError, match=f"Received: {match}="):
        make_layer()
