"""One member of paper 003's classification ensemble: a backbone CNN with a sigmoid head."""

from __future__ import annotations

import keras

from tfmir.models import backbones
from tfmir.models.outputs import EMBEDDING, PROBABILITY


@keras.saving.register_keras_serializable(package="tfmir")
class EnsembleMember(keras.Model):
    """A binary classifier: backbone -> global average pooling -> Dense(1, sigmoid).

    Input: float pixels in [0, 255], shape (batch, image_size, image_size, 3), RGB. Outputs a dict:
    `"embedding"`, the backbone's pooled (B, D) vector (2304-d for EfficientNet-B6), and
    `"probability"`, the (B, 1) probability of the positive class (melanoma in paper 003), both
    float32. The backbone's stage feature maps (`stage_maps`) are what `StyleEnsemble` turns into
    Gram matrices.

    Args:
        backbone: one of `tfmir.models.backbones.BACKBONES` ("efficientnet_b6" in the paper).
        image_size: height and width of the square input (384 in the paper).
        weights: None, "imagenet" or a path to backbone weights.
        backbone_widths: stage widths for "small_resnet"; None otherwise.
        freeze_batch_norm: keep the backbone's batch-norm layers in inference mode with their
            pretrained statistics (fine-tuning on small batches).
        **kwargs: `keras.Model` arguments such as `name`.

    Example:

    ```python
    member = EnsembleMember.from_preset("tiny")
    member(np.zeros((2, 32, 32, 3)))["probability"].shape  # (2, 1)
    ```

    Reference:
        Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data using
        Style Transfer, Semantic Image Segmentation and Ensemble Learning", 2021,
        https://arxiv.org/abs/2110.06331, Sec. 3.3.
    """

    def __init__(self, backbone: str = "efficientnet_b6", image_size: int = 384,
                 weights: str | None = None, backbone_widths=None,
                 freeze_batch_norm: bool = False, **kwargs):
        if int(image_size) < 16:
            raise ValueError(f"image_size must be at least 16. Received: image_size={image_size!r}")
        backbone_model = backbones.build_backbone(backbone, int(image_size), weights=weights,
                                                  widths=backbone_widths)
        if freeze_batch_norm:
            backbones.freeze_batch_norm(backbone_model)

        # === Functional Model ===
        images = keras.Input((image_size, image_size, 3), name="images")
        pooled = backbone_model(images)
        probability = keras.layers.Dense(1, activation="sigmoid", dtype="float32",
                                         name=PROBABILITY)(pooled)
        embedding = keras.layers.Activation("linear", dtype="float32", name=EMBEDDING)(pooled)
        kwargs.setdefault("name", "ensemble_member")
        super().__init__(inputs=images, outputs={EMBEDDING: embedding, PROBABILITY: probability},
                         **kwargs)

        self.backbone = backbone
        self.image_size = int(image_size)
        self.weights_source = weights
        self.backbone_widths = tuple(backbone_widths) if backbone_widths else None
        self.freeze_batch_norm = bool(freeze_batch_norm)
        self.backbone_model = backbone_model

    @property
    def style_stages(self) -> list[str]:
        """The stages whose Gram matrices describe style: every stage but the 1x1 "top"."""
        return [stage for stage in self.backbone_model.stage_outputs if stage != "top"]

    def stage_maps(self, name: str | None = None) -> keras.Model:
        """A model (sharing this member's layers) from pixels to `[*stage maps, pooled vector]`."""
        return keras.Model(self.backbone_model.inputs,
                           [*(self.backbone_model.stage_outputs[stage]
                              for stage in self.style_stages),
                            self.backbone_model.pooled_output],
                           name=name or f"{self.name}_stages")

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "backbone": self.backbone,
            "image_size": self.image_size,
            "weights": None,  # a restored model gets its weights from the file
            "backbone_widths": list(self.backbone_widths) if self.backbone_widths else None,
            "freeze_batch_norm": self.freeze_batch_norm,
        }

    @classmethod
    def from_config(cls, config: dict) -> "EnsembleMember":
        return cls(**config)

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "EnsembleMember":
        """The member of the `melanoma_member` config on a setting ("tiny", "cpu", "paper")."""
        from tfmir.configs import get_config  # configs name models; models don't need configs

        model = dict(get_config(f"melanoma_member:{preset}").task.model)
        model.pop("architecture", None)
        return cls(**{**model, **overrides})
