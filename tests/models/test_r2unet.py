"""U-Net / RU-Net / R2U-Net: shapes, hand-counted weights (the recurrence shares W_r), sides,
serialization, whole-image use and mixed precision."""

import keras
import numpy as np
import pytest

from tfmir.models import R2UNet
from tfmir.models.r2unet import PRESETS, VARIANTS

TINY = PRESETS["tiny"]  # 32 px, depth 2, widths 8, 16, 32


def pixels(num_images, side=32, seed=0, width=None):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (num_images, side, width or side, 3)).astype("float32")


def batch_norm_weights(channels):
    """gamma, beta (trained) and the moving mean and variance: `count_params` counts all four."""
    return 4 * channels


def recurrent_unit_weights(in_channels, channels, recurrences=2):
    """RU-Net / R2U-Net unit (Alom et al. Fig. 4): a 1 x 1 projection (weights + bias), then two
    RCLs, each a 3 x 3 forward convolution and ONE 3 x 3 recurrent convolution whatever t is
    (no biases: every sum goes through a batch norm, one per step, t + 1 of them)."""
    projection = in_channels * channels + channels
    rcl = 9 * channels * channels + 9 * channels * channels + (
        (recurrences + 1) * batch_norm_weights(channels))
    return projection + 2 * rcl


def unet_unit_weights(in_channels, channels):
    """Two 3 x 3 convolutions, each followed by a batch norm."""
    return (9 * in_channels * channels + batch_norm_weights(channels)) + (
        9 * channels * channels + batch_norm_weights(channels))


def hand_count(unit_weights, depth, base_width):
    """All weights of the U shape: encoder units, bottom, 2 x 2 up-convolutions, decoder units on
    the concatenation (2 w channels) and the 1 x 1 logit."""
    widths = [base_width * 2 ** level for level in range(depth + 1)]
    total, in_channels = 0, 3
    for level in range(depth + 1):  # encoder levels and the bottom
        total += unit_weights(in_channels, widths[level])
        in_channels = widths[level]
    for level in reversed(range(depth)):
        total += 4 * widths[level + 1] * widths[level] + widths[level]
        total += unit_weights(2 * widths[level], widths[level])
    return total + widths[0] + 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_output_shapes(variant):
    model = R2UNet.from_preset("tiny", variant=variant)
    assert model.name == variant and model.image_size == 32
    assert model.input_shape == (None, 32, 32, 3)
    masks = model(pixels(2), training=False)
    assert masks.shape == (2, 32, 32, 1)
    assert keras.backend.standardize_dtype(masks.dtype) == "float32"
    values = np.asarray(masks)
    assert ((values >= 0) & (values <= 1)).all()


@pytest.mark.parametrize("variant, unit_weights", [
    ("unet", unet_unit_weights), ("runet", recurrent_unit_weights),
    ("r2unet", recurrent_unit_weights)])
def test_weights_match_hand_count(variant, unit_weights):
    """tiny: e.g. R2U-Net's first unit, 3 -> 8 channels: 3*8+8 + 2*(9*8*8 + 9*8*8 + 3*4*8)
    = 32 + 2*1248 = 2528."""
    model = R2UNet.from_preset("tiny", variant=variant)
    first_unit = sum(layer.count_params() for layer in model.layers
                     if layer.name.startswith("encoder0_"))
    assert first_unit == unit_weights(3, 8)
    assert model.count_params() == hand_count(unit_weights, depth=2, base_width=8)


def test_recurrence_shares_its_weights():
    """t = 2: one recurrent convolution per RCL, called twice; t = 3 adds depth and one batch
    norm per RCL, but no convolution weights."""
    assert recurrent_unit_weights(3, 8) == 2528
    two = R2UNet.from_preset("tiny", recurrences=2)
    three = R2UNet.from_preset("tiny", recurrences=3)

    def convolution_weights(model):
        return sum(layer.count_params() for layer in model.layers
                   if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose)))

    assert convolution_weights(two) == convolution_weights(three)
    # 5 units of 2 RCLs; unit widths 8, 16 (encoder), 32 (bottom), 16, 8 (decoder).
    widths = [8, 16, 32, 16, 8]
    assert three.count_params() - two.count_params() == sum(
        2 * batch_norm_weights(width) for width in widths)
    assert three.count_params() == hand_count(
        lambda c_in, c: recurrent_unit_weights(c_in, c, recurrences=3), depth=2, base_width=8)
    recurrent = two.get_layer("encoder0_rcl1_recurrent")
    assert len(recurrent._inbound_nodes) == 2
    assert len(three.get_layer("encoder0_rcl1_recurrent")._inbound_nodes) == 3
    assert [tuple(weight.shape) for weight in recurrent.weights] == [(3, 3, 8, 8)]  # no bias
    # One recurrent convolution per RCL: 2 RCLs in each of the 5 units.
    assert len([layer for layer in two.layers if layer.name.endswith("_recurrent")]) == 10


