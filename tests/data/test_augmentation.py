"""Tests for tfmir.data.augmentation: the paper's seven augmentations, online and offline.

Every augmentation is run eagerly and inside tf.data (STYLE.md: they differ). Golden values come
from independent oracles: `colorsys` for hue and saturation, NumPy arithmetic for brightness,
contrast and flips, and a NumPy GridMask written from the GridMask paper's definition.
"""

import colorsys
import csv
import json
import os
import re
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfmir.configs import Config, DataConfig, override, parse_value
from tfmir.data import (
    AUGMENTATIONS,
    PAPER_AUGMENTATIONS,
    Augmentation,
    Examples,
    build_augmentation,
    expand_dataset,
    gridmask_layer,
    load_csv_manifest,
    make_dataset,
)
from tfmir.data.specs import load_spec

COLOUR = ("brightness", "contrast", "hue", "saturation")


def _images(batch=4, size=8, low=0, high=255, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, (batch, size, size, 3)).astype(np.float32)


def _masks(batch=4, size=8, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.uniform(size=(batch, size, size, 1)) < 0.3).astype(np.float32)


def _in_dataset(function, *tensors):
    """`function(*tensors)` run inside a tf.data map instead of eagerly."""
    dataset = tf.data.Dataset.from_tensors(tuple(tensors)).map(function)
    return tf.nest.map_structure(np.asarray, next(iter(dataset)))


def _rgb_to_hsv(images):
    """colorsys, pixel by pixel: (..., 3) in [0, 255] -> (..., 3) of h, s in [0, 1], v in [0, 1]."""
    flat = np.asarray(images, np.float64).reshape(-1, 3) / 255.0
    return np.array([colorsys.rgb_to_hsv(*pixel) for pixel in flat]).reshape(np.shape(images))


# --- Names and arguments -------------------------------------------------------------------------


def test_the_seven_names_are_the_papers():
    # Sec. 3.2: GridMask, left-right flip, up-down flip, brightness, contrast, hue, saturation.
    assert PAPER_AUGMENTATIONS == AUGMENTATIONS
    assert len(AUGMENTATIONS) == 7 and AUGMENTATIONS[0] == "gridmask"


def test_unknown_names_are_refused_with_the_list():
    with pytest.raises(ValueError, match=re.escape(f"must be among {AUGMENTATIONS}. "
                                                   "Received: names=('hue', 'blur')")):
        build_augmentation(["hue", "blur"])
    with pytest.raises(ValueError, match="not one string"):
        build_augmentation("hue")
    with pytest.raises(ValueError, match="must be distinct"):
        build_augmentation(["hue", "hue"])


def test_bad_strengths_are_refused():
    with pytest.raises(ValueError, match="strengths keys must be among"):
        build_augmentation(["hue"], strengths={"flip_up_down": 1.0})
    # One number would reach Keras as (-f, f): a negative saturation multiplier.
    with pytest.raises(ValueError, match=re.escape("saturation strength must be a pair")):
        build_augmentation(["saturation"], strengths={"saturation": 0.5})
    with pytest.raises(ValueError, match="gridmask strengths keys must be among"):
        build_augmentation(["gridmask"], strengths={"gridmask": {"size": 3}})
    with pytest.raises(ValueError, match=re.escape("gridmask ratio (the paper's r) must be in")):
        build_augmentation(["gridmask"], strengths={"gridmask": 1.5})


def test_bad_shapes_are_refused():
    augment = build_augmentation(["hue"], seed=0)
    with pytest.raises(ValueError, match=re.escape("images must be (H, W, 3) or (B, H, W, 3)")):
        augment(np.zeros((2, 8, 8, 1), np.float32))
    with pytest.raises(ValueError, match="masks must be shaped like the images"):
        augment(_images(), np.zeros((4, 8, 8), np.float32))


def test_gridmask_without_keras_cv_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "keras_cv", None)  # `import keras_cv` now fails
    with pytest.raises(ImportError, match=re.escape("GridMask needs keras-cv: pip install "
                                                    "tfmir[gridmask]")):
        build_augmentation(["gridmask", "hue"])
    # The other six need only Keras.
    build_augmentation([name for name in AUGMENTATIONS if name != "gridmask"])


