"""Retrieval models."""

from tfmir.models.backbones import BACKBONES, build_backbone, feature_extractor
from tfmir.models.concatenation import ConcatenationEmbedder, pca_projection
from tfmir.models.embedder import Embedder
from tfmir.models.pretrained import efficientnet_lite, load_torch_checkpoint

__all__ = ["BACKBONES", "ConcatenationEmbedder", "Embedder", "build_backbone", "efficientnet_lite",
           "feature_extractor", "load_torch_checkpoint", "pca_projection"]
