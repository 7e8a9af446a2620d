"""The class layer of Y-Net's R-MAC branch: cosine similarities to learned class centres."""

from __future__ import annotations

import numbers

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfmir")
class CosineClassifier(keras.layers.Layer):
    """(B, D) descriptors -> (B, num_classes) cosine similarities in [-1, 1].

    A bias-free linear layer whose inputs and kernel columns (one per class) are both
    L2-normalised, so each output is the cosine between a descriptor and a class proxy: the
    similarity scores a circle loss (or a scaled softmax) expects. The kernel (D, num_classes)
    is trainable, Glorot-uniform initialised.

    Args:
        num_classes: number of classes.
        **kwargs: `keras.layers.Layer` arguments such as `name` and `dtype`.

    Example:

    ```python
    cosines = CosineClassifier(5)(keras.random.normal((2, 512)))  # (2, 5), in [-1, 1]
    ```

    Reference:
        Fang et al., "Combating Ambiguity for Hash-code Learning in Medical Instance Retrieval",
        Sec. III-C (the L2-normalised R-MAC vector feeds a class layer trained with circle loss),
        https://arxiv.org/abs/2105.08872; Sun et al., "Circle Loss: A Unified Perspective of Pair
        Similarity Optimization", CVPR 2020, https://arxiv.org/abs/2002.10857
    """

    def __init__(self, num_classes: int, **kwargs):
        super().__init__(**kwargs)
        if (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
                or num_classes < 1):
            raise ValueError("num_classes must be a positive integer. Received: "
                             f"num_classes={num_classes!r}")
        self.num_classes = int(num_classes)

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1], self.num_classes),
                                      initializer="glorot_uniform", name="kernel")

    def call(self, inputs):
        centres = ops.normalize(ops.cast(self.kernel, inputs.dtype), axis=0)
        return ops.matmul(ops.normalize(inputs, axis=-1), centres)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes)
        return config
