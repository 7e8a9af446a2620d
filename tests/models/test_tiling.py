"""Sliding-window prediction against independent oracles: a pointwise model predicts every pixel
alone, so tiling must reproduce the whole-image prediction; non-overlapping windows must equal
the model run on each window by hand."""

import keras
import numpy as np
import pytest

from tfmir.models import R2UNet, segment_tiled


def image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3)).astype(np.uint8)


def pointwise_model(side=None, seed=0):
    """A 1 x 1 convolution + sigmoid: each pixel's output depends on that pixel only."""
    keras.utils.set_random_seed(seed)
    pixels = keras.Input((side, side, 3))
    outputs = keras.layers.Conv2D(2, 1, activation="sigmoid",
                                  kernel_initializer=keras.initializers.RandomNormal(0, 0.02))(
        pixels)
    return keras.Model(pixels, outputs)


@pytest.mark.parametrize("height, width, patch_size, stride", [
    (37, 53, 16, 8),    # neither side a multiple of the patch or the stride
    (40, 40, 16, 16),   # windows side by side
    (10, 12, 16, 5),    # smaller than one window: reflection on every side
    (64, 33, 32, 7),
])
def test_pointwise_model_equals_whole_image_prediction(height, width, patch_size, stride):
    model = pointwise_model()
    picture = image(height, width)
    whole = np.asarray(model(picture[None].astype("float32")))[0]
    tiled = segment_tiled(model, picture, patch_size, stride=stride, batch_size=5)
    assert tiled.shape == (height, width, 2) and tiled.dtype == np.float32
    np.testing.assert_allclose(tiled, whole, atol=1e-6)


def test_identity_returns_the_image():
    """Every window predicting its own pixels: averaging and cropping must put each value back
    where it came from (an offset or a flip would show)."""
    picture = image(29, 41, seed=1)
    tiled = segment_tiled(lambda batch: batch[..., :1], picture, 16, stride=6)
    np.testing.assert_array_equal(tiled[..., 0], picture[..., 0].astype(np.float32))


def test_fixed_side_model_of_the_patch_size():
    model = pointwise_model(side=16)
    picture = image(30, 20, seed=2)
    whole = np.asarray(pointwise_model(side=None)(picture[None].astype("float32")))[0]
    np.testing.assert_allclose(segment_tiled(model, picture, 16), whole, atol=1e-6)


def test_non_overlapping_windows_equal_the_model_on_each_window():
    """A 64 x 64 image in 32 x 32 windows at stride 32: no padding, no overlap, so each quadrant
    is exactly the segmenter's prediction on that quadrant alone. (U-Net: an untrained
    R2U-Net's logits run into the thousands before its batch norms have statistics, and batches
    of 4 and of 1 round them differently.)"""
    segmenter = R2UNet.from_preset("tiny", variant="unet", image_size=None)
    picture = image(64, 64, seed=3)
    tiled = segment_tiled(segmenter, picture, 32, stride=32)
    for row in (0, 32):
        for column in (0, 32):
            window = picture[None, row:row + 32, column:column + 32].astype("float32")
            expected = np.asarray(segmenter(window, training=False))[0]
            np.testing.assert_allclose(tiled[row:row + 32, column:column + 32], expected,
                                       atol=1e-5)


def test_dict_model_gives_its_mask():
    pixels = keras.Input((None, None, 3))
    mask = keras.layers.Conv2D(1, 1, activation="sigmoid")(pixels)
    code = keras.layers.GlobalAveragePooling2D()(pixels)
    model = keras.Model(pixels, {"mask": mask, "code": code})
    picture = image(20, 24, seed=4)
    expected = np.asarray(model(picture[None].astype("float32"))["mask"])[0]
    np.testing.assert_allclose(segment_tiled(model, picture, 8), expected, atol=1e-6)


@pytest.mark.parametrize("arguments, message", [
    ({"stride": 17}, r"stride must be an integer in \[1, patch_size = 16\]"),
    ({"stride": 0}, r"stride must be an integer in \[1, patch_size = 16\]"),
    ({"patch_size": 0}, r"patch_size must be a positive integer. Received: patch_size=0"),
    ({"batch_size": 0}, r"batch_size must be a positive integer"),
])
def test_bad_windows(arguments, message):
    with pytest.raises(ValueError, match=message):
        segment_tiled(pointwise_model(), image(20, 20), **{"patch_size": 16, **arguments})


def test_bad_image_and_model_sides():
    with pytest.raises(ValueError, match=r"image must be \(H, W, 3\) pixels. Received shape "
                                         r"\(20, 20\)"):
        segment_tiled(pointwise_model(), np.zeros((20, 20)), 16)
    with pytest.raises(ValueError, match=r"the model takes 32 x 32 inputs, not the 16 x 16 "
                                         r"windows; build it with image_size=None or "
                                         r"image_size=16"):
        segment_tiled(pointwise_model(side=32), image(20, 20), 16)
    with pytest.raises(ValueError, match=r"patch_size must be a multiple of the model's size "
                                         r"divisor 4. Received: patch_size=18"):
        segment_tiled(R2UNet.from_preset("tiny", image_size=None), image(40, 40), 18)
