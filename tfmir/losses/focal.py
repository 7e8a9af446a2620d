"""Binary focal loss (Lin et al., 2017), the loss of paper 003's EfficientNet-B6 members.

    FL(p_t) = -alpha_t (1 - p_t)^gamma log(p_t),
    p_t = p if y = 1 else 1 - p,  alpha_t = alpha if y = 1 else 1 - alpha.

Why not `keras.losses.binary_focal_crossentropy`: with `apply_class_balancing=True` its
values are Lin et al.'s (`tests/losses/test_focal.py` checks it against the same loop
oracle as this module), but

- its default `apply_class_balancing=False` drops alpha_t (alpha_t = 1);
- it forms 1 - p_t by subtraction from p = sigmoid(logit), which rounds to exactly 0 once
  a logit passes about 17 on the right side, and then takes (1 - p_t)^gamma: for gamma < 1,
  gamma = 0 (the plain alpha-weighted cross-entropy) included, the gradient is NaN there,
  so one confident correct prediction turns a whole batch's update into NaN. Lin et al.'s
  gamma = 2 is unaffected. The subtraction also costs relative precision on confident
  correct logits (1e-3 at a logit of 10, 10% at 16), harmless there, as those losses are
  below 1e-13;
- it averages over the last axis only, so labels of shape (B,) give one scalar.

So the loss is written on `keras.ops`, from the logit x and s = +1 for a positive, -1 for
a negative: 1 - p_t = sigmoid(-s x) and log(1 - p_t) = -softplus(s x), log(p_t) =
-softplus(-s x), so

    FL = alpha_t exp(-gamma softplus(s x)) softplus(-s x),

which has a finite value and gradient for every logit and every gamma >= 0 (the slope at
a logit of -100 for a positive is -alpha, Lin et al.'s appendix B). Probabilities
(`from_logits=False`) are clipped to [epsilon, 1 - epsilon], epsilon =
`keras.config.epsilon()` (1e-7), as Keras clips them for its cross-entropies: p = 0 for a
positive costs alpha * -log(1e-7) = alpha * 16.118 instead of infinity, and the loss has no
gradient beyond the clip. Train on logits, as Lin et al. do.

A soft label y in (0, 1) gives y FL(y = 1) + (1 - y) FL(y = 0), the expected loss over
the label, linear in y as the binary cross-entropy is (Keras instead interpolates p_t and
alpha_t inside the power); Lin et al. define only y in {0, 1}.
"""

import math
import numbers

import keras
from keras import ops


