import keras
import numpy as np
import pytest

from tfmir.configs import get_config
from tfmir.models import BACKBONES, Embedder, build_backbone


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(0)
    return Embedder.from_preset("tiny")


def test_tiny_preset_outputs_unit_vectors_of_the_configured_size(tiny):
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    embeddings = keras.ops.convert_to_numpy(tiny(images))
    assert embeddings.shape == (3, 128)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_config_round_trip(tiny):
    config = tiny.get_config()
    assert config["backbone"] == "small_resnet"
    assert config["embedding_dim"] == 128 and config["image_size"] == 32
    rebuilt = Embedder.from_config(config)
    assert rebuilt.get_config() == config
    assert rebuilt.count_params() == tiny.count_params()


def test_keras_save_and_load_gives_the_same_outputs(tiny, tmp_path):
    images = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    path = tmp_path / "embedder.keras"
    tiny.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, Embedder)
    np.testing.assert_allclose(restored.predict(images, verbose=0), tiny.predict(images, verbose=0),
                               atol=1e-6)


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_batch_norm_keeps_statistics_and_scales_while_the_rest_trains(freeze, tmp_path):
    keras.utils.set_random_seed(0)
    model = Embedder(backbone="small_resnet", backbone_widths=[8, 16], image_size=32,
                     freeze_batch_norm=freeze)
    norms = [layer for layer in model._flatten_layers()
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms
    before = [[np.array(w) for w in layer.weights] for layer in norms]
    kernel = model.get_layer("projection").kernel
    kernel_before = np.array(kernel)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    model.fit(images, np.random.default_rng(1).normal(size=(8, 128)), epochs=1, verbose=0)
    after = [[np.array(w) for w in layer.weights] for layer in norms]
    unchanged = all(np.array_equal(b, a) for bs, as_ in zip(before, after) for b, a in zip(bs, as_))
    # Frozen: gamma, beta and the moving statistics are bit-identical after a training step;
    # not frozen, the same step moves them.
    assert unchanged == freeze
    assert not np.array_equal(kernel_before, np.array(kernel))
    # The option survives a save and load.
    model.save(tmp_path / "model.keras")
    restored = keras.saving.load_model(tmp_path / "model.keras")
    assert restored.freeze_batch_norm == freeze
    assert all(layer.trainable == (not freeze) for layer in restored._flatten_layers()
               if isinstance(layer, keras.layers.BatchNormalization))


def test_the_cpu_config_fine_tunes_imagenet_lite0_with_frozen_batch_norm():
    model = get_config("specialist:cpu").task.model
    assert (model["backbone"], model["weights"], model["freeze_batch_norm"]) == (
        "efficientnet_lite0", "imagenet", True)


def test_the_paper_config_is_paper_000s_setting():
    paper = get_config("specialist:paper")
    # Paper 000, Sec. IV-B: ResNet50, 128-d, 224 crops of 256, batch 130, Adam 1e-5.
    assert paper.task.model["backbone"] == "resnet50"
    assert paper.task.model["embedding_dim"] == 128
    assert (paper.task.model["image_size"], paper.data.resize_size) == (224, 256)
    assert paper.sampler.num_classes_per_batch * paper.sampler.num_per_class == 130
    assert paper.sampler.num_per_class == 5
    assert (paper.optimizer.name, paper.optimizer.learning_rate) == ("adam", 1e-5)
    assert Embedder.from_preset("tiny").image_size == get_config("specialist:tiny").task.model[
        "image_size"]


def test_unknown_preset_and_backbone_are_named():
    with pytest.raises(ValueError, match="Received: 'huge'"):
        Embedder.from_preset("huge")
    with pytest.raises(ValueError, match="Received: backbone='vgg99'"):
        Embedder(backbone="vgg99", image_size=32)
    with pytest.raises(ValueError, match="embedding_dim"):
        Embedder.from_preset("tiny", embedding_dim=0)


def test_offline_imagenet_weights_give_a_clear_error(monkeypatch):
    def offline(**kwargs):
        raise OSError("URL fetch failure: Temporary failure in name resolution")

    monkeypatch.setattr(keras.applications, "ResNet50", offline)
    with pytest.raises(RuntimeError,
                       match="(?s)ImageNet weights.*resnet50.*efficientnet_lite0.*weights=None"):
        build_backbone("resnet50", 64, weights="imagenet")


# EfficientNet-B6 (41 M parameters) alone takes longer than the others together.
@pytest.mark.parametrize("name", [
    pytest.param(b, marks=pytest.mark.large) if b == "efficientnet_b6" else b
    for b in BACKBONES if b != "small_resnet"])
def test_keras_application_backbones_build_without_weights(name):
    backbone = build_backbone(name, 64, weights=None)
    features = backbone(np.zeros((1, 64, 64, 3), "float32"))
    assert features.shape[0] == 1 and len(features.shape) == 2


def test_resnet50_receives_caffe_normalised_pixels():
    # keras.applications.resnet.preprocess_input is the oracle for the caffe mode.
    backbone = build_backbone("resnet50", 32, weights=None)
    layer = backbone.get_layer("caffe_preprocess")
    pixels = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    expected = keras.applications.resnet.preprocess_input(pixels.copy())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(pixels)), expected, atol=1e-4)


def test_mixed_bfloat16_keeps_float32_unit_embeddings():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = Embedder.from_preset("tiny")
        embeddings = keras.ops.convert_to_numpy(model(np.ones((2, 32, 32, 3), "float32") * 100))
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-3)
