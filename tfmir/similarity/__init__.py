"""Similarity measures of paper 003: Euclidean, cosine, style, Dice and their I1 combinations."""

from tfmir.similarity.cosine import cosine_similarity
from tfmir.similarity.cosine import rescaled_cosine
from tfmir.similarity.dice import dice_coefficient
from tfmir.similarity.euclidean import euclidean_distances
from tfmir.similarity.euclidean import euclidean_score
from tfmir.similarity.gram_storage import PACKED_DTYPES
from tfmir.similarity.gram_storage import pack_grams
from tfmir.similarity.gram_storage import packed_size
from tfmir.similarity.gram_storage import style_losses_packed
from tfmir.similarity.gram_storage import unpack_grams
from tfmir.similarity.i1 import harmonic_mean
from tfmir.similarity.measures import COMPONENTS
from tfmir.similarity.measures import MAXIMA_KEYS
from tfmir.similarity.measures import MEASURES
from tfmir.similarity.measures import PAPER_TABLE1
from tfmir.similarity.measures import rank
from tfmir.similarity.measures import similarity_scores
from tfmir.similarity.style import style_losses
from tfmir.similarity.style import style_score

__all__ = [
    "COMPONENTS",
    "MAXIMA_KEYS",
    "MEASURES",
    "PACKED_DTYPES",
    "PAPER_TABLE1",
    "cosine_similarity",
    "dice_coefficient",
    "euclidean_distances",
    "euclidean_score",
    "harmonic_mean",
    "pack_grams",
    "packed_size",
    "rank",
    "rescaled_cosine",
    "similarity_scores",
    "style_losses",
    "style_losses_packed",
    "style_score",
    "unpack_grams",
]