# --- Each augmentation, eagerly and in tf.data ---------------------------------------------------


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_each_augmentation_eager_equals_tf_data_and_keeps_the_range(name):
    augment = build_augmentation([name], seed=0)
    images, masks = _images(batch=8, size=16), _masks(batch=8, size=16)
    seed = tf.constant([3, 4], tf.int64)
    eager_images, eager_masks = augment(images, masks, seed=seed)
    graph_images, graph_masks = _in_dataset(lambda x, m: augment(x, m, seed=seed), images, masks)
    np.testing.assert_array_equal(np.asarray(eager_images), graph_images)
    np.testing.assert_array_equal(np.asarray(eager_masks), graph_masks)
    assert eager_images.dtype == tf.float32 and eager_images.shape == images.shape
    assert eager_masks.shape == masks.shape
    assert 0.0 <= float(tf.reduce_min(eager_images)) and float(tf.reduce_max(eager_images)) <= 255
    assert not np.allclose(np.asarray(eager_images), images)
    if name not in ("flip_left_right", "flip_up_down"):
        np.testing.assert_array_equal(np.asarray(eager_masks), masks)
    # One image without a batch axis, without a mask.
    single = augment(images[0], seed=seed)
    assert single.shape == images.shape[1:] and single.dtype == tf.float32


@pytest.mark.parametrize("name, axis", [("flip_left_right", 2), ("flip_up_down", 1)])
def test_flips_move_the_mask_with_its_image(name, axis):
    augment = build_augmentation([name], seed=0)
    images, masks = _images(batch=16), _masks(batch=16)
    out_images, out_masks = (np.asarray(tensor) for tensor in
                             augment(images, masks, seed=tf.constant([0, 7])))
    flipped = np.array([np.array_equal(out, np.flip(image, axis - 1))
                        for out, image in zip(out_images, images)])
    kept = np.array([np.array_equal(out, image) for out, image in zip(out_images, images)])
    assert np.all(flipped ^ kept) and 0 < flipped.sum() < 16  # each image one or the other
    np.testing.assert_array_equal(out_masks[flipped], np.flip(masks[flipped], axis))
    np.testing.assert_array_equal(out_masks[kept], masks[kept])
    # transform(): the offline copy always flips.
    certain_images, certain_masks = augment.transform(name, images, masks, seed=tf.constant([0, 7]))
    np.testing.assert_array_equal(np.asarray(certain_images), np.flip(images, axis))
    np.testing.assert_array_equal(np.asarray(certain_masks), np.flip(masks, axis))


def test_brightness_adds_one_offset_per_image_within_its_strength():
    images = _images(batch=16, low=40, high=215)  # far enough from 0 and 255 not to clip
    out = np.asarray(build_augmentation(["brightness"])(images, seed=tf.constant([1, 2])))
    offsets = (out - images).reshape(16, -1)
    np.testing.assert_allclose(offsets, offsets[:, :1].repeat(offsets.shape[1], 1), atol=1e-3)
    # Strength 0.1 of the [0, 255] range: offsets in [-25.5, 25.5].
    assert np.all(np.abs(offsets[:, 0]) <= 25.5 + 1e-3) and np.std(offsets[:, 0]) > 1


def test_contrast_scales_around_the_channel_mean_within_its_strength():
    images = _images(batch=16, low=60, high=190)
    out = np.asarray(build_augmentation(["contrast"])(images, seed=tf.constant([1, 2])))
    means = images.mean(axis=(1, 2), keepdims=True)
    factors = ((out - means) / (images - means)).reshape(16, -1)
    # (x - mean) * f + mean with one f per image in [0.8, 1.2] (strength 0.2).
    np.testing.assert_allclose(factors, factors[:, :1].repeat(factors.shape[1], 1), atol=2e-3)
    assert np.all((factors[:, 0] >= 0.8 - 1e-3) & (factors[:, 0] <= 1.2 + 1e-3))


def _colourful(batch, size=4, seed=0, saturation=(0.3, 0.6)):
    """RGB images built from HSV with hues anywhere, saturations in a range, bright values."""
    rng = np.random.default_rng(seed)
    hsv = np.stack([rng.uniform(0, 1, (batch, size, size)),
                    rng.uniform(*saturation, (batch, size, size)),
                    rng.uniform(0.5, 0.9, (batch, size, size))], axis=-1)
    rgb = np.array([colorsys.hsv_to_rgb(*pixel) for pixel in hsv.reshape(-1, 3)])
    return (rgb.reshape(hsv.shape) * 255).astype(np.float32)


