"""U-Net, RU-Net and R2U-Net segmenters (Alom et al. 2018), as used by paper 003 (Sec. 3.4)."""

from __future__ import annotations

import keras

VARIANTS = ("unet", "runet", "r2unet")

PRESETS = {
    # image_size: the input side S; depth: the number of 2 x 2 poolings (S must be a multiple of
    # 2 ** depth); base_width: channels at full resolution, doubled at every level.
    # tiny: 8, 16, 32 channels, an 8 x 8 bottom; shallow because tracing a training step costs
    # time per layer, and every task test traces one.
    "tiny": {"image_size": 32, "depth": 2, "base_width": 8},
    "cpu": {"image_size": 128, "depth": 4, "base_width": 8},  # 8..128 channels, 8 x 8 bottom
    # Alom et al.'s skin-lesion setting (Sec. IV): 256 x 256 inputs, feature maps
    # 16 -> 32 -> 64 -> 128 -> 256 down and back up, t = 2.
    "paper": {"image_size": 256, "depth": 4, "base_width": 16},
}

# He initialisation for ReLU networks, as U-Net's authors advise (Ronneberger et al., Sec. 3).
_INITIALIZER = "he_normal"


@keras.saving.register_keras_serializable(package="tfmir")
class R2UNet(keras.Model):
    """A U-shaped segmenter: pixels (B, S, S, 3) in [0, 255] -> probabilities (B, S, S, 1).

    The encoder has `depth` levels, each a convolutional unit followed by 2 x 2 max pooling; a
    unit at the bottom; the decoder, level by level, a 2 x 2 transposed convolution (stride 2)
    to the level's width, concatenated with the encoder's features of that level, and a unit.
    Level l has `base_width * 2 ** l` channels. A 1 x 1 convolution and a sigmoid give one
    probability per pixel, in float32 under any mixed-precision policy. The model rescales the
    pixels to [0, 1] itself. The `variant` picks the unit:

    - "unet": two 3 x 3 convolutions, each with batch norm and ReLU (Ronneberger et al.).
    - "runet": a 1 x 1 convolution to the unit's width, then two recurrent convolutional layers
      (RCL). One RCL with t recurrences: f = W_f * x, h_0 = ReLU(BN_0(f)) and
      h_k = ReLU(BN_k(f + W_r * h_{k-1})) for k = 1..t; the output is h_t. W_r is one
      convolution applied t times (shared weights), so t adds depth but no convolution weights
      (Alom et al. Sec. III, Fig. 3-4).
    - "r2unet": the RU-Net unit with a residual connection: the 1 x 1 convolution's output x plus
      the two RCLs' output, x + RCL(RCL(x)) (Alom et al. Fig. 4(d)).

    RU-Net and R2U-Net units hold the same weights: the residual addition has none. The batch
    norms (one per step, whose offset replaces the convolutions' bias) are not in Alom et al.'s
    equations; without them the unrolled sums grow from unit to unit, and an untrained tiny
    R2U-Net's sigmoid saturates at exactly 0 and 1. Until training has set the batch norms'
    moving statistics, inference (training=False) still runs those raw sums: an untrained
    RU-Net or R2U-Net predicts masks of 0s and 1s.

    The network is fully convolutional. With an integer `image_size` the input is
    (image_size, image_size, 3); with `image_size=None` it is (None, None, 3), so the same
    weights (`set_weights` from a model of the same settings) run on whole images whose sides
    are multiples of 2 ** depth, or patch by patch through `tfmir.models.tiling.segment_tiled`.

    Args:
        variant: one of `VARIANTS`.
        image_size: the input side S, a multiple of 2 ** depth, or None for any side.
        depth: the number of poolings (encoder levels below the bottom), >= 1.
        base_width: channels of the first level, >= 1.
        recurrences: t, the recurrences of each RCL (RU-Net and R2U-Net; Alom et al. use 2).
        **kwargs: `keras.Model` arguments such as `name`.

    Example:

    ```python
    segmenter = R2UNet.from_preset("tiny")  # R2U-Net at 32 x 32
    masks = segmenter(np.zeros((2, 32, 32, 3)))  # (2, 32, 32, 1) probabilities
    unet = R2UNet.from_preset("tiny", variant="unet")
    ```

    Reference:
        Alom, Hasan, Yakopcic, Taha, Asari, "Recurrent Residual Convolutional Neural Network
        based on U-Net (R2U-Net) for Medical Image Segmentation", 2018,
        https://arxiv.org/abs/1802.06955, Sec. III and Fig. 3-4; Ronneberger, Fischer, Brox,
        "U-Net: Convolutional Networks for Biomedical Image Segmentation", MICCAI 2015,
        https://arxiv.org/abs/1505.04597.
    """

    def __init__(self, variant: str = "r2unet", image_size: int | None = 256, depth: int = 4,
                 base_width: int = 16, recurrences: int = 2, **kwargs):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}. Received: variant={variant!r}")
        for name, value in (("depth", depth), ("base_width", base_width),
                            ("recurrences", recurrences)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")
        divisor = 2 ** depth
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(
                image_size, int) or image_size < divisor or image_size % divisor):
            raise ValueError(
                f"image_size must be a multiple of 2 ** depth = {divisor} ({divisor}, "
                f"{2 * divisor}, {3 * divisor}, ...: every pooling halves it exactly) or None. "
                f"Received: image_size={image_size!r} with depth={depth}")

        # === Functional Model ===
        images = keras.Input((image_size, image_size, 3), name="images")
        x = keras.layers.Rescaling(1.0 / 255.0, name="rescale")(images)
        skips = []
        for level in range(depth):
            x = _unit(x, variant, base_width * 2 ** level, recurrences, f"encoder{level}")
            skips.append(x)
            x = keras.layers.MaxPooling2D(2, name=f"pool{level}")(x)
        x = _unit(x, variant, base_width * 2 ** depth, recurrences, "bottom")
        for level in reversed(range(depth)):
            width = base_width * 2 ** level
            x = keras.layers.Conv2DTranspose(width, 2, strides=2, kernel_initializer=_INITIALIZER,
                                             name=f"up{level}")(x)
            x = keras.layers.Concatenate(name=f"concat{level}")([skips[level], x])
            x = _unit(x, variant, width, recurrences, f"decoder{level}")
        logits = keras.layers.Conv2D(1, 1, name="logit")(x)
        masks = keras.layers.Activation("sigmoid", dtype="float32", name="mask")(logits)
        kwargs.setdefault("name", variant)
        super().__init__(inputs=images, outputs=masks, **kwargs)

        self.variant = variant
        self.image_size = image_size
        self.depth = depth
        self.base_width = base_width
        self.recurrences = recurrences

    @property
    def size_divisor(self) -> int:
        """Every input side must be a multiple of this (2 ** depth)."""
        return 2 ** self.depth

    @classmethod
    def from_preset(cls, preset: str, **kwargs) -> "R2UNet":
        """A segmenter of a named size (`PRESETS`: "tiny", "cpu", "paper"); kwargs override it.

        Example:

        ```python
        R2UNet.from_preset("paper", variant="runet", image_size=384)
        ```
        """
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}. Received: {preset!r}")
        return cls(**{**PRESETS[preset], **kwargs})

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "variant": self.variant,
            "image_size": self.image_size,
            "depth": self.depth,
            "base_width": self.base_width,
            "recurrences": self.recurrences,
        }

    @classmethod
    def from_config(cls, config: dict) -> "R2UNet":
        return cls(**config)


