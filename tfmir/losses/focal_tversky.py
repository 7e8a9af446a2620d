"""Focal Tversky loss (Abraham & Khan, 2018) for binary segmentation masks."""

import keras
from keras import ops


def focal_tversky(y_true, y_pred, alpha=0.7, beta=0.3, gamma=0.75, smooth=1.0):
    """Per-image focal Tversky loss (1 - TI)^gamma, shape (B,).

    With p the predicted foreground probability and g the true mask (0 or 1), summed over every
    pixel (every non-batch axis) of one image:

        TP = sum p g,   FN = sum (1 - p) g,   FP = sum p (1 - g)
        TI = (TP + smooth) / (TP + alpha FN + beta FP + smooth)
        loss = (1 - TI)^gamma

    alpha weights the false negatives and beta the false positives, so alpha > beta favours
    recall (Abraham & Khan: alpha = 0.7, beta = 0.3, for lesions much smaller than the image).
    gamma = 1 gives the plain Tversky loss 1 - TI, and alpha = beta = 0.5 with gamma = 1 the Dice
    loss. Abraham & Khan write the exponent as 1 / gamma with gamma = 4/3; `gamma` here is the
    exponent itself, 0.75. The smoothing `smooth` = 1 in numerator and denominator (as in their
    code) keeps an image whose truth and prediction are both empty at TI = 1, loss 0, and the
    gradient finite there.

    Two differences from the authors' code, on purpose: the index is taken per image, not over
    the whole flattened batch, so every image of a batch counts equally whatever its lesion size;
    and for gamma < 1 the slope gamma (1 - TI)^(gamma - 1) is infinite at TI = 1, so there
    (a perfect prediction, or empty on empty) the loss is set to 0 with a zero gradient.

    Keras 3 has `keras.losses.tversky(y_true, y_pred, alpha, beta)`; it is not called here
    because it smooths only the denominator (epsilon 1e-7), so an empty truth and an empty
    prediction give loss 1 rather than 0, and by default it sums over the batch too.
    (`tests/losses/test_focal_tversky.py` pins what it computes: its `alpha` multiplies the
    false negatives, like Abraham & Khan's alpha, although its docstring says false positives.)

    Args:
        y_true: true masks, 0 or 1, shape (B, ...), e.g. (B, H, W, 1); any numeric dtype.
        y_pred: predicted foreground probabilities in [0, 1], the shape of `y_true`.
        alpha: weight of the false negatives, >= 0.
        beta: weight of the false positives, >= 0.
        gamma: the focal exponent, > 0 (0.75 in the paper; 1: the plain Tversky loss).
        smooth: the smoothing term s, > 0.

    Returns:
        float32 tensor (B,), computed in float32 even for float16 or bfloat16 predictions.

    Example:

    >>> # TP = 1, FN = 1, FP = 0: TI = (1 + 1) / (1 + 0.7 + 1) = 2 / 2.7, loss = (0.7 / 2.7)^0.75
    >>> round(float(focal_tversky([[1.0, 1.0, 0.0]], [[1.0, 0.0, 0.0]])[0]), 4)
    0.3633

    Reference:
        Abraham & Khan, "A Novel Focal Tversky Loss Function with Improved Attention U-Net for
        Lesion Segmentation", ISBI 2019, https://arxiv.org/abs/1810.07842 (the Tversky index
        and the focal Tversky loss); used for R2U-Net in Sec. 3.4 of "Exploring Content Based
        Image Retrieval for Highly Imbalanced Melanoma Data using Style Transfer, Semantic Image
        Segmentation and Ensemble Learning".
    """
    check_focal_tversky_arguments(alpha=alpha, beta=beta, gamma=gamma, smooth=smooth)
    y_pred = ops.cast(y_pred, "float32")
    y_true = ops.cast(y_true, "float32")
    true_shape, pred_shape = tuple(y_true.shape), tuple(y_pred.shape)
    # Sums over broadcast shapes ((B, H, W) against (B, H, W, 1)) would be silently wrong.
    if len(true_shape) != len(pred_shape) or any(
            a is not None and b is not None and a != b for a, b in zip(true_shape, pred_shape)):
        raise ValueError(f"y_true and y_pred must have the same shape, (B, ...). Received: "
                         f"y_true.shape={true_shape}, y_pred.shape={pred_shape}")
    axes = tuple(range(1, len(pred_shape)))
    true_positives = ops.sum(y_pred * y_true, axis=axes)
    false_negatives = ops.sum((1.0 - y_pred) * y_true, axis=axes)
    false_positives = ops.sum(y_pred * (1.0 - y_true), axis=axes)
    tversky_index = (true_positives + smooth) / (
        true_positives + alpha * false_negatives + beta * false_positives + smooth)
    distance = 1.0 - tversky_index
    # At TI = 1 (a perfect or an empty-on-empty prediction) the loss is 0 with a zero
    # gradient, not the infinite slope of x^gamma at 0 for gamma < 1.
    positive = distance > 0
    return ops.where(positive, ops.power(ops.where(positive, distance, 1.0), gamma), 0.0)


