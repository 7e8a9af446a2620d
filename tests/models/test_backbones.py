"""Stage feature maps of every backbone: names, shapes, pooling, extraction and serialisation."""

import keras
import numpy as np
import pytest

from tfmir.models import BACKBONES, Embedder, build_backbone, feature_extractor

IMAGE_SIZE = 64
SMALL_WIDTHS = (8, 16, 32)

# Channels per stage, from the published architectures (not from the code under test):
# ResNet-50 (He et al. 2016, Table 1), EfficientNet-B0 (Tan & Le 2019, Table 1, plus its 1x1
# "top" convolution to 1280), MobileNetV3-Small (Howard et al. 2019, Table 2: the last bneck of
# each resolution, then the 1x1 convolution to 576). small_resnet: the widths passed in.
# Each stage is (name, pyramid level, channels); at 64 pixels a level-n map is 64 / 2**n wide.
EXPECTED_STAGES = {
    "resnet50": [("conv1", 1, 64), ("conv2", 2, 256), ("conv3", 3, 512), ("conv4", 4, 1024),
                 ("conv5", 5, 2048)],
    "efficientnet_b0": [("block1", 1, 16), ("block2", 2, 24), ("block3", 3, 40),
                        ("block4", 4, 80), ("block5", 4, 112), ("block6", 5, 192),
                        ("block7", 5, 320), ("top", 5, 1280)],
    # EfficientNet-B6: B0's widths times 1.8, rounded to the nearest multiple of 8 (Tan & Le's
    # round_filters, never down by more than 10 %): 16 -> 28.8 -> 32, 24 -> 43.2 -> 40, 40 -> 72,
    # 80 -> 144, 112 -> 201.6 -> 200, 192 -> 345.6 -> 344, 320 -> 576, 1280 -> 2304.
    "efficientnet_b6": [("block1", 1, 32), ("block2", 2, 40), ("block3", 3, 72),
                        ("block4", 4, 144), ("block5", 4, 200), ("block6", 5, 344),
                        ("block7", 5, 576), ("top", 5, 2304)],
    "mobilenet_v3_small": [("stem", 1, 16), ("expanded_conv", 2, 16), ("expanded_conv_2", 3, 24),
                           ("expanded_conv_7", 4, 48), ("expanded_conv_10", 5, 96),
                           ("top", 5, 576)],
    # The stem has stride 2 from 64 pixels up, and every stage after the first halves again.
    "small_resnet": [("stage1", 1, 8), ("stage2", 2, 16), ("stage3", 3, 32)],
}
# EfficientNet-Lite (the TensorFlow TPU repository's lite README): B0's block table without
# squeeze-excite, stem 32 and head 1280 never scaled; Lite1 keeps B0's widths, Lite2 multiplies
# them by 1.1, rounded to multiples of 8 (16, 24, 48, 88, 120, 208, 352).
for _variant, _widths in [("efficientnet_lite0", (16, 24, 40, 80, 112, 192, 320)),
                          ("efficientnet_lite1", (16, 24, 40, 80, 112, 192, 320)),
                          ("efficientnet_lite2", (16, 24, 48, 88, 120, 208, 352))]:
    EXPECTED_STAGES[_variant] = [
        (f"block{index + 1}", level, width)
        for index, (level, width) in enumerate(zip((1, 2, 3, 4, 4, 5, 5), _widths))
    ] + [("top", 5, 1280)]
# The deepest stage at each stride is that level's pyramid output.
EXPECTED_PYRAMID = {
    "resnet50": {"P1": 64, "P2": 256, "P3": 512, "P4": 1024, "P5": 2048},
    "efficientnet_b0": {"P1": 16, "P2": 24, "P3": 40, "P4": 112, "P5": 1280},
    "efficientnet_b6": {"P1": 32, "P2": 40, "P3": 72, "P4": 200, "P5": 2304},
    "mobilenet_v3_small": {"P1": 16, "P2": 16, "P3": 24, "P4": 48, "P5": 576},
    "small_resnet": {"P1": 8, "P2": 16, "P3": 32},
    "efficientnet_lite0": {"P1": 16, "P2": 24, "P3": 40, "P4": 112, "P5": 1280},
    "efficientnet_lite1": {"P1": 16, "P2": 24, "P3": 40, "P4": 112, "P5": 1280},
    "efficientnet_lite2": {"P1": 16, "P2": 24, "P3": 48, "P4": 120, "P5": 1280},
}