def test_hue_turns_every_pixel_of_an_image_by_one_small_angle():
    images = _colourful(8)
    out = np.asarray(build_augmentation(["hue"])(images, seed=tf.constant([5, 6])))
    before, after = _rgb_to_hsv(images), _rgb_to_hsv(out)
    np.testing.assert_allclose(after[..., 1:], before[..., 1:], atol=2e-3)  # S and V kept
    turn = (after[..., 0] - before[..., 0] + 0.5) % 1.0 - 0.5  # signed, on the circle
    per_image = turn.reshape(8, -1)
    np.testing.assert_allclose(per_image, per_image[:, :1].repeat(16, 1), atol=2e-3)
    # Strength 0.05: Keras turns by U(0, 0.05) x 0.5 of the circle, either way.
    assert np.all(np.abs(per_image[:, 0]) <= 0.025 + 2e-3) and np.abs(per_image).max() > 1e-3


def test_saturation_multiplies_hsv_saturation_within_its_strength():
    images = _colourful(8)
    out = np.asarray(build_augmentation(["saturation"])(images, seed=tf.constant([5, 6])))
    before, after = _rgb_to_hsv(images), _rgb_to_hsv(out)
    np.testing.assert_allclose(after[..., [0, 2]], before[..., [0, 2]], atol=2e-3)
    ratios = (after[..., 1] / before[..., 1]).reshape(8, -1)
    np.testing.assert_allclose(ratios, ratios[:, :1].repeat(16, 1), atol=5e-3)
    # f ~ U(0.4, 0.6) becomes f / (1 - f): between 0.4/0.6 = 0.667 and 0.6/0.4 = 1.5.
    assert np.all((ratios[:, 0] >= 2 / 3 - 5e-3) & (ratios[:, 0] <= 1.5 + 5e-3))


def test_strong_saturation_stays_in_range_where_keras_value_range_255_does_not():
    import keras

    images = _colourful(8, saturation=(0.5, 0.9))
    strong = {"saturation": (0.9, 0.99)}  # multipliers 9..99: every saturation reaches 1
    out = np.asarray(build_augmentation(["saturation"], strengths=strong)(
        images, seed=tf.constant([0, 1])))
    assert out.min() >= 0 and out.max() <= 255
    np.testing.assert_allclose(_rgb_to_hsv(out)[..., 1], 1.0, atol=1e-3)
    # Keras clips the saturation to its value_range: (0, 255) lets it pass 1.
    keras_layer = keras.layers.RandomSaturation((0.9, 0.99), value_range=(0, 255), seed=0)
    assert np.asarray(keras_layer(images, training=True)).min() < -1


def test_a_seed_fixes_every_draw():
    images, masks = _images(batch=8, size=16), _masks(batch=8, size=16)
    augment = build_augmentation(PAPER_AUGMENTATIONS, seed=0)
    first = augment(images, masks, seed=tf.constant([0, 1]))
    again = augment(images, masks, seed=tf.constant([0, 1]))
    other = augment(images, masks, seed=tf.constant([0, 2]))
    np.testing.assert_array_equal(np.asarray(first[0]), np.asarray(again[0]))
    np.testing.assert_array_equal(np.asarray(first[1]), np.asarray(again[1]))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))
    # Without seed=, calls follow the constructor's seed: two equal objects, equal sequences.
    one, two = (build_augmentation(["hue", "flip_up_down"], seed=5) for _ in range(2))
    for _ in range(2):
        np.testing.assert_array_equal(np.asarray(one(images)), np.asarray(two(images)))


# --- GridMask against the GridMask paper ---------------------------------------------------------


def paper_grid_mask(size, ratio, unit, offset_y, offset_x, angle=0.0):
    """The GridMask paper's mask, written from its definition: 1 where a pixel is removed.

    Units of side `unit` tile the plane from (offset_y, offset_x); each keeps all but a square of
    side (1 - ratio) x unit at its corner ("r is the ratio of the shorter gray edge in a unit";
    keep ratio 1 - (1 - r)^2). With `angle`, the grid turns about the image centre.
    """
    centre = (size - 1) / 2
    rows, columns = np.meshgrid(np.arange(size) - centre, np.arange(size) - centre,
                                indexing="ij")
    turned_rows = np.cos(angle) * rows - np.sin(angle) * columns
    turned_columns = np.sin(angle) * rows + np.cos(angle) * columns
    removed_side = (1 - ratio) * unit
    return (((turned_rows - offset_y) % unit < removed_side)
            & ((turned_columns - offset_x) % unit < removed_side))


