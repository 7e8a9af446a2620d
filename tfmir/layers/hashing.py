"""Y-Net's hash-code aggregation: a fixed random convolution of the core node, then tanh."""

from __future__ import annotations

import numbers

import keras
import numpy as np
from keras import ops


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")


def hash_shape(height: int, width: int,
               num_bits: int) -> tuple[int, int, int, tuple[int, int]]:
    """The c x h x w block that `HashProjection` makes from an H x W map, and its kernel.

    - If H * W divides num_bits: a 1 x 1 convolution to c = num_bits / (H W) channels, so the
      code keeps the whole map (h, w = H, W).
    - Otherwise the largest square h x h, h <= min(H, W), with h^2 dividing num_bits: a valid
      convolution with an (H - h + 1) x (W - h + 1) kernel to c = num_bits / h^2 channels. On a
      non-square map the kernel is non-square, so the output is still square.

    h = 1 always qualifies (a kernel over the whole map to num_bits channels, the paper's
    "128 x 1 x 1"), so every positive num_bits has a shape.

    Args:
        height: H, rows of the feature map.
        width: W, columns of the feature map.
        num_bits: the code length k = c * h * w.

    Returns:
        `(h, w, c, (kernel_height, kernel_width))`.

    Raises:
        ValueError: a size or num_bits that is not a positive integer.

    Example:

    ```python
    hash_shape(8, 8, 64)   # (8, 8, 1, (1, 1)): the paper's 1 x 8 x 8
    hash_shape(8, 8, 36)   # (6, 6, 1, (3, 3))
    hash_shape(4, 4, 36)   # (3, 3, 4, (2, 2))
    ```

    Reference:
        Fang et al., "Combating Ambiguity for Hash-code Learning in Medical Instance Retrieval",
        Sec. III-B (test stage), https://arxiv.org/abs/2105.08872
    """
    _check_positive_int("height", height)
    _check_positive_int("width", width)
    _check_positive_int("num_bits", num_bits)
    if num_bits % (height * width) == 0:
        return height, width, num_bits // (height * width), (1, 1)
    side = max(h for h in range(1, min(height, width) + 1) if num_bits % (h * h) == 0)
    return side, side, num_bits // (side * side), (height - side + 1, width - side + 1)


@keras.saving.register_keras_serializable(package="tfmir")
class HashProjection(keras.layers.Layer):
    """A fixed, seeded convolution of a (B, H, W, C) map to (B, num_bits) values in (-1, 1).

    Y-Net's test-stage aggregation: the core node's C x H x W feature map is convolved, "without
    any weighting strategy", into a c x h x w block of num_bits values (shape from `hash_shape`),
    which is flattened and passed through tanh; `sign` of the result is the binary hash code.
    The flatten is row-major over (h, w, c): value i * w * c + j * c + k is position (i, j),
    output channel k.

    The kernel, shape (kernel_height, kernel_width, C, c), is drawn at build time from
    N(0, 1 / fan_in), fan_in = kernel_height * kernel_width * C, with NumPy's
    `default_rng(seed)`: the same seed gives the same kernel on every machine, whatever Keras'
    global seed. It is a non-trainable weight (so it is saved with the model and never
    trained). No bias.

    Args:
        num_bits: the code length k (the paper: 36, 64, 128 or 256).
        seed: seed of the kernel, a non-negative integer.
        **kwargs: `keras.layers.Layer` arguments such as `name` and `dtype`.

    Example:

    ```python
    codes = HashProjection(64)(keras.random.uniform((2, 8, 8, 256)))  # (2, 64) in (-1, 1)
    binary = keras.ops.sign(codes)
    ```

    Reference:
        Fang et al., "Combating Ambiguity for Hash-code Learning in Medical Instance Retrieval",
        Sec. III-B (test stage), https://arxiv.org/abs/2105.08872
    """

    def __init__(self, num_bits: int, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        _check_positive_int("num_bits", num_bits)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer. Received: seed={seed!r}")
        # Plain Python ints, so that NumPy scalars still give a JSON config.
        self.num_bits = int(num_bits)
        self.seed = int(seed)

    def build(self, input_shape):
        if len(input_shape) != 4 or None in tuple(input_shape[1:]):
            raise ValueError("HashProjection needs a (batch, height, width, channels) feature map "
                             "with known height, width and channels. Received: "
                             f"input_shape={tuple(input_shape)}")
        height, width, channels = (int(size) for size in input_shape[1:])
        _, _, out_channels, (kernel_height, kernel_width) = hash_shape(height, width,
                                                                       self.num_bits)
        fan_in = kernel_height * kernel_width * channels
        rng = np.random.default_rng(self.seed)
        kernel = rng.normal(0.0, np.sqrt(1.0 / fan_in),
                            size=(kernel_height, kernel_width, channels, out_channels))
        self.kernel = self.add_weight(shape=kernel.shape, initializer="zeros", trainable=False,
                                      name="kernel")
        self.kernel.assign(kernel.astype(self.kernel.dtype))

    def call(self, inputs):
        block = ops.conv(inputs, ops.cast(self.kernel, inputs.dtype), padding="valid")
        return ops.tanh(ops.reshape(block, (-1, self.num_bits)))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_bits)

    def get_config(self):
        config = super().get_config()
        config.update(num_bits=self.num_bits, seed=self.seed)
        return config