def _build(name, image_size=IMAGE_SIZE):
    widths = SMALL_WIDTHS if name == "small_resnet" else None
    return build_backbone(name, image_size, weights=None, widths=widths)


def _pixels(seed=0, size=IMAGE_SIZE, batch=2):
    return np.random.default_rng(seed).uniform(0, 255, (batch, size, size, 3)).astype("float32")


def _run(model, pixels):
    # Eager calls: tracing predict() for these graphs costs far more than the arithmetic.
    return keras.tree.map_structure(keras.ops.convert_to_numpy, model(pixels, training=False))


# EfficientNet-B6 (41 M parameters) takes most of a minute per test on two cores.
@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=pytest.mark.large) if name == "efficientnet_b6" else name
    for name in BACKBONES])
def backbone(request):
    keras.utils.set_random_seed(0)
    return _build(request.param)


def test_expected_tables_cover_every_backbone():
    assert set(EXPECTED_STAGES) == set(BACKBONES) == set(EXPECTED_PYRAMID)


def test_stage_and_pyramid_outputs_have_the_published_shapes(backbone):
    name = backbone.name
    stages = EXPECTED_STAGES[name]
    assert list(backbone.stage_outputs) == [stage for stage, _, _ in stages]
    for stage, level, channels in stages:
        size = IMAGE_SIZE // 2**level
        assert tuple(backbone.stage_outputs[stage].shape) == (None, size, size, channels), stage
    assert list(backbone.pyramid_outputs) == list(EXPECTED_PYRAMID[name])
    for level_name, channels in EXPECTED_PYRAMID[name].items():
        size = IMAGE_SIZE // 2 ** int(level_name[1:])
        assert tuple(backbone.pyramid_outputs[level_name].shape) == (None, size, size, channels)
    assert backbone.pooled_output is backbone.outputs[0]


def test_stage_tensors_belong_to_the_backbone_graph(backbone):
    # keras-hub's contract: a model from the backbone's inputs to its pyramid outputs, no copy.
    pyramid = keras.Model(backbone.inputs, dict(backbone.pyramid_outputs))
    assert {id(w) for w in pyramid.weights} <= {id(w) for w in backbone.weights}
    outputs = pyramid([_pixels()])
    assert set(outputs) == set(EXPECTED_PYRAMID[backbone.name])


def test_feature_extractor_returns_every_level_and_the_backbone_output(backbone):
    pixels = _pixels(1)
    features = _run(feature_extractor(backbone), pixels)
    assert list(features) == [*EXPECTED_PYRAMID[backbone.name], "pooled"]
    np.testing.assert_allclose(features["pooled"], _run(backbone, pixels), atol=1e-5)


def test_application_pooled_output_is_the_mean_of_the_last_level(backbone):
    if backbone.name == "small_resnet":
        pytest.skip("small_resnet normalises its pooled vector; tested below")
    # For the keras.applications backbones the pooled vector is global average pooling of P5.
    features = _run(feature_extractor(backbone, ["P5", "pooled"]), _pixels(2))
    np.testing.assert_allclose(features["pooled"], features["P5"].mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-5)


def test_small_resnet_pooled_output_is_the_normalised_mean_of_the_last_stage():
    # small_resnet centres the pooled vector with a BatchNormalization; in inference it is
    # gamma * (mean - moving_mean) / sqrt(moving_var + epsilon) + beta on the last stage's mean.
    keras.utils.set_random_seed(3)
    backbone = _build("small_resnet")
    norm = backbone.get_layer("pool_norm")
    rng = np.random.default_rng(3)
    gamma, beta, moving_mean = (rng.normal(size=SMALL_WIDTHS[-1]).astype("float32")
                                for _ in range(3))
    moving_var = rng.uniform(0.5, 2.0, SMALL_WIDTHS[-1]).astype("float32")
    norm.set_weights([gamma, beta, moving_mean, moving_var])
    features = _run(feature_extractor(backbone, ["stage3", "pooled"]), _pixels(3))
    mean = features["stage3"].mean(axis=(1, 2))
    expected = gamma * (mean - moving_mean) / np.sqrt(moving_var + norm.epsilon) + beta
    np.testing.assert_allclose(features["pooled"], expected, rtol=1e-4, atol=1e-4)


def test_small_resnet_levels_follow_the_stem_stride():
    # Below 64 pixels the stem keeps the resolution (stride 1), so stage1 is P0.
    backbone = build_backbone("small_resnet", 32, widths=(8, 16))
    assert {k: tuple(v.shape[1:]) for k, v in backbone.pyramid_outputs.items()} == {
        "P0": (32, 32, 8), "P1": (16, 16, 16)}


