"""Y-Net (paper 002): a residual main branch, an R-MAC classification branch and an FPN mask branch."""

from __future__ import annotations

import keras

from tfmir.layers import RMAC, CosineClassifier, HashProjection, hash_shape
from tfmir.models.backbones import _batch_norm, _residual_block
from tfmir.models.outputs import CODE, MASK

BRANCHES = ("both", "rmac", "fpn", "none")
# The core node is the input downsampled 32 times (256 -> 8); R-MAC's third level needs a 3 x 3
# grid of regions on it, so at least 3 cells per side.
DOWNSAMPLING = 32
MIN_CORE_SIZE = 3

PRESETS = {
    # (image_size, main-branch widths b1, b2, b3, core; R-MAC channels; FPN channels)
    "tiny": {"image_size": 96, "widths": (8, 8, 16, 16), "rmac_channels": 16, "fpn_channels": 8},
    "cpu": {"image_size": 128, "widths": (32, 64, 128, 256), "rmac_channels": 512,
            "fpn_channels": 32},
    "paper": {"image_size": 256, "widths": (32, 64, 128, 256), "rmac_channels": 512,
              "fpn_channels": 32},
}


@keras.saving.register_keras_serializable(package="tfmir")
class YNet(keras.Model):
    """Y-Net: main branch -> core node, R-MAC branch (class scores), FPN branch (mask logits).

    Input: float pixels in [0, 255], (B, S, S, 3). The main branch is a stem (3 x 3 convolution,
    stride 2, and 3 x 3 max pooling, stride 2, as in ResNet) and four residual blocks: b1 at S/4,
    b2 at S/8, b3 at S/16 and the core node at S/32 (for S = 256: 32 x 64², 64 x 32², 128 x 16²
    and 256 x 8², the paper's sizes). Training outputs (a dict):

    - "class_scores" (B, num_classes), from the R-MAC branch: a 3 x 3 convolution to
      `rmac_channels` + batch norm on the core node, R-MAC over 3 levels (14 regions on 8 x 8;
      `tfmir.layers.RMAC`, L2-normalised) and a cosine class layer (`CosineClassifier`): cosines
      in [-1, 1], what circle loss takes.
    - "mask_logits" (B, S, S, 1), from the FPN branch: a 1 x 1 convolution of the core node to
      `fpn_channels`, upsampled x2 (bilinear) and added to b3's 1 x 1 lateral = t3; t3 up x2 + b2's
      lateral = t2; t2 up x2 + b1 (already `fpn_channels` wide in the paper, else a lateral too)
      = t1; then a 3 x 3 convolution + ReLU, a 1 x 1 convolution to one logit and a bilinear
      resize to S x S.

    `branches` crops them for the paper's ablations (Table III): "rmac" drops the FPN branch
    ("w/o FPN"), "fpn" drops the R-MAC branch ("w/o R-MAC"), "none" drops both and, so that
    something still trains the main branch, classifies globally average-pooled core features
    with the same cosine class layer (what "w/o FPN and R-MAC" trains is not said in the paper;
    this is the plain residual classifier it reduces to).

    The deployable model (`deployable_model(num_bits)`) maps the same pixels to {"code": (B, k)
    tanh values whose signs are the hash bits, "mask": (B, S, S, 1) foreground probabilities
    (without the FPN branch: no "mask")}: the core node through a fixed, seeded, never-trained
    convolution (`tfmir.layers.HashProjection`, the paper's aggregation "without any weighting
    strategy"), so one trained Y-Net gives codes of every length.

    Args:
        num_classes: classes of the R-MAC branch's class layer.
        image_size: the input side S, a multiple of 32 with a core node of at least 3 x 3
            (S >= 96).
        widths: channels of b1, b2, b3 and the core node.
        rmac_channels: channels of the R-MAC branch's convolution (512 in the paper).
        fpn_channels: channels of the FPN laterals and top-down blocks (32 in the paper).
        branches: one of `BRANCHES`.
        **kwargs: `keras.Model` arguments such as `name`.

    Example:

    ```python
    ynet = YNet.from_preset("tiny", num_classes=3)
    outputs = ynet(np.zeros((2, 96, 96, 3)))  # {"class_scores": (2, 3), "mask_logits": (2, 96, 96, 1)}
    hasher = ynet.deployable_model(num_bits=64)  # {"code": (2, 64), "mask": (2, 96, 96, 1)}
    ```

    Reference:
        Fang, Fu, Zeng, Yan, Yan, Liu, "Combating Ambiguity for Hash-code Learning in Medical
        Instance Retrieval", IEEE Journal of Biomedical and Health Informatics, 2021, Sec. III and
        Fig. 2.
    """

    def __init__(self, num_classes: int, image_size: int = 256, widths=(32, 64, 128, 256),
                 rmac_channels: int = 512, fpn_channels: int = 32, branches: str = "both",
                 **kwargs):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer of at least 2. "
                             f"Received: num_classes={num_classes!r}")
        if branches not in BRANCHES:
            raise ValueError(f"branches must be one of {BRANCHES}. Received: branches={branches!r}")
        widths = tuple(int(width) for width in widths)
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError("widths must give 4 positive channel counts (b1, b2, b3, core). "
                             f"Received: widths={widths!r}")
        if (isinstance(image_size, bool) or not isinstance(image_size, int)
                or image_size % DOWNSAMPLING or image_size // DOWNSAMPLING < MIN_CORE_SIZE):
            raise ValueError(
                f"image_size must be a multiple of {DOWNSAMPLING} of at least "
                f"{DOWNSAMPLING * MIN_CORE_SIZE}: the core node is the input / {DOWNSAMPLING} and "
                f"R-MAC's 3 levels need a core of at least {MIN_CORE_SIZE} x {MIN_CORE_SIZE}. "
                f"Received: image_size={image_size!r}")

        # === Functional Model ===
        images = keras.Input((image_size, image_size, 3), name="images")
        x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(images)
        x = keras.layers.Conv2D(widths[0], 3, strides=2, padding="same", use_bias=False,
                                name="stem_conv")(x)
        x = _batch_norm("stem_bn")(x)
        x = keras.layers.ReLU(name="stem_relu")(x)
        x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
        b1 = _residual_block(x, widths[0], stride=1, name="b1")
        b2 = _residual_block(b1, widths[1], stride=2, name="b2")
        b3 = _residual_block(b2, widths[2], stride=2, name="b3")
        core = _residual_block(b3, widths[3], stride=2, name="core")

        outputs = {}
        if branches in ("both", "rmac"):
            y = keras.layers.Conv2D(rmac_channels, 3, padding="same", name="rmac_conv")(core)
            y = _batch_norm("rmac_bn")(y)
            descriptor = RMAC(levels=3, dtype="float32", name="rmac")(y)
        elif branches == "none":
            pooled = keras.layers.GlobalAveragePooling2D(name="pool")(core)
            descriptor = keras.layers.UnitNormalization(dtype="float32", name="l2")(pooled)
        if branches != "fpn":
            outputs["class_scores"] = CosineClassifier(num_classes, dtype="float32",
                                                       name="classifier")(descriptor)
        if branches in ("both", "fpn"):
            def lateral(tensor, name):
                if tensor.shape[-1] == fpn_channels:
                    return tensor
                return keras.layers.Conv2D(fpn_channels, 1, name=name)(tensor)

            def up(tensor, name):
                return keras.layers.UpSampling2D(2, interpolation="bilinear", name=name)(tensor)

            top = keras.layers.Conv2D(fpn_channels, 1, name="fpn_core")(core)
            t3 = keras.layers.Add(name="t3")([up(top, "fpn_up_core"), lateral(b3, "fpn_lateral3")])
            t2 = keras.layers.Add(name="t2")([up(t3, "fpn_up3"), lateral(b2, "fpn_lateral2")])
            t1 = keras.layers.Add(name="t1")([up(t2, "fpn_up2"), lateral(b1, "fpn_lateral1")])
            y = keras.layers.Conv2D(fpn_channels, 3, padding="same", activation="relu",
                                    name="mask_conv")(t1)
            y = keras.layers.Conv2D(1, 1, name="mask_logit")(y)
            outputs["mask_logits"] = keras.layers.Resizing(
                image_size, image_size, interpolation="bilinear", dtype="float32",
                name="mask_resize")(y)
        kwargs.setdefault("name", "ynet")
        super().__init__(inputs=images, outputs=outputs, **kwargs)

        self.num_classes = num_classes
        self.image_size = image_size
        self.widths = widths
        self.rmac_channels = int(rmac_channels)
        self.fpn_channels = int(fpn_channels)
        self.branches = branches
        self._core = core
        self._mask_logits = outputs.get("mask_logits")

    @property
    def has_mask(self) -> bool:
        return self.branches in ("both", "fpn")

    @property
    def core_size(self) -> int:
        return self.image_size // DOWNSAMPLING

    def deployable_model(self, num_bits: int = 64, seed: int = 0) -> keras.Model:
        """The retrieval model: pixels -> {"code": (B, num_bits) tanh values[, "mask"]}.

        It shares this Y-Net's layers (the main branch and, with an FPN branch, the mask head;
        training the Y-Net changes its outputs) and adds the hash projection of the core node: a
        fixed convolution with weights drawn from `seed`, so equal seeds give equal codes.

        Args:
            num_bits: the code length k (the paper: 36, 64, 128 or 256).
            seed: the seed of the projection's weights.

        Raises:
            ValueError: a code length the projection cannot make from the core node's size
                (`tfmir.layers.hash_shape`).
        """
        hash_shape(self.core_size, self.core_size, num_bits)  # a clear error before building
        # Built on this model's own graph (not nested copies of it), so the deployable model
        # holds each shared layer once and saves and loads like any functional model.
        codes = HashProjection(num_bits, seed=seed, dtype="float32", name="hash")(self._core)
        outputs = {CODE: codes}
        if self.has_mask:
            outputs[MASK] = keras.layers.Activation("sigmoid", dtype="float32", name="mask")(
                self._mask_logits)
        model = keras.Model(self.inputs[0], outputs, name=f"ynet_hash{num_bits}")
        model.image_size = self.image_size
        return model

    @classmethod
    def from_preset(cls, preset: str, num_classes: int, **kwargs) -> "YNet":
        """A Y-Net of a named size: "tiny" (96 px, narrow, tests), "cpu" (128 px) or "paper"."""
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}. Received: {preset!r}")
        return cls(num_classes=num_classes, **{**PRESETS[preset], **kwargs})

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "widths": list(self.widths),
            "rmac_channels": self.rmac_channels,
            "fpn_channels": self.fpn_channels,
            "branches": self.branches,
        }

    @classmethod
    def from_config(cls, config: dict) -> "YNet":
        return cls(**config)