def paper_bands(size, ratio, unit, offset):
    """One axis of the unturned paper grid: True where a removed band crosses pixel i.

    Without rotation, `paper_grid_mask` is the outer AND of these bands along rows and columns.
    """
    return (np.arange(size) - offset) % unit < (1 - ratio) * unit


def _oracle_removed_fractions(size, ratio, rotate, num_draws, seed=0):
    """Removed fractions of `paper_grid_mask` with keras-cv's unit range and uniform offsets."""
    rng = np.random.default_rng(seed)
    fractions = []
    for _ in range(num_draws):
        unit = rng.uniform(0.3 * size, 0.5 * size + 1)
        angle = rng.uniform(-np.pi, np.pi) if rotate else 0.0
        mask = paper_grid_mask(size, ratio, unit, rng.uniform(0, unit), rng.uniform(0, unit),
                               angle)
        fractions.append(mask.mean())
    return np.array(fractions)


def _runs(pattern):
    """Starts and lengths of the runs of True in a 1-D boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], pattern.astype(int), [0]])))
    return edges[::2], edges[1::2] - edges[::2]


def test_gridmask_without_rotation_is_the_papers_grid():
    size, ratio = 128, 0.6
    images = _images(batch=6, size=size, low=1, high=255)
    augment = build_augmentation(["gridmask"], strengths={"gridmask": {"ratio": ratio,
                                                                        "rotation": 0.0}})
    out = np.asarray(augment.transform("gridmask", images, seed=tf.constant([2, 3])))
    for image, masked in zip(images, out):
        removed = np.all(masked == 0, axis=-1)  # inputs are >= 1: 0 only where removed
        np.testing.assert_array_equal(masked[~removed], image[~removed])  # the rest untouched
        assert np.all(masked[removed] == 0)  # the fill value
        # A grid of squares: removed exactly where a removed row band meets a removed column band.
        rows, columns = removed.any(axis=1), removed.any(axis=0)
        np.testing.assert_array_equal(removed, rows[:, None] & columns[None, :])
        units = []
        for pattern in (rows, columns):
            starts, lengths = _runs(pattern)
            inner = starts > 0
            periods = np.diff(starts[inner])
            assert len(periods) >= 1 and periods.max() - periods.min() <= 1  # periodic
            unit = periods.mean()
            units.append(unit)
            whole = inner & (starts + lengths < size)
            # Each removed band is (1 - r) d wide: to a pixel (a band of real width w covers
            # floor(w) or ceil(w) pixels), plus (1 - r) x the unit's error (under a pixel: the
            # starts are whole pixels).
            assert np.all(np.abs(lengths[whole] - (1 - ratio) * unit) <= 1.0 + (1 - ratio))
            # The paper's bands with that unit and offset: they differ at most next to an edge.
            # (Two pixels past the end, so a band starting at the last pixel has its edge.)
            oracle = paper_bands(size + 2, ratio, unit, starts[inner][0])
            oracle_edges = np.flatnonzero(np.diff(oracle.astype(int)))
            for index in np.flatnonzero(oracle[:size] != pattern):
                assert np.min(np.abs(oracle_edges - index)) <= 1
        assert abs(units[0] - units[1]) <= 1  # one unit d for both axes


@pytest.mark.parametrize("rotation", [0.0, 0.5])
def test_gridmask_removes_the_papers_fraction(rotation):
    # Keep ratio k = 1 - (1 - r)^2: r = 0.6 removes (1 - 0.6)^2 = 0.16 of the pixels on average
    # (exactly, for offsets uniform over a unit, whatever the unit or the angle).
    size, ratio, num_images = 64, 0.6, 96
    oracle = _oracle_removed_fractions(size, ratio, rotation > 0, num_draws=2000)
    assert abs(oracle.mean() - 0.16) < 4 * oracle.std() / np.sqrt(2000)
    augment = build_augmentation(["gridmask"], strengths={"gridmask": {"ratio": ratio,
                                                                        "rotation": rotation}})
    transform = tf.function(lambda images: augment.transform("gridmask", images,
                                                             seed=tf.constant([0, 9])))
    out = np.asarray(transform(tf.fill([num_images, size, size, 3], 100.0)))
    assert set(np.unique(out)) <= {0.0, 100.0}
    fractions = np.all(out == 0, axis=-1).mean(axis=(1, 2))
    # 5 standard errors of a mean of 96 draws (the oracle's spread per image: 0.015-0.025).
    tolerance = 5 * oracle.std() / np.sqrt(num_images)
    assert abs(fractions.mean() - 0.16) < tolerance, (fractions.mean(), tolerance)


def test_keras_cv_conventions_differ_from_the_papers():
    keras_cv = pytest.importorskip("keras_cv")
    images = tf.fill([32, 64, 64, 3], 100.0)

    def removed_fraction(layer):
        return np.all(np.asarray(tf.function(layer)(images)) == 0, axis=-1).mean()

    # keras-cv's ratio_factor is the removed edge: 0.6 removes 0.6^2 = 0.36, not 0.16 (the
    # spread of a mean of 32 images is about 0.007).
    raw = keras_cv.layers.GridMask(ratio_factor=(0.6, 0.6), rotation_factor=0.0, seed=1)
    assert abs(removed_fraction(raw) - 0.36) < 0.03
    # Its bilinear rotation removes every pixel a turned square touches: well above 0.16
    # (about 0.19 at 64 px; nearest neighbour gives 0.16, see the test above).
    turned = keras_cv.layers.GridMask(ratio_factor=(0.4, 0.4), rotation_factor=0.5, seed=1)
    assert removed_fraction(turned) > 0.16 + 0.015
    # tfmir's layer: r = 0.6 as the paper means it.
    ours = gridmask_layer(ratio=0.6, rotation=0.0)
    assert float(ours.ratio_factor()) == pytest.approx(0.4)
    assert ours.random_rotate.interpolation == "nearest"


def test_gridmask_probability_decides_which_images_are_masked():
    images = _images(batch=8, size=32, low=1, high=255)
    for probability, expected in [(0.0, 0), (1.0, 8)]:
        augment = build_augmentation(["gridmask"], strengths={"gridmask": {
            "probability": probability}})
        out = np.asarray(augment(images, seed=tf.constant([0, 1])))
        assert sum(np.any(out[i] == 0) for i in range(8)) == expected


# --- make_dataset --------------------------------------------------------------------------------


def _masked_examples(num_items=6, size=16):
    """In-memory images whose mask is exactly where channel 0 is bright."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (num_items, size, size, 3), dtype=np.uint8)
    masks = (images[..., 0] > 128).astype(np.uint8)
    return Examples(labels=np.arange(num_items) % 2, sources="skin",
                    ids=[f"i{index}" for index in range(num_items)], class_names=("a", "b"),
                    images=images, masks=masks)


