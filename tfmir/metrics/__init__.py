"""Retrieval, classification and segmentation metrics."""

from tfmir.metrics.bootstrap import bootstrap_mean
from tfmir.metrics.bootstrap import bootstrap_statistic
from tfmir.metrics.bootstrap import paired_bootstrap
from tfmir.metrics.classification import classification_metrics
from tfmir.metrics.classification import find_smallest_class
from tfmir.metrics.classification import knn_classification
from tfmir.metrics.classification import knn_predict
from tfmir.metrics.classification import neighbor_rows
from tfmir.metrics.classification import positive_class_index
from tfmir.metrics.classification import roc_auc
from tfmir.metrics.retrieval import average_precisions
from tfmir.metrics.retrieval import map_at_k
from tfmir.metrics.retrieval import precision_at_k
from tfmir.metrics.retrieval import recall_at_k
from tfmir.metrics.retrieval import recall_hits
from tfmir.metrics.retrieval import retrieval_metrics
from tfmir.metrics.segmentation import dice_score
from tfmir.metrics.segmentation import iou_score

__all__ = [
    "average_precisions",
    "bootstrap_mean",
    "bootstrap_statistic",
    "classification_metrics",
    "dice_score",
    "find_smallest_class",
    "iou_score",
    "knn_classification",
    "knn_predict",
    "map_at_k",
    "neighbor_rows",
    "paired_bootstrap",
    "positive_class_index",
    "precision_at_k",
    "recall_at_k",
    "recall_hits",
    "retrieval_metrics",
    "roc_auc",
]
