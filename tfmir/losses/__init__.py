"""Metric-learning, distillation and segmentation losses."""

from tfmir.losses.multi_similarity import MultiSimilarity
from tfmir.losses.multi_similarity import multi_similarity
from tfmir.losses.rkd import RKDDistance
from tfmir.losses.rkd import rkd_distance

__all__ = ["MultiSimilarity", "RKDDistance", "multi_similarity", "rkd_distance"]
