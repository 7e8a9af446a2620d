"""Pooling, hashing, classifier and Gram-matrix layers for retrieval heads."""

from tfmir.layers.cosine_classifier import CosineClassifier
from tfmir.layers.gram import GramMatrix
from tfmir.layers.gram import gram_matrix
from tfmir.layers.hashing import HashProjection
from tfmir.layers.hashing import hash_shape
from tfmir.layers.pooling import RMAC
from tfmir.layers.pooling import CAMPooling
from tfmir.layers.pooling import CroW
from tfmir.layers.pooling import GeM
from tfmir.layers.pooling import SPoC
from tfmir.layers.pooling import rmac_regions

__all__ = [
    "CAMPooling",
    "CosineClassifier",
    "CroW",
    "GeM",
    "GramMatrix",
    "HashProjection",
    "RMAC",
    "SPoC",
    "gram_matrix",
    "hash_shape",
    "rmac_regions",
]
