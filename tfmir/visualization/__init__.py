"""Figures: retrieval galleries and the universal-embedding paper's plots."""

from tfmir.visualization.figures import (
    distance_ratios,
    plot_distance_ratios,
    plot_recall_curves,
    recall_curves,
    save_retrieval_comparison,
)
from tfmir.visualization.gallery import MATCH_COLOR, MISMATCH_COLOR, save_gallery

__all__ = ["MATCH_COLOR", "MISMATCH_COLOR", "distance_ratios", "plot_distance_ratios",
           "plot_recall_curves", "recall_curves", "save_gallery", "save_retrieval_comparison"]
