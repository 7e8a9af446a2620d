"""Y-Net: every branch's shapes at the paper's sizes and the tiny preset, the deployable model."""

import keras
import numpy as np
import pytest

from tfmir.models import YNet


def _output_shapes(model):
    return {name: tuple(tensor.shape) for name, tensor in model.output.items()}


def test_paper_sizes_of_every_block():
    # Sec. III-D: b1 32 x 64², b2 64 x 32², b3 128 x 16², core node 256 x 8² for a 256² input;
    # t3 16², t2 32², t1 64² with 32 channels; R-MAC branch 512 channels on 8 x 8.
    ynet = YNet(num_classes=3, image_size=256)
    expected = {"b1_out": (None, 64, 64, 32), "b2_out": (None, 32, 32, 64),
                "b3_out": (None, 16, 16, 128), "core_out": (None, 8, 8, 256),
                "t3": (None, 16, 16, 32), "t2": (None, 32, 32, 32), "t1": (None, 64, 64, 32),
                "rmac_bn": (None, 8, 8, 512), "rmac": (None, 512)}
    for name, shape in expected.items():
        assert tuple(ynet.get_layer(name).output.shape) == shape, name
    assert _output_shapes(ynet) == {"class_scores": (None, 3), "mask_logits": (None, 256, 256, 1)}
    # b1 already has the FPN's 32 channels: it is added without a lateral convolution.
    assert "fpn_lateral1" not in [layer.name for layer in ynet.layers]


@pytest.mark.parametrize("branches, outputs", [
    ("both", {"class_scores", "mask_logits"}),
    ("rmac", {"class_scores"}),
    ("fpn", {"mask_logits"}),
    ("none", {"class_scores"}),
])
def test_branches_crop_the_outputs(branches, outputs):
    ynet = YNet.from_preset("tiny", num_classes=3, branches=branches)
    assert set(ynet.output) == outputs
    names = [layer.name for layer in ynet.layers]
    assert ("rmac" in names) == (branches in ("both", "rmac"))
    assert ("t1" in names) == (branches in ("both", "fpn"))
    assert ("pool" in names) == (branches == "none")


def test_tiny_outputs_and_deployable_model():
    keras.utils.set_random_seed(0)
    ynet = YNet.from_preset("tiny", num_classes=3)
    images = np.random.default_rng(0).uniform(0, 255, (2, 96, 96, 3)).astype("float32")
    outputs = ynet(images)
    scores = np.asarray(outputs["class_scores"])
    assert scores.shape == (2, 3) and np.all(np.abs(scores) <= 1 + 1e-6)  # cosines
    assert outputs["mask_logits"].shape == (2, 96, 96, 1)

    hasher = ynet.deployable_model(num_bits=36)
    deployed = hasher(images)
    assert set(deployed) == {"code", "mask"}
    codes = np.asarray(deployed["code"])
    assert codes.shape == (2, 36) and np.all(np.abs(codes) < 1)  # tanh values
    mask = np.asarray(deployed["mask"])
    # The mask is the sigmoid of the training graph's logits: the layers are shared.
    np.testing.assert_allclose(mask, 1 / (1 + np.exp(-np.asarray(outputs["mask_logits"]))),
                               atol=1e-5)
    # The hash projection is fixed: equal seeds give equal codes, other seeds other codes.
    np.testing.assert_allclose(ynet.deployable_model(36)(images)["code"], codes, atol=1e-6)
    assert not np.allclose(ynet.deployable_model(36, seed=1)(images)["code"], codes)
    assert not ynet.deployable_model(64).get_layer("hash").trainable_weights


def test_deployable_model_saves_and_loads(tmp_path):
    keras.utils.set_random_seed(0)
    hasher = YNet.from_preset("tiny", num_classes=2).deployable_model(64)
    images = np.random.default_rng(1).uniform(0, 255, (2, 96, 96, 3)).astype("float32")
    path = tmp_path / "hasher.keras"
    hasher.save(path)
    restored = keras.saving.load_model(path)
    for key in ("code", "mask"):
        np.testing.assert_allclose(restored(images)[key], hasher(images)[key], atol=1e-6)
    # Shared layers are held once: the loaded model has as many weights as the original.
    assert len(restored.weights) == len(hasher.weights)


def test_config_round_trip():
    ynet = YNet.from_preset("tiny", num_classes=4, branches="rmac")
    rebuilt = YNet.from_config(ynet.get_config())
    assert rebuilt.get_config() == ynet.get_config()
    assert len(rebuilt.weights) == len(ynet.weights)


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 64}, "image_size must be a multiple of 32 of at least 96"),
    ({"image_size": 100}, "image_size must be a multiple of 32 of at least 96"),
    ({"branches": "left"}, "branches must be one of"),
    ({"num_classes": 1}, "num_classes must be an integer of at least 2"),
    ({"widths": (8, 8, 16)}, "widths must give 4 positive channel counts"),
])
def test_bad_arguments(kwargs, message):
    arguments = {"num_classes": 3, "image_size": 96, "widths": (8, 8, 16, 16),
                 "rmac_channels": 8, "fpn_channels": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        YNet(**arguments)


@pytest.mark.parametrize("num_bits", [0, -8, 7.5])
def test_code_length_must_be_a_positive_integer(num_bits):
    ynet = YNet.from_preset("tiny", num_classes=3)
    with pytest.raises(ValueError, match="num_bits"):
        ynet.deployable_model(num_bits=num_bits)
