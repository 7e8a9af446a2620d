"""Paper 003's segmenter configs: registered names, every setting builds its task, the sizes."""

import numpy as np
import pytest

from tfmir.configs import CONFIGS, get_config, override
from tfmir.configs.segmenter import segmenter
from tfmir.data import Examples
from tfmir.models import R2UNet
from tfmir.tasks import Segmentation, build_task

NAMES = ("segmenter", "segmenter_drive")
SETTINGS = ("tiny", "cpu", "paper")


@pytest.fixture(scope="module")
def splits():
    """Two 40 x 40 images with masks: enough for a task to be built (it reads no labels)."""
    rng = np.random.default_rng(0)
    part = Examples(labels=[0, 0], sources="synthetic", ids=["a", "b"], class_names=("lesion",),
                    images=rng.integers(0, 256, (2, 40, 40, 3)).astype(np.uint8),
                    masks=(rng.random((2, 40, 40)) < 0.3).astype(np.uint8))
    return {"train": part, "val": part}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("setting", SETTINGS)
def test_every_setting_builds_its_task(name, setting, splits):
    config = get_config(f"{name}:{setting}")
    assert name in CONFIGS
    assert type(config).from_dict(config.to_dict()) == config  # the JSON form fit records
    assert config.task.name == "segmentation"
    assert config.task.model["variant"] == "r2unet"
    assert {key: config.task.args[key] for key in ("alpha", "beta", "gamma")} == {
        "alpha": 0.7, "beta": 0.3, "gamma": 0.75}
    assert (config.monitor, config.mode) == ("val_dice", "max")
    assert config.evaluators == [{"name": "segmentation"}]
    assert config.sampler.name == "shuffled" and config.optimizer.name == "adam"
    task = build_task(config.task, splits)
    assert isinstance(task, Segmentation) and isinstance(task.segmenter, R2UNet)
    # Training crops fit in the resized image, and every side halves exactly at each pooling.
    assert task.image_size <= config.data.resize_size
    assert task.image_size % task.segmenter.size_divisor == 0
    assert task.segmenter.image_size % task.segmenter.size_divisor == 0


@pytest.mark.parametrize("setting, image_size, resize, depth, base_width", [
    ("tiny", 32, 36, 2, 8),
    ("cpu", 128, 128, 4, 8),
    ("paper", 384, 384, 4, 16),  # paper 003 Sec. 3.2: 384 x 384; Alom et al.'s widths 16..256
])
def test_lesion_sizes(setting, image_size, resize, depth, base_width):
    config = segmenter(setting)
    model = config.task.model
    assert (model["image_size"], model["depth"], model["base_width"]) == (
        image_size, depth, base_width)
    assert config.data.resize_size == resize
    assert "patch_size" not in config.task.args  # whole images


@pytest.mark.parametrize("setting, patch_size, side", [
    ("tiny", 32, 64), ("cpu", 64, 576), ("paper", 48, 576)])
def test_drive_trains_on_patches_of_the_resized_image(setting, patch_size, side):
    config = get_config(f"segmenter_drive:{setting}")
    assert config.task.args["patch_size"] == patch_size
    assert config.task.model["image_size"] == config.data.resize_size == side


def test_paper_drive_epochs_hold_alom_et_al_patch_count():
    config = get_config("segmenter_drive:paper")
    assert config.steps_per_epoch * config.sampler.batch_size == pytest.approx(190_000, rel=1e-3)
    assert config.optimizer.learning_rate == 1e-4


@pytest.mark.parametrize("variant", ["unet", "runet"])
def test_variant_is_a_model_override(variant, splits):
    config = override(get_config("segmenter:tiny"), {"task.model.variant": variant})
    assert build_task(config.task, splits).segmenter.variant == variant


def test_unknown_setting():
    with pytest.raises(ValueError, match=r"setting must be one of \('tiny', 'cpu', 'paper'\). "
                                         r"Received: 'huge'"):
        get_config("segmenter_drive:huge")
