"""Metric-learning and segmentation losses."""

from tfmir.losses.multi_similarity import MultiSimilarity
from tfmir.losses.multi_similarity import multi_similarity

__all__ = ["MultiSimilarity", "multi_similarity"]
