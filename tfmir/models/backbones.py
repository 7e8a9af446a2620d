"""Backbone CNNs for the embedders, selected by name.

Every backbone takes float pixels in [0, 255] (RGB) and returns one pooled feature vector per
image; the backbone owns the pixel normalisation its weights expect, so the rest of tfmir (and
the exported SavedModel) always feeds raw pixel values.
"""

from __future__ import annotations

import os

import keras

BACKBONES = ("resnet50", "efficientnet_b0", "mobilenet_v3_small", "small_resnet")
WEIGHTS = (None, "imagenet")

_APPLICATIONS = {
    # name: (constructor, preprocessing applied before it)
    "resnet50": ("ResNet50", "caffe"),
    "efficientnet_b0": ("EfficientNetB0", None),  # includes its own rescaling
    "mobilenet_v3_small": ("MobileNetV3Small", None),  # include_preprocessing=True
}


def _imagenet_error(name: str, error: Exception) -> RuntimeError:
    cache = os.path.join(os.path.expanduser("~"), ".keras", "models")
    return RuntimeError(
        f"Could not load ImageNet weights for backbone {name!r}: {error}. This machine may be "
        f"offline. Download the Keras application weights once and place the file in {cache}, "
        "pass a path to a weights file, or use weights=None to train from scratch."
    )


def _caffe_preprocess(x):
    # keras.applications.resnet.preprocess_input, "caffe" mode: RGB -> BGR, minus ImageNet means.
    mean = keras.ops.convert_to_tensor([103.939, 116.779, 123.68], dtype=x.dtype)
    return keras.ops.flip(x, axis=-1) - mean


def _residual_block(x, filters: int, stride: int, name: str):
    shortcut = x
    y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                            name=f"{name}_conv1")(x)
    y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                       name=f"{name}_proj")(shortcut)
        shortcut = keras.layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
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
        A `keras.Model` mapping (B, S, S, 3) pixels in [0, 255] to (B, widths[-1]) features.
    """
    if stem_stride is None:
        stem_stride = 2 if image_size >= 64 else 1
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(inputs)
    x = keras.layers.Conv2D(widths[0], 3, strides=stem_stride, padding="same", use_bias=False,
                            name="stem_conv")(x)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for index, filters in enumerate(widths):
        x = _residual_block(x, filters, stride=1 if index == 0 else 2, name=f"stage{index + 1}")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    # Centre the pooled features: after ReLU and pooling they share a large common component
    # that leaves an untrained embedder with near-identical embeddings (cosine ~ 1), a point
    # Multi-Similarity cannot leave (the gradient of a cosine vanishes between equal vectors).
    outputs = keras.layers.BatchNormalization(name="pool_norm")(x)
    return keras.Model(inputs, outputs, name=name)


def build_backbone(name: str, image_size: int, weights: str | None = None,
                   widths=None) -> keras.Model:
    """Builds a pooled-feature backbone by name.

    Args:
        name: one of `BACKBONES`.
        image_size: height and width of the square input.
        weights: None (random init), "imagenet", or a path to a weights file for the backbone.
        widths: stage widths, only for "small_resnet".

    Returns:
        A `keras.Model` from (B, S, S, 3) pixels in [0, 255] to (B, D) features.
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
    inputs = keras.Input((image_size, image_size, 3), name="pixels")
    x = inputs
    if preprocessing == "caffe":
        x = keras.layers.Lambda(_caffe_preprocess, name="caffe_preprocess")(x)
    outputs = core(x)
    return keras.Model(inputs, outputs, name=name)
