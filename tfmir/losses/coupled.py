"""Y-Net's coupled loss: a weighted sum of the classification and segmentation losses."""

import math

import keras
from keras import ops

MODES = ("fixed", "learnable", "sum")


def coupled_loss(class_loss, segmentation_loss, weight):
    """The coupled loss of Y-Net (Fang et al., 2021, eq. 2).

        loss = weight * class_loss + (1 - weight) * segmentation_loss

    The paper's comparison, the plain sum class_loss + segmentation_loss, is twice this
    loss at weight 0.5 (`LossWeight(mode="sum")`).

    Args:
        class_loss: The classification loss L_class (the circle loss), any shape.
        segmentation_loss: The segmentation loss L_seg (pixel-wise cross-entropy),
            broadcastable to `class_loss`.
        weight: omega, a number in [0, 1] or a tensor.

    Returns:
        The combined loss, of the broadcast shape of the two losses.

    Example:

    >>> float(coupled_loss(2.0, 4.0, 0.25))  # 0.25 * 2 + 0.75 * 4
    3.5

    Reference:
        Fang et al., "Combating Ambiguity for Hash-code Learning in Medical Instance
        Retrieval", IEEE JBHI 2021, Sec. III-E, eq. 2.
    """
    if isinstance(weight, (int, float)) and not 0 <= weight <= 1:
        raise ValueError(f"weight must be in [0, 1]. Received: weight={weight!r}")
    return weight * class_loss + (1 - weight) * segmentation_loss


@keras.saving.register_keras_serializable(package="tfmir")
class LossWeight(keras.layers.Layer):
    """Holds Y-Net's loss weight omega and combines the two losses with it.

    Called as `loss_weight(class_loss, segmentation_loss)` on tensors:

    - "fixed": omega * L_class + (1 - omega) * L_seg with omega = `initial` (0.5 by default,
      the paper's value). The default, and what the paper's numbers can be compared with.
    - "learnable": the same with omega = sigmoid(theta), theta a trainable weight that starts
      at logit(`initial`), so omega stays in (0, 1); held by a model (a task), theta is
      one of its trainable variables and moves with its optimizer. The paper says only that omega is
      "initially set as 0.5", not how it is learned. Note what plain gradient descent does
      with it: d loss / d omega = L_class - L_seg, so omega moves weight onto whichever loss
      is smaller and, unchecked, runs toward 0 or 1 — the opposite of balancing the two.
    - "sum": the plain L_class + L_seg the paper compares against. Both losses carry weight
      1, and `weight` reports 1.0; `initial` is not used.

    Args:
        mode: One of `MODES`.
        initial: omega of "fixed", the initial omega of "learnable", in (0, 1).
        **kwargs: `keras.layers.Layer` arguments such as `name`. The dtype defaults to
            float32, so losses are combined in float32 under mixed precision.

    Example:

    >>> class_loss, segmentation_loss = ops.convert_to_tensor(2.0), ops.convert_to_tensor(4.0)
    >>> float(LossWeight()(class_loss, segmentation_loss))  # 0.5 * 2 + 0.5 * 4
    3.0

    Reference:
        Fang et al., "Combating Ambiguity for Hash-code Learning in Medical Instance
        Retrieval", IEEE JBHI 2021, Sec. III-E (eq. 2) and Sec. IV-B.
    """

    def __init__(self, mode="fixed", initial=0.5, **kwargs):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}. Received: mode={mode!r}")
        if not 0 < initial < 1:
            raise ValueError(f"initial must be in (0, 1). Received: initial={initial!r}")
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.mode = mode
        self.initial = initial
        if mode == "learnable":
            self.theta = self.add_weight(
                shape=(),
                initializer=keras.initializers.Constant(math.log(initial / (1 - initial))),
                trainable=True,
                name="theta",
            )
        self.built = True

    @property
    def weight(self):
        """The current omega, a float32 scalar tensor; 1.0 in "sum" mode."""
        if self.mode == "learnable":
            return ops.sigmoid(self.theta)
        return ops.convert_to_tensor(1.0 if self.mode == "sum" else self.initial, "float32")

    def call(self, class_loss, segmentation_loss):
        if self.mode == "sum":
            return class_loss + segmentation_loss
        return coupled_loss(class_loss, segmentation_loss, self.weight)

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode, initial=self.initial)
        return config
