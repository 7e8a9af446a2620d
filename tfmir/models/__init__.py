"""Retrieval models."""

from tfmir.models.backbones import BACKBONES, build_backbone
from tfmir.models.concatenation import ConcatenationEmbedder, pca_projection
from tfmir.models.distill import Distiller
from tfmir.models.embedder import Embedder
from tfmir.models.presets import PRESETS, get_preset

__all__ = ["BACKBONES", "ConcatenationEmbedder", "Distiller", "Embedder", "PRESETS",
           "build_backbone", "get_preset", "pca_projection"]