def check_focal_tversky_arguments(*, alpha, beta, gamma, smooth):
    """Raises ValueError for a negative alpha or beta, or a gamma or smooth that is not positive."""
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not value >= 0:
            raise ValueError(f"{name} must be non-negative. Received: {name}={value!r}")
    for name, value in (("gamma", gamma), ("smooth", smooth)):
        if not value > 0:
            raise ValueError(f"{name} must be positive. Received: {name}={value!r}")


@keras.saving.register_keras_serializable(package="tfmir")
class FocalTversky(keras.losses.Loss):
    """Focal Tversky loss between true masks and predicted foreground probabilities.

    `y_true` holds the masks (B, H, W, 1) (or (B, H, W)) of 0 and 1 and `y_pred` the
    probabilities (B, H, W, 1) (a sigmoid output, not logits). The default reduction
    `"sum_over_batch_size"` is the mean of the per-image losses. See `focal_tversky` for the
    formula.

    Args:
        alpha: weight of the false negatives (0.7 in the paper).
        beta: weight of the false positives (0.3 in the paper).
        gamma: the focal exponent (0.75 in the paper).
        smooth: the smoothing term s.
        reduction: Keras loss reduction.
        name: Name of the loss.

    Example:

    >>> model = keras.Sequential([keras.Input((8, 8, 3)),
    ...                           keras.layers.Conv2D(1, 1, activation="sigmoid")])
    >>> model.compile(optimizer="adam", loss=FocalTversky())

    Reference:
        Abraham & Khan, "A Novel Focal Tversky Loss Function with Improved Attention U-Net for
        Lesion Segmentation", ISBI 2019, https://arxiv.org/abs/1810.07842
    """

    def __init__(self, alpha=0.7, beta=0.3, gamma=0.75, smooth=1.0,
                 reduction="sum_over_batch_size", name="focal_tversky"):
        check_focal_tversky_arguments(alpha=alpha, beta=beta, gamma=gamma, smooth=smooth)
        # float32 on purpose: pixel sums over a whole image lose too much in half precision.
        super().__init__(name=name, reduction=reduction, dtype="float32")
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma
        self.smooth = smooth

    def call(self, y_true, y_pred):
        y_true, y_pred = ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
        if len(y_true.shape) == len(y_pred.shape) - 1 and y_pred.shape[-1] == 1:
            y_true = ops.expand_dims(y_true, -1)  # (B, H, W) masks for (B, H, W, 1) outputs
        return focal_tversky(y_true, y_pred, alpha=self.alpha, beta=self.beta, gamma=self.gamma,
                             smooth=self.smooth)

    def get_config(self):
        config = super().get_config()
        config.update(alpha=self.alpha, beta=self.beta, gamma=self.gamma, smooth=self.smooth)
        return config