def _conv(width, kernel_size, name, use_bias=False):
    # Without a bias by default: a batch norm follows, and its offset is the bias.
    return keras.layers.Conv2D(width, kernel_size, padding="same", use_bias=use_bias,
                               kernel_initializer=_INITIALIZER, name=name)


def _normalized_relu(x, name):
    # Momentum 0.9 (PyTorch's default, which common R2U-Net code trains with) rather than Keras'
    # 0.99: until the moving statistics have caught up, inference runs the unnormalised sums,
    # and short CPU trainings are only a few hundred steps.
    x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _recurrent_conv(x, width, recurrences, name):
    """One RCL: h_0 = ReLU(BN_0(W_f x)), h_k = ReLU(BN_k(W_f x + W_r h_{k-1})), k = 1..t."""
    forward = _conv(width, 3, f"{name}_forward")(x)
    # One layer called t times: the recurrence shares W_r across steps. Each step has its own
    # batch norm: the sums of successive steps have different statistics.
    recurrent = _conv(width, 3, f"{name}_recurrent")
    state = _normalized_relu(forward, f"{name}_step0")
    for step in range(1, recurrences + 1):
        total = keras.layers.Add(name=f"{name}_add{step}")([forward, recurrent(state)])
        state = _normalized_relu(total, f"{name}_step{step}")
    return state


def _unit(x, variant, width, recurrences, name):
    if variant == "unet":
        x = _normalized_relu(_conv(width, 3, f"{name}_conv1")(x), f"{name}_conv1")
        return _normalized_relu(_conv(width, 3, f"{name}_conv2")(x), f"{name}_conv2")
    # The 1 x 1 convolution gives the residual the unit's width (Alom et al. Fig. 4(d)).
    x = _conv(width, 1, f"{name}_project", use_bias=True)(x)
    y = _recurrent_conv(x, width, recurrences, f"{name}_rcl1")
    y = _recurrent_conv(y, width, recurrences, f"{name}_rcl2")
    if variant == "runet":
        return y
    return keras.layers.Add(name=f"{name}_residual")([x, y])
