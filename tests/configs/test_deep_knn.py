"""Paper 001's configs: registered names, the tiny/cpu/paper shapes, and the step-decay schedule."""

import keras
import numpy as np
import pytest

from tfmir.configs import CONFIGS, get_config
from tfmir.configs.deep_knn import stratified_batch
from tfmir.training import make_optimizer

NAMES = ("deep_knn", "deep_knn_triplet", "deep_knn_classifier")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("setting", ["tiny", "cpu", "paper"])
def test_every_setting_builds_and_shares_one_model(name, setting):
    config = get_config(f"{name}:{setting}")
    assert name in CONFIGS
    # One model per setting for all three configs: deep kNN* loads the classifier's features.
    assert config.task.model == get_config(f"deep_knn:{setting}").task.model
    assert config.optimizer.name == "sgd" and config.optimizer.learning_rate == 0.01
    assert config.optimizer.decay_every_epochs == 20 and config.optimizer.decay_factor == 0.5
    assert config.monitor == "val_knn@5_mcr" and config.mode == "max"
    assert [spec["name"] for spec in config.evaluators] == ["knn", "train_knn"]
    assert config.data.resize_size > config.task.model["image_size"]
    # Round trip through the JSON form fit records.
    assert type(config).from_dict(config.to_dict()) == config


def test_losses_and_samplers():
    deep_knn = get_config("deep_knn:paper")
    assert deep_knn.task.name == "metric_learning"
    assert deep_knn.task.args["loss"] == {"name": "knn_triplet", "num_positives": 5,
                                          "num_negatives": 5, "margin": 0.2}
    assert get_config("deep_knn_triplet:paper").task.args["loss"]["name"] == "batch_hard_triplet"
    classifier = get_config("deep_knn_classifier:paper")
    assert classifier.task.name == "classification"
    assert classifier.task.args == {"class_weighting": "inverse_frequency"}
    assert classifier.sampler.name == "shuffled" and classifier.sampler.batch_size == 96
    for name in ("deep_knn", "deep_knn_triplet"):
        assert get_config(f"{name}:paper").sampler.name == "class_balanced"


@pytest.mark.parametrize("setting, backbone, image_size, resize, weights", [
    ("tiny", "small_resnet", 32, 36, None),
    ("cpu", "efficientnet_lite0", 96, 110, "imagenet"),
    ("paper", "resnet50", 224, 256, "imagenet"),  # Sec. 3: 256, random crop 224 + flip
])
def test_setting_shapes(setting, backbone, image_size, resize, weights):
    config = get_config(f"deep_knn:{setting}")
    model = config.task.model
    assert (model["backbone"], model["image_size"], model["weights"]) == (
        backbone, image_size, weights)
    assert config.data.resize_size == resize
    sampler = config.sampler
    # Every class of Skin-7 in every batch, at least K + 1 = 6 images of each.
    assert sampler.num_classes_per_batch == 7 and sampler.num_per_class >= 6
    assert sampler.batch_size == {"tiny": 42, "cpu": 56, "paper": 96}[setting]


def test_stratified_batches_near_the_papers_96():
    assert stratified_batch("paper", 7) == (7, 14)  # 98
    assert stratified_batch("paper", 2) == (2, 48)  # 96
    assert stratified_batch("paper", 198) == (7, 14)
    assert stratified_batch("cpu", 7) == (7, 8)
    assert stratified_batch("cpu", 2) == (2, 28)
    assert stratified_batch("tiny", 7) == (7, 6)  # never fewer than K + 1 = 6 per class
    with pytest.raises(ValueError, match="num_classes must be an integer of at least 2"):
        stratified_batch("paper", 1)
    with pytest.raises(ValueError, match="setting must be one of"):
        stratified_batch("huge", 7)


def test_paper_learning_rate_halves_every_20_epochs():
    """SGD at 0.01, halved every 20 epochs: with 84 steps per epoch, steps 0..1679 use 0.01,
    1680..3359 use 0.005 and 3360.. use 0.0025 (0.01 * 0.5 ** floor(step / 1680))."""
    config = get_config("deep_knn:paper")
    steps_per_epoch = config.steps_per_epoch
    assert steps_per_epoch == 84
    optimizer = make_optimizer(config.optimizer, steps_per_epoch)
    assert isinstance(optimizer, keras.optimizers.SGD)
    assert optimizer.momentum == pytest.approx(0.9)
    expected = {0: 0.01, 1679: 0.01, 1680: 0.005, 3359: 0.005, 3360: 0.0025, 80 * 84: 0.000625}
    for step, learning_rate in expected.items():
        optimizer.iterations.assign(step)
        assert float(np.asarray(optimizer.learning_rate)) == pytest.approx(learning_rate), step