def check_focal_arguments(*, alpha, gamma):
    """Raises ValueError for an alpha outside [0, 1] or a negative or infinite gamma."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be a number in [0, 1]. Received: alpha={alpha!r}")
    if (isinstance(gamma, bool) or not isinstance(gamma, numbers.Real)
            or not 0 <= gamma < math.inf):
        raise ValueError(f"gamma must be a finite number >= 0. Received: gamma={gamma!r}")


def binary_focal_loss(y_true, y_pred, alpha=0.25, gamma=2.0, from_logits=False):
    """Per-sample binary focal loss of Lin et al., shape (B,).

    FL = -alpha_t (1 - p_t)^gamma log(p_t), with p_t = p and alpha_t = alpha for a positive
    (y = 1), p_t = 1 - p and alpha_t = 1 - alpha for a negative (y = 0); averaged over the
    outputs of a sample when it has more than one (so the mean over the batch is Keras'
    mean over every output). gamma = 0 is the alpha-weighted binary cross-entropy, and with
    alpha = 0.5 half the plain one. See the module docstring for the numerics and for how
    this differs from `keras.losses.binary_focal_crossentropy`.

    Args:
        y_true: Labels in {0, 1}, the shape of `y_pred` or (B,) for a `y_pred` of (B, 1).
        y_pred: Probabilities p in [0, 1], or logits when `from_logits`, shape (B,) (one
            output per sample) or (B, ...); any float dtype.
        alpha: Weight of the positives, in [0, 1]; negatives get 1 - alpha. 0.25 in Lin et al.
        gamma: Focusing parameter, >= 0. 2 in Lin et al.
        from_logits: Whether `y_pred` holds logits (the numerically safe choice).

    Returns:
        float32 tensor of shape (B,), the loss of every sample, computed in float32 even
        when `y_pred` is float16 or bfloat16.

    Example:

    >>> # y = 1, p = 0.5: 0.25 * 0.5^2 * log(2) = 0.043322
    >>> round(float(binary_focal_loss([1.0], [0.5])[0]), 6)
    0.043322

    Reference:
        Lin, Goyal, Girshick, He, Dollár, "Focal Loss for Dense Object Detection",
        ICCV 2017, https://arxiv.org/abs/1708.02002, eq. 5 and Sec. 4 (alpha = 0.25,
        gamma = 2).
    """
    check_focal_arguments(alpha=alpha, gamma=gamma)
    y_pred = ops.cast(y_pred, "float32")
    y_true = ops.reshape(ops.cast(y_true, "float32"), ops.shape(y_pred))
    if from_logits:
        positive_loss = alpha * _focal_term(y_pred, gamma)
        negative_loss = (1.0 - alpha) * _focal_term(-y_pred, gamma)
    else:
        epsilon = keras.config.epsilon()
        probabilities = ops.clip(y_pred, epsilon, 1.0 - epsilon)
        positive_loss = (
            alpha * ops.power(1.0 - probabilities, gamma) * -ops.log(probabilities)
        )
        negative_loss = (
            (1.0 - alpha) * ops.power(probabilities, gamma) * -ops.log(1.0 - probabilities)
        )
    losses = y_true * positive_loss + (1.0 - y_true) * negative_loss
    if len(losses.shape) > 1:
        losses = ops.mean(losses, axis=tuple(range(1, len(losses.shape))))
    return losses


def _focal_term(logits, gamma):
    """(1 - p)^gamma (-log p) for p = sigmoid(logits), from the logits.

    (1 - p)^gamma = exp(-gamma softplus(logits)) and -log p = softplus(-logits): neither
    rounds 1 - p to 0, so value and gradient stay finite for any logit and gamma >= 0.
    """
    return ops.exp(-gamma * ops.softplus(logits)) * ops.softplus(-logits)


@keras.saving.register_keras_serializable(package="tfmir")
class BinaryFocalLoss(keras.losses.Loss):
    """Binary focal loss of Lin et al. with their defaults alpha = 0.25, gamma = 2.

    With the default reduction `"sum_over_batch_size"` the value is the mean over every
    output, as `keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, ...)`
    computes it; unlike that class, alpha is applied by default and gamma < 1 keeps a
    finite gradient. See `binary_focal_loss` for the formula and its numerics.

    Args:
        alpha: Weight of the positives, in [0, 1]; negatives get 1 - alpha.
        gamma: Focusing parameter, >= 0.
        from_logits: Whether `y_pred` holds logits rather than probabilities.
        reduction: Keras loss reduction.
        name: Name of the loss.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    >>> model.compile(optimizer="adam", loss=BinaryFocalLoss(from_logits=True))

    Reference:
        Lin, Goyal, Girshick, He, Dollár, "Focal Loss for Dense Object Detection",
        ICCV 2017, https://arxiv.org/abs/1708.02002
    """

    def __init__(
        self,
        alpha=0.25,
        gamma=2.0,
        from_logits=False,
        reduction="sum_over_batch_size",
        name="binary_focal_loss",
    ):
        check_focal_arguments(alpha=alpha, gamma=gamma)
        # float32 whatever the policy: (1 - p_t)^gamma of a confident prediction
        # underflows in float16.
        super().__init__(name=name, reduction=reduction, dtype="float32")
        self.alpha = alpha
        self.gamma = gamma
        self.from_logits = from_logits

    def call(self, y_true, y_pred):
        return binary_focal_loss(
            y_true, y_pred, alpha=self.alpha, gamma=self.gamma, from_logits=self.from_logits
        )

    def get_config(self):
        config = super().get_config()
        config.update(alpha=self.alpha, gamma=self.gamma, from_logits=self.from_logits)
        return config
