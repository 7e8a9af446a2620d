"""The segmentation task through the shared task contract and `fit`, on bright discs (lesions)
and bright bars (vessels) with their masks: the pipeline's patches, the loss, a real Dice gain."""

import keras
import numpy as np
import pytest

from tfmir.configs import get_config, override
from tfmir.data import Examples
from tfmir.losses import focal_tversky
from tfmir.models import MASK, R2UNet, select_output
from tfmir.tasks import Segmentation, build_task
from tfmir.training import fit
from tfmir.training.evaluators import SegmentationOverlap

from tests.tasks.harness import fixed_batch, run_determinism_test, run_task_test

LESION_SIDE = 36  # segmenter:tiny resizes to 36 and crops 32
VESSEL_SIDE = 64  # segmenter_drive:tiny: a 64 px segmenter trained on 32 px patches
BRIGHT, DARK = 220, 30


def examples(images, masks, seed):
    count = len(images)
    return Examples(labels=np.zeros(count, np.int64), sources="synthetic",
                    ids=[f"{seed}/{i}" for i in range(count)], class_names=("foreground",),
                    images=np.stack(images), masks=np.stack(masks))


def noisy(mask, rng):
    """Bright foreground on a dark background, with noise that never crosses the midpoint."""
    image = np.where(mask[..., None], BRIGHT, DARK) + rng.integers(-20, 21, mask.shape + (3,))
    return image.astype(np.uint8)


def discs(num_images, seed, side=LESION_SIDE):
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[:side, :side]
    images, masks = [], []
    for _ in range(num_images):
        radius = rng.uniform(5, 11)
        centre = rng.uniform(radius, side - radius, size=2)
        mask = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 < radius ** 2
        images.append(noisy(mask, rng))
        masks.append(mask.astype(np.uint8))
    return examples(images, masks, seed)


