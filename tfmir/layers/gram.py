"""Gram matrix of a feature map, the texture ("style") descriptor of paper 003.

Paper 003 (Sec. 2.3) takes the feature map of each of 7 EfficientNet-B6 blocks, and "the 3D
feature map matrix is flattened along the 1st and 2nd axis and then multiplied with its
transpose": G = F^T F with F the (H W, C) matrix of the map, no normalisation stated. Its
style loss (eq. 6) is then sum_l sum_ij (beta G^x_ij - beta G^y_ij)^2 with a weight beta
per layer.

Here G is divided by the number of positions H W by default, so that a Gram matrix is the
mean of the outer products f f^T over the map and does not grow with the image size; its
entries are then on the scale of products of activations, whatever the resolution.
`normalize="none"` gives the plain F^T F. Gatys et al. keep F^T F unnormalised too and put
the sizes into their style loss instead: E_l = 1 / (4 N_l^2 M_l^2) sum_ij (G_ij - A_ij)^2
with N_l channels and M_l positions, which is (1/4N_l^2) times the squared difference of
the position-normalised Gram matrices used here.
"""

import keras
from keras import ops

NORMALIZATIONS = ("positions", "none")


def _check_normalize(normalize):
    if normalize not in NORMALIZATIONS:
        raise ValueError(
            f"normalize must be one of {NORMALIZATIONS}. Received: normalize={normalize!r}"
        )


def gram_matrix(features, normalize="positions"):
    """Gram matrix of every channels-last feature map, (B, H, W, C) -> (B, C, C), in float32.

    G_ij = (1 / (H W)) sum over the H x W positions of F_i F_j, F_i the activation of
    channel i at a position (`normalize="positions"`), or the plain sum (`"none"`). G is
    symmetric and positive semi-definite. The features are cast to float32 first, because
    the sums of products of large activations overflow float16.

    Args:
        features: Feature maps of shape (B, H, W, C), any float dtype; H and W may be
            unknown until run time.
        normalize: `"positions"` to divide by H W, `"none"` for F^T F.

    Returns:
        float32 tensor of shape (B, C, C).

    Example:

    >>> # One 1 x 2 map with 2 channels, positions (1, 2) and (3, 4): the mean of
    >>> # [[1, 2], [2, 4]] and [[9, 12], [12, 16]].
    >>> gram_matrix([[[[1.0, 2.0], [3.0, 4.0]]]]).numpy().tolist()
    [[[5.0, 7.0], [7.0, 10.0]]]

    Reference:
        Gatys, Ecker, Bethge, "Image Style Transfer Using Convolutional Neural Networks",
        CVPR 2016, eqs. 3-4; paper 003 (melanoma CBIR with style transfer), Sec. 2.3.
    """
    _check_normalize(normalize)
    features = ops.cast(features, "float32")
    if len(features.shape) != 4:
        raise ValueError(
            "features must have rank 4 (batch, height, width, channels). "
            f"Received: features.shape={tuple(features.shape)}"
        )
    gram = ops.einsum("bhwi,bhwj->bij", features, features)
    if normalize == "positions":
        shape = ops.shape(features)
        gram = gram / ops.cast(shape[1] * shape[2], "float32")
    return gram


@keras.saving.register_keras_serializable(package="tfmir")
class GramMatrix(keras.layers.Layer):
    """Gram matrices of channels-last feature maps: (B, H, W, C) -> float32 (B, C, C).

    See `gram_matrix` for the formula. The layer has no weights. Under a mixed-precision
    policy (`"mixed_bfloat16"`, `"mixed_float16"`) its inputs are converted to float32
    rather than to the compute dtype, and the output stays float32: the Gram matrices are
    descriptors compared across a whole archive, and their sums overflow float16.

    Args:
        normalize: `"positions"` (default) divides by the H x W positions, so the matrix
            does not grow with the image size; `"none"` is the F^T F of paper 003.
        **kwargs: `keras.layers.Layer` arguments such as `name` and `dtype`.

    Example:

    ```python
    grams = GramMatrix()(keras.random.uniform((2, 12, 12, 32)))  # (2, 32, 32)
    ```

    Reference:
        Gatys, Ecker, Bethge, "Image Style Transfer Using Convolutional Neural Networks",
        CVPR 2016, eqs. 3-4; paper 003 (melanoma CBIR with style transfer), Sec. 2.3, eq. 6.
    """

    def __init__(self, normalize="positions", **kwargs):
        super().__init__(**kwargs)
        _check_normalize(normalize)
        self.normalize = normalize

    @property
    def input_dtype(self):
        # Keras casts inputs to this dtype before `call`; the compute dtype would round
        # them to bfloat16 or float16 first.
        return "float32"

    def call(self, inputs):
        return gram_matrix(inputs, normalize=self.normalize)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1], input_shape[-1])

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype="float32")

    def get_config(self):
        config = super().get_config()
        config.update(normalize=self.normalize)
        return config
