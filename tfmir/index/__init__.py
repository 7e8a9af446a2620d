"""Nearest-neighbour search over embeddings."""

from tfmir.index.exact import METRICS
from tfmir.index.exact import exact_search

__all__ = ["METRICS", "exact_search"]