def _first_batch(examples, **kwargs):
    inputs, targets = next(iter(make_dataset(examples, fields=("image", "label", "mask"),
                                             **kwargs)))
    return np.asarray(inputs["image"]), np.asarray(targets["label"]), np.asarray(targets["mask"])


def test_make_dataset_augments_training_batches_only():
    examples = _masked_examples()
    common = dict(batch_size=4, image_size=16, resize_size=16, seed=3)
    plain = _first_batch(examples, training=True, **common)
    augmented = _first_batch(examples, training=True, augmentations=PAPER_AUGMENTATIONS, **common)
    again = _first_batch(examples, training=True, augmentations=PAPER_AUGMENTATIONS, **common)
    for first, second in zip(augmented, again):  # reproducible for a given seed
        np.testing.assert_array_equal(first, second)
    for before, after in zip(plain, augmented):
        assert before.shape == after.shape and before.dtype == after.dtype
    np.testing.assert_array_equal(plain[1], augmented[1])  # the same items
    assert not np.allclose(plain[0], augmented[0])
    assert augmented[0].min() >= 0 and augmented[0].max() <= 255
    # Evaluation ignores them (names are still checked).
    evaluation = dict(batch_size=4, image_size=16, resize_size=16)
    np.testing.assert_array_equal(
        _first_batch(examples, training=False, **evaluation)[0],
        _first_batch(examples, training=False, augmentations=("hue",), **evaluation)[0])
    with pytest.raises(ValueError, match="must be among"):
        make_dataset(examples, training=False, augmentations=("blur",))