def test_runet_is_r2unet_without_the_residual():
    """Same weights; with them copied over, the outputs differ only through the additions."""
    runet = R2UNet.from_preset("tiny", variant="runet")
    r2unet = R2UNet.from_preset("tiny", variant="r2unet")
    r2unet.set_weights(runet.get_weights())
    assert [layer.name for layer in r2unet.layers if layer.name.endswith("_residual")]
    assert not [layer.name for layer in runet.layers if layer.name.endswith("_residual")]
    images = pixels(1)
    assert np.abs(np.asarray(runet(images)) - np.asarray(r2unet(images))).max() > 1e-4


def test_the_model_owns_its_normalisation():
    """Pixels in [0, 255] reach the first unit as [0, 1]."""
    model = R2UNet.from_preset("tiny")
    rescaled = keras.Model(model.inputs[0], model.get_layer("rescale").output)
    images = np.stack([np.zeros((32, 32, 3)), np.full((32, 32, 3), 255.0)]).astype("float32")
    np.testing.assert_allclose(np.asarray(rescaled(images))[:, 0, 0, 0], [0.0, 1.0], atol=1e-6)


def test_paper_preset_is_alom_et_al_skin_setting():
    model = R2UNet.from_preset("paper")
    assert (model.image_size, model.depth, model.base_width, model.recurrences) == (
        256, 4, 16, 2)
    bottom = model.get_layer("bottom_project")
    assert bottom.filters == 256  # widths 16, 32, 64, 128, 256


@pytest.mark.parametrize("arguments, message", [
    ({"image_size": 100, "depth": 3},
     r"image_size must be a multiple of 2 \*\* depth = 8 \(8, 16, 24, \.\.\.: every pooling halves "
     r"it exactly\) or None. Received: image_size=100 with depth=3"),
    ({"image_size": 2}, r"image_size must be a multiple of 2 \*\* depth = 4"),
    ({"image_size": 32.0}, r"image_size must be a multiple"),
    ({"variant": "attention"}, r"variant must be one of \('unet', 'runet', 'r2unet'\). "
                               r"Received: variant='attention'"),
    ({"depth": 0}, r"depth must be a positive integer. Received: depth=0"),
    ({"recurrences": 0}, r"recurrences must be a positive integer. Received: recurrences=0"),
    ({"base_width": 2.5}, r"base_width must be a positive integer"),
])
def test_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        R2UNet(**{**TINY, **arguments})


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"preset must be one of \['cpu', 'paper', 'tiny'\]"):
        R2UNet.from_preset("huge")


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_round_trip(variant):
    model = R2UNet.from_preset("tiny", variant=variant, name="segmenter")
    config = model.get_config()
    assert config == {"name": "segmenter", "variant": variant, "image_size": 32, "depth": 2,
                      "base_width": 8, "recurrences": 2}
    rebuilt = R2UNet.from_config(config)
    rebuilt.set_weights(model.get_weights())
    images = pixels(2, seed=1)
    np.testing.assert_allclose(rebuilt(images), model(images), atol=1e-6)


def test_keras_save_and_load(tmp_path):
    model = R2UNet.from_preset("tiny")
    path = tmp_path / "r2unet.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, R2UNet) and restored.variant == "r2unet"
    images = pixels(2, seed=2)
    np.testing.assert_allclose(restored(images), model(images), atol=1e-6)


def test_any_side_model_runs_the_same_weights_on_whole_images():
    patches = R2UNet.from_preset("tiny")
    whole = R2UNet.from_preset("tiny", image_size=None)
    assert whole.input_shape == (None, None, None, 3) and whole.image_size is None
    whole.set_weights(patches.get_weights())
    images = pixels(2, seed=3)
    np.testing.assert_allclose(whole(images), patches(images), atol=1e-5)
    assert whole(pixels(1, side=48, width=40)).shape == (1, 48, 40, 1)
    assert whole.size_divisor == 4


def test_mixed_precision_output_is_float32():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = R2UNet.from_preset("tiny")
        assert model.get_layer("encoder0_project").compute_dtype == "bfloat16"
        masks = model(pixels(1))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert keras.backend.standardize_dtype(masks.dtype) == "float32"
    assert masks.shape == (1, 32, 32, 1)
