"""Metric-learning, distillation and segmentation losses."""

from tfmir.losses.circle import ClassCircle
from tfmir.losses.circle import class_circle
from tfmir.losses.coupled import LossWeight
from tfmir.losses.coupled import coupled_loss
from tfmir.losses.focal import BinaryFocalLoss
from tfmir.losses.focal import binary_focal_loss
from tfmir.losses.focal_tversky import FocalTversky
from tfmir.losses.focal_tversky import focal_tversky
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
    "BinaryFocalLoss",
    "ClassCircle",
    "FocalTversky",
    "KNNTriplet",
    "LossWeight",
    "MultiSimilarity",
    "RKDDistance",
    "batch_hard_triplet",
    "binary_focal_loss",
    "class_circle",
    "coupled_loss",
    "focal_tversky",
    "knn_triplet",
    "multi_similarity",
    "rkd_distance",
]
