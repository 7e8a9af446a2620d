"""The Y-Net task through the shared task contract and `fit`, on small images with masks."""

import keras
import numpy as np
import pytest

from tfmir.configs import get_config, override
from tfmir.data import Examples
from tfmir.models import YNet
from tfmir.tasks import YNetTraining, build_task

from tests.tasks.harness import run_determinism_test, run_task_test

SIDE = 104  # the tiny setting's resize side


def lesions(num_per_class: int, seed: int) -> Examples:
    """Three classes of skin-coloured images with a dark disc ("lesion") whose size is the
    class; the masks are the discs."""
    rng = np.random.default_rng(seed)
    images, masks, labels = [], [], []
    rows, columns = np.mgrid[:SIDE, :SIDE]
    for label, radius in enumerate((12, 22, 34)):
        for _ in range(num_per_class):
            centre = rng.uniform(SIDE / 2 - 10, SIDE / 2 + 10, size=2)
            disc = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 < radius ** 2
            image = rng.normal((200, 160, 140), 12, size=(SIDE, SIDE, 3))
            image[disc] = rng.normal((90, 60, 50), 12, size=(int(disc.sum()), 3))
            images.append(np.clip(image, 0, 255).astype(np.uint8))
            masks.append(disc.astype(np.uint8))
            labels.append(label)
    count = len(labels)
    return Examples(labels=labels, sources="lesions", ids=[f"{seed}/{i}" for i in range(count)],
                    class_names=("small", "medium", "large"), images=np.stack(images),
                    masks=np.stack(masks))


@pytest.fixture(scope="module")
def splits():
    return {"train": lesions(8, seed=0), "val": lesions(4, seed=1)}


def tiny_config(**values):
    return override(get_config("ynet:tiny"), {"epochs": 2, "steps_per_epoch": 2, **values})


def test_ynet_contract(splits, tmp_path):
    config = tiny_config()
    task = run_task_test(lambda: build_task(config.task, splits), config, splits["train"],
                         tmp_path)
    assert isinstance(task, YNetTraining) and task.fields == ("image", "label", "mask")
    assert task.ynet.num_classes == 3  # from the training split
    assert set(task.deployable_model.output) == {"code", "mask"}
    assert task.deployable_model.output["code"].shape == (None, 64)


@pytest.mark.parametrize("values, fields", [
    ({"task.model.branches": "rmac"}, ("image", "label")),
    ({"task.model.branches": "none"}, ("image", "label")),
    ({"task.model.branches": "fpn"}, ("image", "label", "mask")),
    ({"task.args.classification_loss": "cross_entropy"}, ("image", "label", "mask")),
])
def test_every_variant_trains(splits, tmp_path, values, fields):
    config = tiny_config(**values)
    task = run_task_test(lambda: build_task(config.task, splits), config, splits["train"],
                         tmp_path)
    assert task.fields == fields


def test_coupled_loss_is_the_weighted_mean_of_both_losses(splits):
    keras.utils.set_random_seed(0)
    ynet = YNet.from_preset("tiny", num_classes=3)
    x = {"image": splits["train"].images[:6].astype("float32")[:, 4:100, 4:100]}
    y = {"label": splits["train"].labels[:6],
         "mask": splits["train"].masks[:6, 4:100, 4:100, None].astype("float32")}
    tasks = {mode: YNetTraining(ynet, loss_weighting=mode) for mode in ("fixed", "sum")}
    outputs = tasks["fixed"](x)
    circle = float(tasks["fixed"].class_loss(y["label"], outputs["class_scores"]))
    pixels = float(keras.losses.BinaryCrossentropy(from_logits=True)(y["mask"],
                                                                     outputs["mask_logits"]))
    assert float(tasks["fixed"].compute_loss(x, y, outputs)) == pytest.approx(
        0.5 * circle + 0.5 * pixels, rel=1e-5)
    assert float(tasks["sum"].compute_loss(x, y, outputs)) == pytest.approx(circle + pixels,
                                                                              rel=1e-5)


def test_fit_is_deterministic_and_logs_map_and_dice(splits, tmp_path):
    result = run_determinism_test(tiny_config(), splits, tmp_path)
    assert {"val_map@10", "val_dice", "val_iou"} <= set(result.history)
    assert (tmp_path / "run0" / "best.keras").exists()


def test_masks_are_required_for_the_fpn_branch(splits, tmp_path):
    from tfmir.training import fit

    no_masks = {name: Examples(labels=part.labels, sources=part.sources, ids=part.ids,
                               class_names=part.class_names, images=part.images)
                for name, part in splits.items()}
    with pytest.raises(ValueError, match="trains on masks, but the training split has no masks"):
        fit(tiny_config(), no_masks, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arguments, message", [
    ({"classification_loss": "focal"}, "classification_loss must be one of"),
    ({"loss_weighting": "uncertainty"}, "loss_weighting must be one of"),
    ({"num_bits": 0}, "num_bits"),
])
def test_bad_task_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        YNetTraining(YNet.from_preset("tiny", num_classes=3), **arguments)


def test_unknown_task_argument_is_refused(splits):
    config = tiny_config(**{"task.args.omega": 0.3})
    with pytest.raises(ValueError, match=r"unknown ynet argument\(s\) \['omega'\]"):
        build_task(config.task, splits)
