"""Metric-learning, distillation and segmentation losses."""

from tfmir.losses.knn_triplet import KNNTriplet
from tfmir.losses.knn_triplet import knn_triplet
from tfmir.losses.multi_similarity import MultiSimilarity
from tfmir.losses.multi_similarity import multi_similarity
from tfmir.losses.rkd import RKDDistance
from tfmir.losses.rkd import rkd_distance
from tfmir.losses.triplet import BatchHardTriplet
from tfmir.losses.triplet import batch_hard_triplet

__all__ = [
    "BatchHardTriplet",
    "KNNTriplet",
    "MultiSimilarity",
    "RKDDistance",
    "batch_hard_triplet",
    "knn_triplet",
    "multi_similarity",
    "rkd_distance",
]
