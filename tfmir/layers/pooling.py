"""Global poolings of a convolutional feature map into one image descriptor.

Every layer maps a channels-last feature map (B, H, W, C) to an L2-normalised descriptor (B, C):
R-MAC (Y-Net's R-MAC branch), and the aggregation baselines that Y-Net compares with: SPoC, GeM,
CroW and class-weighted (CAM) pooling. None of them applies the PCA-whitening that their papers
learn on a training set afterwards; fit it separately if needed.
"""

from __future__ import annotations

import numbers

import keras
from keras import ops

# Guards the divisions and logarithms of all-zero feature maps; far below any real activation.
_EPSILON = 1e-6

# Tolias' candidates for the number of level-1 regions along the longer side of a map.
_LONG_SIDE_COUNTS = range(2, 8)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")


def _check_positive_number(name, value):
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not 0 < value < float("inf")):
        raise ValueError(f"{name} must be a positive finite number. Received: {name}={value!r}")


def _check_overlap(overlap):
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real) or not 0 <= overlap < 1:
        raise ValueError(f"overlap must be a number in [0, 1). Received: overlap={overlap!r}")


def _region_starts(length, side, count):
    """`count` starts of regions of `side` cells spread evenly from edge to edge of `length`.

    Rounded half up in integer arithmetic, so the grid is the same on every machine.
    """
    if count == 1:
        return [0]
    span = length - side
    return [(2 * index * span + count - 1) // (2 * (count - 1)) for index in range(count)]


def rmac_regions(height: int, width: int, levels: int = 3,
                 overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """The R-MAC region grid of a `height` x `width` feature map, as (y, x, h, w) tuples.

    Level l = 1..levels holds square regions of side floor(2 min(H, W) / (l + 1)) (Y-Net's eq. 1,
    R_s = 2 min(W, H) / (s + 2) with s = l - 1). Along the shorter side there are l regions, along
    the longer side l + m, where m is fixed once, at level 1, by Tolias' rule: of 2..7 regions of
    side min(H, W) spread over the longer side, take the count whose neighbours overlap by the
    fraction closest to `overlap` (m = that count - 1; a square map has m = 0). The regions of a
    level are spread evenly from edge to edge and their starts rounded to whole cells (half up;
    Tolias' code floors, which shifts some starts of non-square maps by one cell and leaves
    square maps with integer spacing, such as 8 x 8, unchanged). Regions are listed level by
    level, each level row by row.

    An 8 x 8 map with 3 levels gets 1 + 4 + 9 = 14 regions, Y-Net's count (the paper writes
    s = 0..S with S = 3, but 14 regions are 3 scales): one of side 8; four of side 5 starting at
    0 and 3; nine of side 4 starting at 0, 2 and 4.

    Args:
        height: rows of the feature map.
        width: columns of the feature map.
        levels: number of scales L.
        overlap: the wanted overlap of neighbouring level-1 regions along the longer side, as a
            fraction of their side, in [0, 1).

    Returns:
        A list of (y, x, h, w) with h == w; region r covers rows y..y+h-1 and columns x..x+w-1.

    Raises:
        ValueError: a non-positive size or level count, an overlap outside [0, 1), or a map too
            small for the grid (a region side below one cell, or fewer distinct starts than
            regions along a side).

    Example:

    ```python
    rmac_regions(8, 8, levels=2)
    # [(0, 0, 8, 8), (0, 0, 5, 5), (0, 3, 5, 5), (3, 0, 5, 5), (3, 3, 5, 5)]
    ```

    Reference:
        Tolias, Sicre, Jégou, "Particular object retrieval with integral max-pooling of CNN
        activations", ICLR 2016, https://arxiv.org/abs/1511.05879 (Sec. 3, and the authors'
        `rmac_regions.m`).
    """
    _check_positive_int("height", height)
    _check_positive_int("width", width)
    _check_positive_int("levels", levels)
    _check_overlap(overlap)

    short_side, long_side = min(height, width), max(height, width)
    extra = 0
    if height != width:
        def overlap_error(count):
            step = (long_side - short_side) / (count - 1)
            return abs((short_side - step) / short_side - overlap)
        # min() keeps the first of equal errors, the smaller count, as Tolias' MATLAB min does.
        extra = min(_LONG_SIDE_COUNTS, key=overlap_error) - 1
    extra_rows = extra if height > width else 0
    extra_columns = extra if width > height else 0

    regions = []
    for level in range(1, levels + 1):
        side = 2 * short_side // (level + 1)
        if side < 1:
            raise ValueError(f"a {height} x {width} feature map is too small for {levels} R-MAC "
                             f"levels: the regions of level {level} would be {side} cells wide. "
                             f"Received: height={height}, width={width}, levels={levels}")
        starts = []
        for axis, length, count in (("rows", height, level + extra_rows),
                                    ("columns", width, level + extra_columns)):
            axis_starts = _region_starts(length, side, count)
            if len(set(axis_starts)) < count:
                raise ValueError(
                    f"a {height} x {width} feature map is too small for {levels} R-MAC levels: "
                    f"level {level} needs {count} distinct starts of {side}-cell regions along its "
                    f"{length} {axis}. Received: height={height}, width={width}, levels={levels}")
            starts.append(axis_starts)
        regions.extend((y, x, side, side) for y in starts[0] for x in starts[1])
    return regions


@keras.saving.register_keras_serializable(package="tfmir")
class RMAC(keras.layers.Layer):
    """Regional maximum activation of convolutions: (B, H, W, C) -> unit-length (B, C).

    Each region of `rmac_regions(H, W, levels, overlap)` is max-pooled over space into a C-vector,
    which is L2-normalised; the region vectors are summed and the sum L2-normalised. The regions
    come from the static H and W of the input, fixed when the layer is built. No PCA-whitening of
    the region vectors (Tolias learns one on a training set); Y-Net uses none either.

    Args:
        levels: number of region scales (3 in Y-Net: 14 regions on an 8 x 8 map).
        overlap: wanted overlap of neighbouring regions along the longer side (see `rmac_regions`).
        **kwargs: `keras.layers.Layer` arguments such as `name` and `dtype`.

    Example:

    ```python
    descriptors = RMAC(levels=3)(keras.random.uniform((2, 8, 8, 512)))  # (2, 512), unit length
    ```

    Reference:
        Tolias, Sicre, Jégou, "Particular object retrieval with integral max-pooling of CNN
        activations", ICLR 2016, https://arxiv.org/abs/1511.05879; used as Y-Net's R-MAC block
        (Fang et al., "Combating Ambiguity for Hash-code Learning in Medical Instance Retrieval",
        Sec. III-C, https://arxiv.org/abs/2105.08872).
    """

    def __init__(self, levels: int = 3, overlap: float = 0.4, **kwargs):
        super().__init__(**kwargs)
        _check_positive_int("levels", levels)
        _check_overlap(overlap)
        # Plain Python numbers, so that NumPy scalars still give a JSON config.
        self.levels = int(levels)
        self.overlap = float(overlap)
        self.regions = None

    def build(self, input_shape):
        if len(input_shape) != 4 or input_shape[1] is None or input_shape[2] is None:
            raise ValueError("RMAC needs a (batch, height, width, channels) feature map with a "
                             "static height and width to place its regions. Received: "
                             f"input_shape={tuple(input_shape)}")
        height, width = int(input_shape[1]), int(input_shape[2])
        self.regions = rmac_regions(height, width, self.levels, self.overlap)

    def call(self, inputs):
        total = 0.0
        for y, x, region_height, region_width in self.regions:
            region = inputs[:, y:y + region_height, x:x + region_width, :]
            total = total + ops.normalize(ops.max(region, axis=(1, 2)), axis=-1)
        return ops.normalize(total, axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(levels=self.levels, overlap=self.overlap)
        return config


@keras.saving.register_keras_serializable(package="tfmir")
class SPoC(keras.layers.Layer):
    """Sum-pooled convolutional features: (B, H, W, C) -> unit-length (B, C).

    The sum over all H x W positions, L2-normalised. Babenko and Lempitsky also weight the
    positions by a Gaussian centre prior and PCA-whiten the result; neither is done here (the
    plain sum is the paper's unweighted variant).

    Args:
        **kwargs: `keras.layers.Layer` arguments such as `name` and `dtype`.

    Example:

    ```python
    descriptors = SPoC()(keras.random.uniform((2, 8, 8, 512)))  # (2, 512), unit length
    ```

    Reference:
        Babenko, Lempitsky, "Aggregating Deep Convolutional Features for Image Retrieval",
        ICCV 2015, https://arxiv.org/abs/1510.07493
    """

    def call(self, inputs):
        return ops.normalize(ops.sum(inputs, axis=(1, 2)), axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


@keras.saving.register_keras_serializable(package="tfmir")
class GeM(keras.layers.Layer):
    """Generalized-mean pooling: (B, H, W, C) -> unit-length (B, C).

    Per channel, (mean over H x W of max(x, epsilon)^p)^(1/p), then L2 normalisation. p = 1 is
    average pooling and p -> infinity max pooling; the clamp keeps fractional powers defined.

    Args:
        p: the power (3 in Radenović et al.'s experiments).
        trainable_p: learn p with the rest of the model (the paper does) instead of fixing it.
            p is a layer weight either way, so a learned value saves with the model; `p` in the
            config is its initial value.
        epsilon: lower clamp of the activations.
        **kwargs: `keras.layers.Layer` arguments such as `name` and `dtype`.

    Example:

    ```python
    descriptors = GeM(p=3.0)(keras.random.uniform((2, 8, 8, 512)))  # (2, 512), unit length
    ```

    Reference:
        Radenović, Tolias, Chum, "Fine-tuning CNN Image Retrieval with No Human Annotation",
        TPAMI 2018, https://arxiv.org/abs/1711.02512
    """

    def __init__(self, p: float = 3.0, trainable_p: bool = False, epsilon: float = 1e-6,
                 **kwargs):
        super().__init__(**kwargs)
        _check_positive_number("p", p)
        _check_positive_number("epsilon", epsilon)
        if not isinstance(trainable_p, bool):
            raise ValueError(f"trainable_p must be True or False. Received: "
                             f"trainable_p={trainable_p!r}")
        self.p = float(p)
        self.trainable_p = trainable_p
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        self.power = self.add_weight(shape=(), initializer=keras.initializers.Constant(self.p),
                                     trainable=self.trainable_p, name="p")

    def call(self, inputs):
        power = ops.cast(self.power, inputs.dtype)
        clamped = ops.maximum(inputs, self.epsilon)
        pooled = ops.power(ops.mean(ops.power(clamped, power), axis=(1, 2)), 1.0 / power)
        return ops.normalize(pooled, axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(p=self.p, trainable_p=self.trainable_p, epsilon=self.epsilon)
        return config


@keras.saving.register_keras_serializable(package="tfmir")
class CroW(keras.layers.Layer):
    """Cross-dimensional weighted sum pooling: (B, H, W, C) -> unit-length (B, C).

    Per image, with X the feature map clipped at zero (CroW is defined on ReLU outputs, and a
    fractional power of a negative sum is not):

    - spatial weights S = (A / ||A||_a)^(1/b), A the (H, W) map of channel sums;
    - channel weights w_c = log(sum_k Q_k / (epsilon + Q_c)), Q_c the fraction of the H x W
      positions where channel c is non-zero (rare channels weigh more);
    - descriptor_c = w_c * sum_hw S_hw X_hwc, L2-normalised.

    epsilon is 1e-6, and the norm and sum_k Q_k are kept at least epsilon, so that an all-zero
    map gives a zero descriptor instead of NaN. No PCA-whitening (the paper's last step).

    Args:
        a: the norm that normalises the spatial map (2 in the paper).
        b: the power normalisation of the spatial weights (2 in the paper).
        **kwargs: `keras.layers.Layer` arguments such as `name` and `dtype`.

    Example:

    ```python
    descriptors = CroW()(keras.random.uniform((2, 8, 8, 512)))  # (2, 512), unit length
    ```

    Reference:
        Kalantidis, Mellina, Osindero, "Cross-dimensional Weighting for Aggregated Deep
        Convolutional Features", ECCV Workshops 2016, https://arxiv.org/abs/1512.04065
    """

    def __init__(self, a: float = 2, b: float = 2, **kwargs):
        super().__init__(**kwargs)
        _check_positive_number("a", a)
        _check_positive_number("b", b)
        self.a = float(a)
        self.b = float(b)

    def call(self, inputs):
        features = ops.relu(inputs)
        channel_sums = ops.sum(features, axis=-1, keepdims=True)
        norm = ops.power(ops.sum(ops.power(channel_sums, self.a), axis=(1, 2), keepdims=True),
                         1.0 / self.a)
        spatial_weights = ops.power(channel_sums / ops.maximum(norm, _EPSILON), 1.0 / self.b)

        nonzero = ops.mean(ops.cast(features > 0, features.dtype), axis=(1, 2))
        total = ops.maximum(ops.sum(nonzero, axis=-1, keepdims=True), _EPSILON)
        channel_weights = ops.log(total / (_EPSILON + nonzero))

        pooled = ops.sum(spatial_weights * features, axis=(1, 2))
        return ops.normalize(channel_weights * pooled, axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(a=self.a, b=self.b)
        return config


@keras.saving.register_keras_serializable(package="tfmir")
class CAMPooling(keras.layers.Layer):
    """Class-weighted (CAM) pooling: (B, H, W, C) -> unit-length (B, C).

    The layer holds the class weights W (C, num_classes) of a classifier trained as
    global-average-pooling -> Dense on the same feature map, and pools every image once per
    class:

    - CAM_c = ReLU(X . W[:, c]), an (H, W) map, divided by its maximum (so it peaks at 1);
    - v_c = sum_hw CAM_c,hw X_hw, L2-normalised;
    - descriptor = sum of v_c over the chosen classes, L2-normalised.

    With `num_top_classes=None` every class is summed (the paper's offline aggregation);
    otherwise the `num_top_classes` classes of highest score per image. The scores are the
    `scores` argument of `call` (pass the classifier's logits or probabilities); without it they
    are the bias-free logits mean_hw(X) . W, which rank classes like the classifier only when its
    bias is zero. No PCA-whitening of the class vectors (the paper's step before the sum).

    W is a non-trainable weight (the CAMs come from a classifier trained beforehand): copy the
    classifier's kernel into it after building, `layer.class_weights.assign(dense.kernel)`.
    Until then it holds Glorot-uniform random values.

    Args:
        num_classes: number of classes of the classifier.
        num_top_classes: how many of the highest-scoring classes to sum per image; None for all.
        **kwargs: `keras.layers.Layer` arguments such as `name` and `dtype`.

    Example:

    ```python
    pooling = CAMPooling(num_classes=10, num_top_classes=3)
    pooling.build((None, 8, 8, 512))
    pooling.class_weights.assign(classifier_dense.kernel)  # (512, 10)
    descriptors = pooling(features, scores=logits)  # (B, 512), unit length
    ```

    Reference:
        Jiménez, Alvarez, Giró-i-Nieto, "Class-weighted convolutional features for visual
        instance search", BMVC 2017, https://arxiv.org/abs/1707.02581
    """

    def __init__(self, num_classes: int, num_top_classes: int | None = None, **kwargs):
        super().__init__(**kwargs)
        _check_positive_int("num_classes", num_classes)
        if num_top_classes is not None:
            _check_positive_int("num_top_classes", num_top_classes)
            if num_top_classes > num_classes:
                raise ValueError(f"num_top_classes must be at most num_classes={num_classes}. "
                                 f"Received: num_top_classes={num_top_classes!r}")
        self.num_classes = int(num_classes)
        self.num_top_classes = (None if num_top_classes is None
                                else int(num_top_classes))

    def build(self, inputs_shape, scores_shape=None):
        channels = inputs_shape[-1]
        self.class_weights = self.add_weight(shape=(channels, self.num_classes),
                                             initializer="glorot_uniform", trainable=False,
                                             name="class_weights")

    def call(self, inputs, scores=None):
        class_weights = ops.cast(self.class_weights, inputs.dtype)
        cams = ops.relu(ops.einsum("bhwc,cn->bhwn", inputs, class_weights))
        peaks = ops.max(cams, axis=(1, 2), keepdims=True)
        cams = cams / ops.maximum(peaks, _EPSILON)
        class_vectors = ops.normalize(ops.einsum("bhwn,bhwc->bnc", cams, inputs), axis=-1)

        if self.num_top_classes is None:
            return ops.normalize(ops.sum(class_vectors, axis=1), axis=-1)
        if scores is None:
            scores = ops.matmul(ops.mean(inputs, axis=(1, 2)), class_weights)
        _, top_classes = ops.top_k(scores, self.num_top_classes)
        chosen = ops.sum(ops.one_hot(top_classes, self.num_classes, dtype=inputs.dtype), axis=1)
        return ops.normalize(ops.sum(chosen[:, :, None] * class_vectors, axis=1), axis=-1)

    def compute_output_shape(self, inputs_shape, scores_shape=None):
        return (inputs_shape[0], inputs_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes, num_top_classes=self.num_top_classes)
        return config
