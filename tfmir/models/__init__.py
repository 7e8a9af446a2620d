"""Retrieval models."""

from tfmir.models.backbones import BACKBONES, build_backbone, feature_extractor
from tfmir.models.concatenation import ConcatenationEmbedder, pca_projection
from tfmir.models.embedder import Embedder

__all__ = ["BACKBONES", "ConcatenationEmbedder", "Embedder", "build_backbone", "feature_extractor", "pca_projection"]