def test_make_dataset_flips_move_the_mask():
    examples = _masked_examples(num_items=8)
    images, _, masks = _first_batch(examples, training=True, batch_size=8, image_size=16,
                                    resize_size=16, seed=0,
                                    augmentations=("flip_left_right", "flip_up_down", "hue"))
    # No resize and a full-size crop: the mask is still where the image's channel 0 was bright,
    # whatever the flips did; hue changed the pixels, so compare with the un-hued flips.
    plain, _, plain_masks = _first_batch(examples, training=True, batch_size=8, image_size=16,
                                         resize_size=16, seed=0,
                                         augmentations=("flip_left_right", "flip_up_down"))
    np.testing.assert_array_equal(masks, plain_masks)
    np.testing.assert_array_equal(masks[..., 0], (plain[..., 0] > 128).astype(np.float32))
    assert not np.allclose(images, plain)


def test_make_dataset_augments_files_one_at_a_time(tmp_path):
    rng = np.random.default_rng(0)
    for index in range(4):
        folder = tmp_path / "data" / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
            folder / f"{index}.png")
    from tfmir.data import load_image_folder

    examples = load_image_folder(tmp_path / "data")
    common = dict(training=True, batch_size=4, image_size=16, resize_size=20, seed=1)
    plain, _ = next(iter(make_dataset(examples, **common)))
    # An Augmentation carries its own strengths.
    augment = Augmentation(("brightness", "gridmask"), strengths={"brightness": 0.3})
    augmented, _ = next(iter(make_dataset(examples, augmentations=augment, **common)))
    assert augmented["image"].shape == plain["image"].shape == (4, 16, 16, 3)
    assert not np.allclose(np.asarray(plain["image"]), np.asarray(augmented["image"]))


# --- Config --------------------------------------------------------------------------------------


def test_config_round_trips_augmentations():
    config = Config(data=DataConfig(resize_size=416, augmentations=PAPER_AUGMENTATIONS))
    values = json.loads(json.dumps(config.to_dict()))  # as config.json holds it: a list
    assert values["data"]["augmentations"] == list(PAPER_AUGMENTATIONS)
    assert Config.from_dict(values) == config
    assert Config(data=DataConfig(augmentations=["hue"])).data.augmentations == ("hue",)
    # From the command line: --config.data.augmentations="['hue','gridmask']".
    changed = override(config, {"data.augmentations": parse_value("['hue','gridmask']")})
    assert changed.data.augmentations == ("hue", "gridmask")
    assert override(config, {"data.augmentations": "()"}).data.augmentations == ()
    assert Config().data.augmentations == ()


# --- expand_dataset ------------------------------------------------------------------------------


