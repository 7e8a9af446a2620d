"""Nearest-neighbour search over embeddings and hash codes.

One interface (`Index`: build, add, search, search_arrays, get, save, load) with
three implementations: `ExactIndex`, `ScannIndex` and `HammingIndex` (`sign_codes`
turns real-valued embeddings into its bit codes). `StyleDatabase` is paper 003's archive of
feature vectors, packed Gram matrices and masks, ranked by its nine similarity measures.
"""

from tfmir.index.base import FingerprintMismatchError
from tfmir.index.base import Index
from tfmir.index.exact import METRICS
from tfmir.index.exact import ExactIndex
from tfmir.index.exact import exact_search
from tfmir.index.hamming import HammingIndex
from tfmir.index.hamming import pack_bits
from tfmir.index.hamming import sign_codes
from tfmir.index.scann_index import ScannIndex
from tfmir.index.style import StyleDatabase

__all__ = [
    "METRICS",
    "ExactIndex",
    "FingerprintMismatchError",
    "HammingIndex",
    "Index",
    "ScannIndex",
    "StyleDatabase",
    "exact_search",
    "pack_bits",
    "sign_codes",
]