def bars(num_images, seed, side=VESSEL_SIDE):
    """Thin horizontal and vertical bright bars, a few pixels wide (a crude vessel tree)."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for _ in range(num_images):
        mask = np.zeros((side, side), bool)
        for _ in range(3):
            start, width = rng.integers(0, side - 4), rng.integers(2, 4)
            if rng.random() < 0.5:
                mask[start:start + width] = True
            else:
                mask[:, start:start + width] = True
        images.append(noisy(mask, rng))
        masks.append(mask.astype(np.uint8))
    return examples(images, masks, seed)


@pytest.fixture(scope="module")
def lesions():
    return {"train": discs(16, seed=0), "val": discs(8, seed=1)}


@pytest.fixture(scope="module")
def vessels():
    return {"train": bars(8, seed=2), "val": bars(4, seed=3)}


def tiny_config(name="segmenter", **values):
    return override(get_config(f"{name}:tiny"), {"epochs": 2, "steps_per_epoch": 2, **values})


def test_segmentation_contract(lesions, tmp_path):
    config = tiny_config()
    task = run_task_test(lambda: build_task(config.task, lesions), config, lesions["train"],
                         tmp_path)
    assert isinstance(task, Segmentation) and task.fields == ("image", "mask")
    assert task.samplers == ("shuffled",)
    assert task.deployable_model is task.segmenter and isinstance(task.segmenter, R2UNet)
    assert task.segmenter.variant == "r2unet" and task.image_size == 32
    assert (task.alpha, task.beta, task.gamma) == (0.7, 0.3, 0.75)
    assert (task.monitor, task.mode) == ("val_dice", "max")


@pytest.mark.large
@pytest.mark.parametrize("variant", ["unet", "runet"])
def test_every_variant_trains(lesions, tmp_path, variant):
    config = tiny_config(**{"task.model.variant": variant})
    task = run_task_test(lambda: build_task(config.task, lesions), config, lesions["train"],
                         tmp_path)
    assert task.segmenter.variant == variant


def test_patch_task_shares_the_segmenters_layers(vessels):
    """The DRIVE shape: the task's graph takes 32 px patches; the deployable segmenter is 64 px,
    and both hold the very same weights (training one trains the other, see the fit test)."""
    config = tiny_config("segmenter_drive")
    task = build_task(config.task, vessels)
    assert task.image_size == 32 and task.segmenter.image_size == 64
    assert tuple(task.inputs[0].shape) == (None, 32, 32, 3)
    assert {id(weight) for weight in task.weights} == {
        id(weight) for weight in task.segmenter.weights}
    x, y = fixed_batch(task, vessels["train"], config)
    assert x["image"].shape == (4, 32, 32, 3) and y["mask"].shape == (4, 32, 32, 1)
    rebuilt = Segmentation.from_config(task.get_config())
    assert rebuilt.patch_size == 32 and rebuilt.segmenter.image_size == 64
    rebuilt.set_weights(task.get_weights())
    np.testing.assert_allclose(rebuilt(x, training=False), task(x, training=False), atol=1e-6)


@pytest.mark.parametrize("name, data, side, patch", [
    ("segmenter", "lesions", LESION_SIDE, 32), ("segmenter_drive", "vessels", VESSEL_SIDE, 32)])
def test_training_patches_are_random_crops_with_their_masks(request, name, data, side, patch):
    """fit's pipeline (via the harness's batch): images resized to resize_size (= their own side
    here, so no resampling) and cropped to the task's image_size at random offsets, with random
    flips; each mask is cropped and flipped with its image, so the mask is exactly where the crop
    is bright."""
    splits = request.getfixturevalue(data)
    config = tiny_config(name, **{"sampler.batch_size": 8})
    assert config.data.resize_size == side
    task = build_task(config.task, splits)
    x, y = fixed_batch(task, splits["train"], config)
    images, masks = np.asarray(x["image"]), np.asarray(y["mask"])
    assert images.shape == (8, patch, patch, 3) and masks.shape == (8, patch, patch, 1)
    np.testing.assert_array_equal(masks[..., 0], (images[..., 0] > 128).astype(np.float32))
    # Crops of one image at different offsets: not all batches are the top-left corner.
    originals = splits["train"].images
    top_left = [np.array_equal(image, original[:patch, :patch])
                for image in images for original in originals]
    assert sum(top_left) < len(images)


def test_loss_is_the_mean_focal_tversky_of_the_images(lesions):
    keras.utils.set_random_seed(0)
    task = Segmentation(R2UNet.from_preset("tiny"))
    x = {"image": lesions["train"].images[:4, :32, :32].astype("float32")}
    y = {"mask": lesions["train"].masks[:4, :32, :32, None].astype("float32")}
    probabilities = task(x, training=True)
    expected = np.mean(focal_tversky(y["mask"], probabilities, 0.7, 0.3, 0.75).numpy())
    assert float(task.compute_loss(x, y, probabilities)) == pytest.approx(expected, rel=1e-5)


def test_the_single_output_is_the_mask():
    segmenter = R2UNet.from_preset("tiny")
    images = np.zeros((1, 32, 32, 3), "float32")
    assert select_output(segmenter(images), MASK).shape == (1, 32, 32, 1)


def test_fit_improves_dice_over_the_untrained_segmenter(lesions, tmp_path):
    config = tiny_config(**{"epochs": 2, "steps_per_epoch": 20})
    keras.utils.set_random_seed(config.seed)  # what fit seeds before it builds the task
    untrained = build_task(config.task, lesions).deployable_model
    untrained_dice = SegmentationOverlap().evaluate(
        untrained, lesions["val"], resize_size=config.data.resize_size)["dice"]
    result = fit(config, lesions, tmp_path / "run", verbose=0)
    trained_dice = max(result.history["val_dice"])
    assert trained_dice > untrained_dice + 0.2, (untrained_dice, result.history["val_dice"])
    assert trained_dice > 0.7
    assert isinstance(keras.saving.load_model(result.best_path), R2UNet)


@pytest.mark.large
def test_fit_on_patches_trains_and_evaluates_the_whole_image_segmenter(vessels, tmp_path):
    config = tiny_config("segmenter_drive")
    keras.utils.set_random_seed(config.seed)
    initial = build_task(config.task, vessels).segmenter.get_weights()
    result = fit(config, vessels, tmp_path / "run", verbose=0)
    assert {"val_dice", "val_iou"} <= set(result.history)
    assert result.model.image_size == 64  # validation, best.keras and export at 64 x 64
    assert keras.saving.load_model(result.best_path).input_shape == (None, 64, 64, 3)
    changed = [not np.array_equal(before, after)
               for before, after in zip(initial, result.model.get_weights())]
    assert all(changed[:4])  # the first convolutions, trained through the 32 px graph


@pytest.mark.large
def test_fit_is_deterministic(lesions, tmp_path):
    """On the U-Net variant. RU-Net and R2U-Net train reproducibly only up to float32 rounding
    (weights differ by ~1e-8 between identical runs): with TensorFlow's inter-op parallelism
    their batch-normalised recurrent sums are not summed in a fixed order (one inter-op thread,
    or no batch norm, makes them bitwise reproducible; `enable_op_determinism` does not)."""
    result = run_determinism_test(tiny_config(**{"task.model.variant": "unet"}), lesions,
                                  tmp_path)
    assert {"val_dice", "val_iou"} <= set(result.history)


def test_masks_are_required(lesions, tmp_path):
    no_masks = {name: Examples(labels=part.labels, sources=part.sources, ids=part.ids,
                               class_names=part.class_names, images=part.images)
                for name, part in lesions.items()}
    with pytest.raises(ValueError, match="trains on masks, but the training split has no masks"):
        fit(tiny_config(), no_masks, tmp_path / "run")


@pytest.mark.parametrize("arguments, message", [
    ({"patch_size": 18}, r"patch_size must be a multiple of the segmenter's size divisor 4. "
                         r"Received: patch_size=18"),
    ({"patch_size": 0}, r"patch_size must be a positive integer or None. Received: "
                        r"patch_size=0"),
    ({"gamma": 0}, r"gamma must be positive. Received: gamma=0"),
])
def test_bad_task_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        Segmentation(R2UNet.from_preset("tiny"), **arguments)


def test_bad_segmenters():
    with pytest.raises(ValueError, match=r"a segmenter built for any input side "
                                         r"\(image_size=None\) needs a patch_size"):
        Segmentation(R2UNet.from_preset("tiny", image_size=None))
    pixels = keras.Input((8, 8, 3))
    two_channels = keras.Model(pixels, keras.layers.Conv2D(2, 1)(pixels))
    with pytest.raises(ValueError, match=r"segmenter must output one foreground probability "
                                         r"per pixel, \(B, S, S, 1\). Received output shape "
                                         r"\(None, 8, 8, 2\)"):
        Segmentation(two_channels)
    with pytest.raises(ValueError, match="segmenter must be a functional keras.Model"):
        Segmentation(keras.layers.Dense(1))


def test_unknown_task_argument_is_refused(lesions):
    config = tiny_config(**{"task.args.delta": 0.3})
    with pytest.raises(ValueError, match=r"unknown segmentation argument\(s\) \['delta'\]"):
        build_task(config.task, lesions)