def _tiny_manifest(root, with_splits=True):
    """3 images (12 x 10, distinct halves so flips show) with masks, listed in a CSV manifest."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    rows = []
    for index, (label, split) in enumerate([("mel", "train"), ("nev", "val"), ("mel", "test")]):
        pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
        mask = np.zeros((12, 10), np.uint8)
        mask[2:5, 1:4] = 255
        Image.fromarray(pixels).save(root / f"x{index}.png")
        Image.fromarray(mask).save(root / f"x{index}_mask.png")
        rows.append([f"x{index}.png", label, f"x{index}_mask.png", split])
    with open(root / "manifest.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "label", "mask", "split"][:4 if with_splits else 3])
        writer.writerows(row[:4 if with_splits else 3] for row in rows)
    return load_csv_manifest(root / "manifest.csv")


def _files(directory):
    return sorted(os.path.relpath(os.path.join(folder, name), directory)
                  for folder, _, names in os.walk(directory) for name in names
                  if not name.startswith("."))


def _read(path):
    return np.asarray(Image.open(path))


def test_expand_dataset_writes_eight_images_per_item_and_a_loadable_manifest(tmp_path):
    examples = _tiny_manifest(tmp_path / "source")
    out = tmp_path / "expanded"
    manifest = expand_dataset(examples, out, seed=0)
    files = _files(out)
    images = [name for name in files if name.startswith("images" + os.sep)]
    masks = [name for name in files if name.startswith("masks" + os.sep)]
    assert len(images) == 24 and len(masks) == 24  # (1 + 7) x 3
    assert set(files) - set(images) - set(masks) == {"labels.csv", "expansion.json"}
    assert "images/x0.png__flip_up_down.png" in [name.replace(os.sep, "/") for name in images]

    loaded = load_csv_manifest(manifest)  # the reader behind --data=<dir>/labels.csv
    assert len(loaded) == 24
    names = np.asarray(loaded.class_names)[loaded.labels]
    with open(manifest, newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == ["image_id", "path", "label", "source", "source_id", "augmentation",
                             "mask", "split"]
    source_label = dict(zip(examples.ids, np.asarray(examples.class_names)[examples.labels]))
    for row, name in zip(rows, names):
        assert name == row["label"] == source_label[row["source_id"]]
    assert [row["augmentation"] for row in rows[:8]] == ["original", *PAPER_AUGMENTATIONS]
    splits = load_spec(str(manifest))  # split by the carried split column: copies stay together
    assert {len(part) for part in splits.values()} == {8}

    # Pixels: the original is the input, flips flip image and mask, colour keeps the mask.
    original = _read(out / "images" / "x1.png__original.png")
    np.testing.assert_array_equal(original, _read(tmp_path / "source" / "x1.png"))
    source_mask = _read(tmp_path / "source" / "x1_mask.png")
    np.testing.assert_array_equal(_read(out / "images" / "x1.png__flip_left_right.png"),
                                  original[:, ::-1])
    np.testing.assert_array_equal(_read(out / "masks" / "x1.png__flip_up_down.png"),
                                  source_mask[::-1])
    for name in ("gridmask", *COLOUR):
        np.testing.assert_array_equal(_read(out / "masks" / f"x1.png__{name}.png"), source_mask)
        assert not np.array_equal(_read(out / "images" / f"x1.png__{name}.png"), original)


def test_expand_dataset_resumes_and_refuses_another_expansion(tmp_path):
    examples = _tiny_manifest(tmp_path / "source", with_splits=False)
    out = tmp_path / "expanded"
    expand_dataset(examples, out, augmentations=("hue", "flip_left_right"), seed=0)
    stamps = {name: os.stat(out / name).st_mtime_ns for name in _files(out)}
    contents = {name: (out / name).read_bytes() for name in stamps}
    assert len([name for name in stamps if name.startswith("images")]) == 9

    expand_dataset(examples, out, augmentations=("hue", "flip_left_right"), seed=0)
    assert {name: os.stat(out / name).st_mtime_ns for name in _files(out)} == stamps  # a no-op

    # An interrupted run: missing files are written again, the same bytes.
    for name in ("images/x2.png__hue.png", "masks/x0.png__original.png", "labels.csv"):
        os.remove(out / name)
    expand_dataset(examples, out, augmentations=("hue", "flip_left_right"), seed=0)
    assert {name: (out / name).read_bytes() for name in _files(out)} == contents

    with pytest.raises(ValueError, match=re.escape("holds an expansion of another input or "
                                                   "setting (differing: seed)")):
        expand_dataset(examples, out, augmentations=("hue", "flip_left_right"), seed=1)
    with pytest.raises(ValueError, match="differing: augmentations"):
        expand_dataset(examples, out, augmentations=("hue",), seed=0)
    expand_dataset(examples, out, augmentations=("hue",), seed=1, overwrite=True)
    assert len([name for name in _files(out) if name.startswith("images")]) == 6

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "labels.csv").write_text("path,label\n")
    with pytest.raises(ValueError, match="not written by expand_dataset"):
        expand_dataset(examples, foreign)


def test_expand_dataset_in_memory_items(tmp_path):
    examples = _masked_examples(num_items=3, size=12)
    manifest = expand_dataset(examples, tmp_path / "out", augmentations=("flip_up_down",),
                              image_format="jpg")
    loaded = load_csv_manifest(manifest)
    assert len(loaded) == 6 and loaded.mask_paths is not None
    np.testing.assert_array_equal(_read(loaded.mask_paths[1]) > 0, examples.masks[0][::-1])
    with pytest.raises(ValueError, match=re.escape("image_format must be one of")):
        expand_dataset(examples, tmp_path / "other", image_format="gif")