def test_feature_extractor_selects_stage_names_and_rejects_unknown_ones():
    backbone = _build("small_resnet")
    extractor = feature_extractor(backbone, ["stage1", "P3"])
    assert list(extractor.output) == ["stage1", "P3"]
    with pytest.raises(ValueError, match=r"Received: names=\['P9'\]") as error:
        feature_extractor(backbone, ["P9"])
    assert "'stage2'" in str(error.value) and "'P1'" in str(error.value)
    with pytest.raises(ValueError, match=r"Received: names=\[\]"):
        feature_extractor(backbone, [])


def test_small_resnet_keeps_its_layer_names():
    # Saved Embedders address weights by layer order and class; names stay for readability.
    backbone = build_backbone("small_resnet", 32, widths=(8, 16))
    assert [layer.name for layer in backbone.layers][:6] == [
        "pixels", "rescale", "stem_conv", "stem_bn", "stem_relu", "stage1_conv1"]
    assert [layer.name for layer in backbone.layers][-2:] == ["pool", "pool_norm"]


@pytest.mark.parametrize("name", [
    "small_resnet",
    pytest.param("mobilenet_v3_small", marks=pytest.mark.large),  # same path, 20 s of saving
])
def test_embedder_round_trips_keep_the_stage_outputs(name, tmp_path):
    keras.utils.set_random_seed(4)
    widths = (8, 16) if name == "small_resnet" else None
    embedder = Embedder(backbone=name, image_size=32, backbone_widths=widths)
    pixels = _pixels(4, size=32)

    rebuilt = Embedder.from_config(embedder.get_config())
    assert "P1" in rebuilt.get_layer(name).pyramid_outputs

    path = tmp_path / "embedder.keras"
    embedder.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(_run(restored, pixels), _run(embedder, pixels), atol=1e-6)
    original, loaded = (_run(feature_extractor(model.get_layer(name)), pixels)
                        for model in (embedder, restored))
    assert list(loaded) == list(original)
    for key in original:
        np.testing.assert_allclose(loaded[key], original[key], atol=1e-5)


@pytest.mark.parametrize("name,constructor,extra", [
    ("mobilenet_v3_small", "MobileNetV3Small", {"include_preprocessing": True}),
    pytest.param("efficientnet_b0", "EfficientNetB0", {}, marks=pytest.mark.large),
])
def test_weights_saved_before_stage_outputs_still_load(name, constructor, extra, tmp_path):
    # The pre-stage layout, written out by hand: the application nested in a pixels -> vector
    # model, inside an Embedder-shaped images -> Dense -> UnitNormalization model.
    keras.utils.set_random_seed(5)
    application = getattr(keras.applications, constructor)(
        include_top=False, pooling="avg", weights=None, input_shape=(32, 32, 3), **extra)
    pixels_in = keras.Input((32, 32, 3), name="pixels")
    old_backbone = keras.Model(pixels_in, application(pixels_in), name=name)
    images = keras.Input((32, 32, 3), name="images")
    projected = keras.layers.Dense(128, name="projection")(old_backbone(images))
    old = keras.Model(images, keras.layers.UnitNormalization(name="l2")(projected))
    path = str(tmp_path / "old.weights.h5")
    old.save_weights(path)

    embedder = Embedder(backbone=name, image_size=32)
    embedder.load_weights(path)
    pixels = _pixels(5, size=32)
    np.testing.assert_allclose(_run(embedder, pixels), _run(old, pixels), atol=1e-5)


def test_a_backbone_reloaded_alone_names_the_way_back(tmp_path):
    # Only build_backbone attaches the stage outputs; Keras reloads a lone backbone as a plain
    # functional model, with the same outputs, and feature_extractor says how to rebuild it.
    backbone = build_backbone("small_resnet", 32, widths=(8, 16))
    path = tmp_path / "backbone.keras"
    backbone.save(path)
    restored = keras.saving.load_model(path)
    pixels = _pixels(6, size=32)
    np.testing.assert_allclose(_run(restored, pixels), _run(backbone, pixels), atol=1e-6)
    with pytest.raises(ValueError, match="build_backbone"):
        feature_extractor(restored)
    rebuilt = build_backbone("small_resnet", 32, widths=(8, 16))
    rebuilt.load_weights(path)
    features = _run(feature_extractor(rebuilt, ["pooled"]), pixels)
    np.testing.assert_allclose(features["pooled"], _run(backbone, pixels), atol=1e-6)
