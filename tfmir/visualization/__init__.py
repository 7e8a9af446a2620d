"""Figures: retrieval galleries, the universal-embedding paper's plots, deep kNN's convergence."""

from tfmir.visualization.convergence import convergence_curve, plot_convergence
from tfmir.visualization.figures import (
    distance_ratios,
    plot_distance_ratios,
    plot_recall_curves,
    recall_curves,
    save_retrieval_comparison,
)
from tfmir.visualization.gallery import MATCH_COLOR, MISMATCH_COLOR, save_gallery

__all__ = ["MATCH_COLOR", "MISMATCH_COLOR", "convergence_curve", "distance_ratios",
           "plot_convergence", "plot_distance_ratios", "plot_recall_curves", "recall_curves",
           "save_gallery", "save_retrieval_comparison"]
