"""Class-level circle loss (Sun et al., CVPR 2020) on the cosines of a cosine classifier."""

import keras
import numpy as np
import tensorflow as tf
from keras import ops


def class_circle(labels, cosines, scale=32.0, margin=0.25):
    """Per-item circle loss with class-level labels (Sun et al., 2020, eq. 6), shape (B,).

    `cosines` is the output of a cosine classifier (`tfmir.layers.CosineClassifier`): row i
    holds the cosines of item i's L2-normalised descriptor to every class weight vector.
    The cosine to the item's own class is its one within-class similarity s_p, the others
    are its between-class similarities s_n^j, and

        loss_i = log(1 + sum_j exp(scale a_n^j (s_n^j - D_n)) * exp(-scale a_p (s_p - D_p)))

    with a_p = [O_p - s_p]_+, a_n^j = [s_n^j - O_n]_+, O_p = 1 + margin, O_n = -margin,
    D_p = 1 - margin and D_n = margin. The weights a_p and a_n are constants to the
    gradient, as Sun et al. define it (Sec. 3) and as their reference code does
    (`ap = torch.clamp_min(-sp.detach() + 1 + m, min=0.)`, likewise pytorch-metric-learning's
    `CircleLoss`): with w_p and w_n^j the softmax weights of the two log-sum-exps and
    sigma the sigmoid of their sum, d loss / d s_p = -sigma scale a_p w_p and
    d loss / d s_n^j = sigma scale a_n^j w_n^j.

    How this relates to Keras' `keras.losses.circle` with the identity as reference
    embeddings and the class indices as reference labels:

    - Values. Equal, for cosines in [-1, 1] (`tests/losses/test_circle.py` checks them
      against Keras and against a loop over the formula above). Keras clamps a cosine
      above 1 to exactly 1; here it enters the formula as it is.
    - Gradient. Keras differentiates through a_p and a_n as well, so a between-class
      cosine s_n in (-margin, 0) gets the slope 2 scale s_n < 0 and is pulled up toward 0
      instead of down toward O_n = -margin, which is why this function does not call it.
    - Mask. `keras.losses.circle` marks items whose loss is 0 as masked, and a
      `keras.losses.Loss` then divides its "sum_over_batch_size" by the number of non-zero
      items. Here no mask is attached, so `ClassCircle` is a plain mean over the batch
      (the loss is at least log(1 + (C - 1) exp(-2 scale margin^2)) for cosines in
      [-1, 1], so a zero only appears when float32 underflows, e.g. scale 256 and
      margin 0.5, or for a label without a class).

    Args:
        labels: Integer class of every item, shape (B,) or (B, 1), in [0, C). Checked when
            called eagerly; inside a compiled graph a label outside [0, C) has no positive
            class and silently gives loss 0 (and gradient 0).
        cosines: Cosine of every item to every class weight vector, shape (B, C), C >= 2,
            any float dtype.
        scale: gamma, the scale factor (32 in Y-Net).
        margin: m, the relaxation margin, in [0, 1) (0.25 in Y-Net).

    Returns:
        float32 tensor of shape (B,), the loss of every item, computed in float32 even
        when `cosines` are float16 or bfloat16.

    Example:

    >>> # s_p = 1, s_n = 0: both logits are -scale * margin^2 = -2, loss = log(1 + e^-4)
    >>> round(float(class_circle([0], [[1.0, 0.0]])[0]), 4)
    0.0181

    Reference:
        Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization",
        CVPR 2020, https://arxiv.org/abs/2002.10857, eq. 6; scale 32 and margin 0.25 from
        Fang et al., "Combating Ambiguity for Hash-code Learning in Medical Instance
        Retrieval" (Y-Net), IEEE JBHI 2021, Sec. IV-B.
    """
    check_circle_arguments(scale=scale, margin=margin)
    cosines = ops.cast(cosines, "float32")
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    num_classes = cosines.shape[-1]
    if num_classes is not None and num_classes < 2:
        raise ValueError(
            "cosines must have at least 2 classes (a circle loss needs a negative). "
            f"Received: cosines.shape={tuple(cosines.shape)}"
        )
    if num_classes is None:
        num_classes = ops.shape(cosines)[-1]
    if tf.executing_eagerly():
        _check_labels(labels, num_classes)

    is_positive = ops.expand_dims(labels, 1) == ops.expand_dims(ops.arange(num_classes), 0)
    positive_weights = ops.stop_gradient(ops.relu(1.0 + margin - cosines))
    negative_weights = ops.stop_gradient(ops.relu(cosines + margin))
    positive_logits = -scale * positive_weights * (cosines - (1.0 - margin))
    negative_logits = scale * negative_weights * (cosines - margin)
    return ops.softplus(
        _masked_logsumexp(positive_logits, is_positive)
        + _masked_logsumexp(negative_logits, ops.logical_not(is_positive))
    )


