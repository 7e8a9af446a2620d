"""The retrieval embedder: backbone CNN -> Dense(128) -> L2 normalisation."""

from __future__ import annotations

import keras

from tfmir.models import backbones


@keras.saving.register_keras_serializable(package="tfmir")
class Embedder(keras.Model):
    """Maps images to unit-length embeddings for retrieval.

    Input: float pixels in [0, 255], shape (batch, image_size, image_size, 3), RGB. Output: float32
    embeddings of shape (batch, embedding_dim) with L2 norm 1, so the dot product of two embeddings
    is their cosine similarity.

    Args:
        backbone: one of `tfmir.models.backbones.BACKBONES` ("resnet50" in the paper).
        embedding_dim: size of the embedding (128 in the paper).
        image_size: height and width of the square input.
        weights: None, "imagenet" or a path to backbone weights.
        backbone_widths: stage widths for "small_resnet"; None otherwise.
        freeze_batch_norm: keep the backbone's batch-norm layers in inference mode with their
            (pretrained) statistics and scales fixed while the rest trains: the usual way to
            fine-tune an ImageNet network on small batches from another domain.
        **kwargs: `keras.Model` arguments such as `name`.

    Example:
    >>> embedder = Embedder.from_preset("tiny")
    >>> embedder(np.zeros((2, 32, 32, 3))).shape
    TensorShape([2, 128])

    Reference:
        Universal multi-source medical image retrieval via distillation, Sec. IV-B (ResNet50 ->
        FC 128 -> unit length).
    """

    def __init__(self, backbone: str = "resnet50", embedding_dim: int = 128, image_size: int = 224,
                 weights: str | None = None, backbone_widths=None,
                 freeze_batch_norm: bool = False, **kwargs):
        if int(embedding_dim) <= 0:
            raise ValueError(f"embedding_dim must be positive. Received: embedding_dim={embedding_dim!r}")
        if int(image_size) < 16:
            raise ValueError(f"image_size must be at least 16. Received: image_size={image_size!r}")
        backbone_model = backbones.build_backbone(backbone, int(image_size), weights=weights,
                                                  widths=backbone_widths)
        if freeze_batch_norm:
            backbones.freeze_batch_norm(backbone_model)

        # === Functional Model ===
        images = keras.Input((image_size, image_size, 3), name="images")
        features = backbone_model(images)
        projected = keras.layers.Dense(embedding_dim, name="projection")(features)
        # Normalise in float32 so embeddings stay unit-length under mixed precision.
        embeddings = keras.layers.UnitNormalization(axis=-1, dtype="float32", name="l2")(projected)
        kwargs.setdefault("name", "embedder")
        super().__init__(inputs=images, outputs=embeddings, **kwargs)

        self.backbone = backbone
        self.embedding_dim = int(embedding_dim)
        self.image_size = int(image_size)
        self.weights_source = weights
        self.backbone_widths = tuple(backbone_widths) if backbone_widths else None
        self.freeze_batch_norm = bool(freeze_batch_norm)

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "backbone": self.backbone,
            "embedding_dim": self.embedding_dim,
            "image_size": self.image_size,
            # A restored model gets its weights from the file, never from a download.
            "weights": None,
            "backbone_widths": list(self.backbone_widths) if self.backbone_widths else None,
            "freeze_batch_norm": self.freeze_batch_norm,
        }

    @classmethod
    def from_config(cls, config: dict) -> "Embedder":
        return cls(**config)

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "Embedder":
        """The embedder of paper 000's specialist config on a setting ("tiny", "cpu", "paper").

        Keyword arguments override the config's model arguments.
        """
        from tfmir.configs import get_config  # configs name models; models don't need configs

        return cls(**{**get_config(f"specialist:{preset}").task.model, **overrides})
