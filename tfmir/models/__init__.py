"""Retrieval models."""

from tfmir.models.backbones import BACKBONES, build_backbone
from tfmir.models.embedder import Embedder
from tfmir.models.presets import PRESETS, get_preset

__all__ = ["BACKBONES", "Embedder", "PRESETS", "build_backbone", "get_preset"]