def _masked_logsumexp(logits, mask):
    """log sum_j exp(logits_j) over the entries where `mask` holds, per row; -inf for none.

    A row with no entry (a label outside the classes, in a graph) gives -inf and, unlike
    `ops.logsumexp` on -inf logits, a zero gradient instead of NaN.
    """
    masked = ops.where(mask, logits, float("-inf"))
    row_max = ops.max(masked, axis=1, keepdims=True)
    row_max = ops.stop_gradient(ops.where(ops.isfinite(row_max), row_max, 0.0))
    sums = ops.sum(ops.where(mask, ops.exp(masked - row_max), 0.0), axis=1)
    has_entries = sums > 0
    # log(1) in the rows left empty keeps their gradient at 0 rather than 0 * inf.
    logsumexp = ops.log(ops.where(has_entries, sums, 1.0)) + ops.squeeze(row_max, 1)
    return ops.where(has_entries, logsumexp, float("-inf"))


def check_circle_arguments(*, scale, margin):
    """Raises ValueError for a scale that is not positive or a margin outside [0, 1)."""
    if not scale > 0:
        raise ValueError(f"scale must be positive. Received: scale={scale!r}")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1). Received: margin={margin!r}")


def _check_labels(labels, num_classes):
    values = ops.convert_to_numpy(labels)
    outside = values[(values < 0) | (values >= int(num_classes))]
    if outside.size:
        raise ValueError(
            f"labels must be in [0, {int(num_classes)}) for {int(num_classes)} classes. "
            f"Received: labels containing {np.unique(outside).tolist()}"
        )


@keras.saving.register_keras_serializable(package="tfmir")
class ClassCircle(keras.losses.Loss):
    """Class-level circle loss between integer labels and class cosines.

    `y_true` holds the labels (B,) or (B, 1) and `y_pred` the cosines (B, C) of a cosine
    classifier. The default reduction `"sum_over_batch_size"` is the mean over all B
    items, including any whose loss is 0 (unlike a Loss wrapping `keras.losses.circle`
    directly), and a_p and a_n are constants to the gradient, as in Sun et al.'s code.
    See `class_circle` for the formula.

    Args:
        scale: gamma, the scale factor (32 in Y-Net).
        margin: m, the relaxation margin, in [0, 1) (0.25 in Y-Net).
        reduction: Keras loss reduction.
        name: Name of the loss.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, "tanh")])
    >>> model.compile(optimizer="adam", loss=ClassCircle())

    Reference:
        Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization",
        CVPR 2020, https://arxiv.org/abs/2002.10857
    """

    def __init__(
        self, scale=32.0, margin=0.25, reduction="sum_over_batch_size", name="class_circle"
    ):
        check_circle_arguments(scale=scale, margin=margin)
        # float32 on purpose: Keras casts y_true to the loss dtype, and labels
        # must stay exact under a mixed-precision policy.
        super().__init__(name=name, reduction=reduction, dtype="float32")
        self.scale = scale
        self.margin = margin

    def call(self, y_true, y_pred):
        return class_circle(y_true, y_pred, scale=self.scale, margin=self.margin)

    def get_config(self):
        config = super().get_config()
        config.update(scale=self.scale, margin=self.margin)
        return config
