"""Figures: retrieval galleries."""

from tfmir.visualization.gallery import MATCH_COLOR, MISMATCH_COLOR, save_gallery

__all__ = ["MATCH_COLOR", "MISMATCH_COLOR", "save_gallery"]
