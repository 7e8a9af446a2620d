"""Sliding-window prediction: a segmenter trained on patches, run on a whole, larger image."""

from __future__ import annotations

import math

import keras
import numpy as np

from tfmir.models.outputs import MASK, select_output


def segment_tiled(model, image, patch_size: int, stride: int | None = None,
                  batch_size: int = 32) -> np.ndarray:
    """Predicts a whole image with overlapping `patch_size` windows, averaging the overlaps.

    The image is padded by reflection (the edge pixel is not repeated: `np.pad` mode "reflect",
    mirrored again where the padding is wider than the image) to the smallest size that windows
    at a step of `stride` cover exactly, about equally on both sides; each pixel's prediction
    is the mean of the predictions of every window that holds it, and the padding is cropped
    away. Used for DRIVE's 565 x 584 fundus images with a segmenter trained on 48 or 64 pixel
    patches (Alom et al.'s patch-based retina experiments).

    Args:
        model: maps (B, patch_size, patch_size, 3) pixels in [0, 255] to (B, patch_size,
            patch_size, C) predictions: a `tfmir.models.R2UNet` built with `image_size=None` or
            `image_size=patch_size`, another Keras model (a dict model gives its "mask"
            output), or any callable on NumPy batches.
        image: (H, W, 3) pixels in [0, 255], any numeric dtype.
        patch_size: the window side; a multiple of `model.size_divisor` when the model has one.
        stride: the step between windows, in [1, patch_size]; default patch_size // 2 (each
            inner pixel seen by about 4 windows).
        batch_size: windows per model call.

    Returns:
        float32 (H, W, C): the averaged predictions.

    Raises:
        ValueError: a bad image, patch size or stride, or a model whose fixed input side is not
            `patch_size`.

    Example:

    ```python
    segmenter = R2UNet.from_preset("cpu", image_size=None)
    segmenter.set_weights(trained.get_weights())  # trained on 64 x 64 patches
    vessels = segment_tiled(segmenter, fundus, patch_size=64, stride=32)  # (584, 565, 1)
    ```

    Reference:
        Alom et al., "Recurrent Residual Convolutional Neural Network based on U-Net (R2U-Net)
        for Medical Image Segmentation", 2018, https://arxiv.org/abs/1802.06955, Sec. IV
        (patch-based retinal vessel segmentation).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"image must be (H, W, 3) pixels. Received shape {image.shape}")
    if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)) or (
            patch_size < 1):
        raise ValueError(f"patch_size must be a positive integer. "
                         f"Received: patch_size={patch_size!r}")
    stride = max(patch_size // 2, 1) if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or not (
            1 <= stride <= patch_size):
        raise ValueError(f"stride must be an integer in [1, patch_size = {patch_size}] (a "
                         "larger step leaves pixels no window covers). "
                         f"Received: stride={stride!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or (
            batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer. "
                         f"Received: batch_size={batch_size!r}")
    divisor = getattr(model, "size_divisor", 1)
    if patch_size % divisor:
        raise ValueError(f"patch_size must be a multiple of the model's size divisor {divisor}. "
                         f"Received: patch_size={patch_size}")
    if isinstance(model, keras.Model) and model.inputs:
        side = tuple(model.inputs[0].shape[1:3])
        if side != (None, None) and side != (patch_size, patch_size):
            raise ValueError(f"the model takes {side[0]} x {side[1]} inputs, not the "
                             f"{patch_size} x {patch_size} windows; build it with "
                             f"image_size=None or image_size={patch_size}")

    height, width = image.shape[:2]
    rows = _window_starts(height, patch_size, stride)
    columns = _window_starts(width, patch_size, stride)
    padded_height = rows[-1] + patch_size
    padded_width = columns[-1] + patch_size
    top, left = (padded_height - height) // 2, (padded_width - width) // 2
    padded = np.pad(image.astype(np.float32),
                    ((top, padded_height - height - top), (left, padded_width - width - left),
                     (0, 0)), mode="reflect")

    if isinstance(model, keras.Layer):
        def predict(batch):
            return select_output(model(batch, training=False), MASK)
    else:
        predict = model
    offsets = [(row, column) for row in rows for column in columns]
    sums = counts = None
    for first in range(0, len(offsets), batch_size):
        chunk = offsets[first:first + batch_size]
        batch = np.stack([padded[row:row + patch_size, column:column + patch_size]
                          for row, column in chunk])
        predictions = np.asarray(keras.ops.convert_to_numpy(predict(batch)), dtype=np.float32)
        if sums is None:
            sums = np.zeros((padded_height, padded_width, predictions.shape[-1]), np.float32)
            counts = np.zeros((padded_height, padded_width, 1), np.float32)
        for (row, column), prediction in zip(chunk, predictions):
            sums[row:row + patch_size, column:column + patch_size] += prediction
            counts[row:row + patch_size, column:column + patch_size] += 1.0
    return (sums / counts)[top:top + height, left:left + width]


def _window_starts(length: int, patch_size: int, stride: int) -> list[int]:
    """Window offsets 0, stride, 2 stride, ... whose windows cover max(length, patch_size)."""
    num_windows = math.ceil(max(length - patch_size, 0) / stride) + 1
    return [index * stride for index in range(num_windows)]
