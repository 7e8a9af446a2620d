"""Segmentation (paper 003, Sec. 3.4): a U-Net-family segmenter trained with focal Tversky loss."""

from __future__ import annotations

import keras
from keras import ops

from tfmir.losses import FocalTversky
from tfmir.models.r2unet import R2UNet
from tfmir.tasks.task import Task, check_task_arguments


@keras.saving.register_keras_serializable(package="tfmir")
class Segmentation(Task):
    """Trains a segmenter (pixels -> (B, S, S, 1) foreground probabilities) on image + mask pairs.

    The loss is the focal Tversky loss of each image's mask (`tfmir.losses.FocalTversky`:
    alpha = 0.7 on false negatives, beta = 0.3 on false positives, exponent 0.75), averaged over
    the batch. Batches are `({"image"}, {"mask"})`, plain random batches ("shuffled"); no labels
    are needed. The deployable model is the segmenter itself, whose one output is the mask: it is
    what `best.keras`, export and the `SegmentationOverlap` evaluator (Dice and IoU, logged as
    `val_dice` and `val_iou`; `val_dice` picks the best checkpoint) use.

    Training on patches. `fit` trains on random `image_size` crops (with random horizontal flips)
    of the images resized to the config's `resize_size`, the mask cropped and flipped with its
    image (`tfmir.data.preprocess_image`), where `image_size` is this task's `image_size`: the
    `patch_size` given here, else the segmenter's input side. Two ways to train on patches:

    - A segmenter of the patch side, e.g. `R2UNet(image_size=64)` with `resize_size=576`: random
      64 x 64 patches of the 576 x 576 image; validation then scores the central 64 x 64 crop.
    - A segmenter of the whole (resized) image with a smaller `patch_size`, e.g.
      `R2UNet(image_size=576)`, `patch_size=64` and `resize_size=576`: the same random patches
      for training (this task runs the segmenter's layers on a 64 x 64 input, sharing their
      weights), while validation, `best.keras` and export use the whole 576 x 576 image. This is
      what `tfmir.configs.segmenter_drive` does.

    Args:
        segmenter: a functional model from (B, S, S, 3) pixels in [0, 255] to (B, S, S, 1)
            probabilities, e.g. a `tfmir.models.R2UNet`; fully convolutional when `patch_size`
            differs from its input side.
        patch_size: side of the training crops; None: the segmenter's input side.
        alpha: focal Tversky weight of the false negatives.
        beta: focal Tversky weight of the false positives.
        gamma: focal Tversky exponent.
        **kwargs: `keras.Model` arguments such as `name`.

    Example:

    ```python
    task = Segmentation(R2UNet.from_preset("tiny"))
    fit(get_config("segmenter:tiny"), {"train": train, "val": val}, "runs/r2unet")
    ```

    Reference:
        "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data using Style
        Transfer, Semantic Image Segmentation and Ensemble Learning", Sec. 3.4; Alom et al.,
        https://arxiv.org/abs/1802.06955; Abraham & Khan, https://arxiv.org/abs/1810.07842.
    """

    fields = ("image", "mask")
    samplers = ("shuffled",)
    evaluators = ({"name": "segmentation"},)
    monitor = "val_dice"
    mode = "max"

    def __init__(self, segmenter: keras.Model, patch_size: int | None = None,
                 alpha: float = 0.7, beta: float = 0.3, gamma: float = 0.75, **kwargs):
        if not isinstance(segmenter, keras.Model) or not getattr(segmenter, "inputs", None) or (
                len(segmenter.inputs) != 1 or len(segmenter.outputs) != 1):
            raise ValueError("segmenter must be a functional keras.Model with one input and one "
                             f"output, such as an R2UNet. Received {type(segmenter).__name__}")
        if segmenter.outputs[0].shape[-1] != 1:
            raise ValueError("segmenter must output one foreground probability per pixel, (B, S, "
                             f"S, 1). Received output shape {tuple(segmenter.outputs[0].shape)}")
        side = segmenter.inputs[0].shape[1]
        if patch_size is None:
            if side is None:
                raise ValueError("a segmenter built for any input side (image_size=None) needs a "
                                 "patch_size to train on. Received: patch_size=None")
            patch_size = int(side)
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer or None. "
                             f"Received: patch_size={patch_size!r}")
        divisor = getattr(segmenter, "size_divisor", 1)
        if patch_size % divisor:
            raise ValueError(f"patch_size must be a multiple of the segmenter's size divisor "
                             f"{divisor}. Received: patch_size={patch_size}")
        loss = FocalTversky(alpha=alpha, beta=beta, gamma=gamma)

        # === Functional Model ===
        images = keras.Input((patch_size, patch_size, 3), name="image")
        if side in (None, patch_size):
            masks = segmenter(images)
        else:
            # The segmenter's own layers on a patch-sized input: the weights are shared, so
            # training here trains the deployable segmenter.
            masks = keras.models.clone_model(segmenter, input_tensors=images,
                                             clone_function=lambda layer: layer).outputs[0]
        kwargs.setdefault("name", "segmentation")
        super().__init__(inputs={"image": images}, outputs=masks, **kwargs)

        self.segmenter = segmenter
        self.patch_size = patch_size
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.gamma = float(gamma)
        self.mask_loss = loss

    @property
    def deployable_model(self) -> keras.Model:
        return self.segmenter

    @property
    def image_size(self) -> int:
        return self.patch_size

    def objective(self, x, y, y_pred, training: bool):
        return self.mask_loss(ops.cast(y["mask"], "float32"), ops.cast(y_pred, "float32"))

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "segmenter": keras.saving.serialize_keras_object(self.segmenter),
            "patch_size": self.patch_size,
            "alpha": self.alpha,
            "beta": self.beta,
            "gamma": self.gamma,
        }

    @classmethod
    def from_config(cls, config: dict) -> "Segmentation":
        config = dict(config)
        config["segmenter"] = keras.saving.deserialize_keras_object(config["segmenter"])
        return cls(**config)

    @classmethod
    def from_task_config(cls, model: dict, args: dict, splits: dict) -> "Segmentation":
        """Builds the task of a `tfmir.configs.TaskConfig`: an `R2UNet` from `model` (its
        arguments: variant, image_size, depth, base_width, recurrences) and this class's other
        arguments (patch_size, alpha, beta, gamma) from `args`."""
        del splits  # the segmenter does not depend on the data
        check_task_arguments("segmentation", args, ("patch_size", "alpha", "beta", "gamma"))
        return cls(R2UNet(**model), **args)
