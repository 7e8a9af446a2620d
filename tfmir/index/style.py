"""Paper 003's reverse-image-search database: vectors, packed Gram matrices and masks per image.

A `StyleDatabase` stores, for each indexed image, what a style model (`tfmir.models.StyleEnsemble`)
and a segmenter give it, and ranks the archive against a query with any of the nine similarity
measures of `tfmir.similarity.MEASURES`:

- the feature vector, float32 (D,);
- the Gram matrices, packed (`tfmir.similarity.pack_grams`: upper triangles with the layer
  weights β_l folded in, so the squared L2 distance of two rows is the style loss), float16
  (P,) by default, P = Σ_l C_l (C_l + 1) / 2;
- the predicted lesion mask at a fixed `mask_size` × `mask_size` grid (64 by default),
  thresholded at 0.5 and bit-packed (`np.packbits`): the Dice coefficient is computed on that
  grid, whatever the segmenter's own resolution;
- a PCA projection of the packed Grams fitted on the database (256 dimensions by default) and
  each item's residual norm outside it, for fast candidate search.

Why PCA. Among all rank-r orthogonal projections, the top-r principal subspace of the (centred)
packed rows keeps the most of Σ_ij ‖y_i − y_j‖², the sum of the database's pairwise style
losses (Eckart-Young: it minimises the discarded variance, and that sum is 2N times the
variance). So the squared distance of projected rows is the best rank-r approximation of the
style loss over the database, in that sense. It is a lower bound of the loss; adding the
squared residual norms of both sides, ‖P(q − y)‖² + ‖r_q‖² + ‖r_y‖², estimates it without
bias when the residuals are uncorrelated, and (‖r_q‖ ± ‖r_y‖)² bound the residual term.
`benchmarks/style_search.py` measures how much of the loss the projection keeps and how often
fast search agrees with exact search.

Search modes:

- "exact" (paper-faithful): every component over the whole database, ES and SS normalised by
  the largest Euclidean distance ED_max and style loss LS_max from the query to any item, then
  the measure (`tfmir.similarity.similarity_scores`).
- "fast": the vector components (ES, CS_new) and the Dice coefficient are cheap, so they are
  computed exactly over the whole database; a measure without style is therefore answered
  exactly. For the style measures, the style loss of every item is estimated from the
  projection; the candidates are the union of the top `candidates` items by the measure scored
  with that estimate, by Euclidean vector distance, and by estimated style loss, and only they
  are re-ranked with the exact style loss read from the packed Grams. LS_max, which rescales SS
  (and so decides the I1 combinations), is made exact as well rather than estimated: the
  largest exact loss among the items most likely to be farthest is a lower bound of LS_max, and
  every item whose upper bound ‖P(q − y)‖² + (‖r_q‖ + ‖r_y‖)² lies below it is ruled out; the
  rest are evaluated until none is left, or until `max_refine` (64) rows were read: then the
  largest of the exact losses found and of the estimates of the items not ruled out is used,
  and `details` says "estimated". With an exact LS_max, a candidate's fast score equals its
  exact score, so fast mode can only miss items, never misorder them; with an estimated one
  the scores move by the estimate's relative error (LS_max rescales every SS alike, so the
  "style" measure's order never depends on it, only the I1 combinations' can).

Directory (`save`, format version 1): manifest.json (kind "style", fingerprints of the style
model and of the segmenter or null, the query preprocessing, layer weights, channels, mask size,
counts, dtypes, bytes per image, the sha256 of every file, written last), table.jsonl (ids,
labels, sources, paths; as `tfmir.index.Index`), vectors.npy, packed_grams.npy (loaded with
`mmap_mode="r"`: a 10k-item database of EfficientNet-Lite0 Grams, 1.6 GB, is not read into
memory), masks.npy (only with a segmenter), projection_mean.npy, projection.npy,
projected_grams.npy, gram_residuals.npy.

Example:

```python
database = StyleDatabase(channels=[16, 24, 40, 80, 112, 192, 320], model_fingerprint=fp)
database.build(vectors, grams=grams, masks=masks, ids=ids, labels=labels)
database.save("indexes/melanoma")
database = StyleDatabase.load("indexes/melanoma", expected_model_fingerprint=fp)
database.search({"vector": v, "grams": g, "mask": m}, k=5, measure="style", mode="fast")
```

Reference:
    Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data using
    Style Transfer, Semantic Image Segmentation and Ensemble Learning", 2021,
    https://arxiv.org/abs/2110.06331, Sec. 2 (eq. 1-14) and Sec. 3.5 (the RIS dataset).
"""

from __future__ import annotations

import datetime
import json
import numbers
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

import tfmir
from tfmir.files import atomic_directory
from tfmir.index.base import (MANIFEST_FILE, TABLE_FILE, FingerprintMismatchError, _as_cell,
                              _as_id, _check_expected, _column, _read_table,
                              _refuse_save_marker_name, _sha256, _verify_files)
from tfmir.similarity import (COMPONENTS, MEASURES, euclidean_distances, pack_grams,
                              packed_size, similarity_scores, style_losses_packed)

KIND = "style"
FORMAT_VERSION = 1
MODES = ("exact", "fast")
GRAM_DTYPES = ("float16", "float32")
DEFAULT_MASK_SIZE = 64
DEFAULT_PROJECTION_DIM = 256
DEFAULT_CANDIDATES = 100
# A pixel is lesion when the segmenter's probability is above this (as `dice_coefficient`).
MASK_THRESHOLD = 0.5

VECTORS_FILE = "vectors.npy"
PACKED_GRAMS_FILE = "packed_grams.npy"
MASKS_FILE = "masks.npy"
MEAN_FILE = "projection_mean.npy"
PROJECTION_FILE = "projection.npy"
PROJECTED_FILE = "projected_grams.npy"
RESIDUALS_FILE = "gram_residuals.npy"

# The PCA is fitted on at most this many rows (a seeded sample): its cost grows with their
# square, and a few thousand rows fix the leading directions of a database of any size.
_FIT_ITEMS = 2048
# Columns of the packed Grams read at once while fitting and projecting (bounds the memory).
_CHUNK_COLUMNS = 8192
_CHUNK_ROWS = 1024
# The exact style losses of this many items most likely to be farthest start the search for
# LS_max; later rounds evaluate the still-possible items this many at a time.
_MAXIMUM_SEEDS = 16
# Fast mode reads at most this many packed rows for LS_max beyond the candidates: when the
# projection keeps little of the loss the bounds rule out few items, and reading many rows
# would cost what exact mode costs (the estimate of LS_max is then used, see `search`).
_MAX_REFINE = 64
# Float32 projections are orthonormal to ~1e-7; the loss bounds get this relative margin.
_BOUND_SLACK = 1e-4


def mask_bits(masks, mask_size: int) -> np.ndarray:
    """Thresholds masks at 0.5 and bit-packs them: (N, S, S[, 1]) -> uint8 (N, ceil(S²/8)).

    Args:
        masks: N masks of probabilities (or bool / {0, 1}) at `mask_size` × `mask_size`.
        mask_size: the side S the database stores masks at.

    Returns:
        uint8 (N, ceil(S² / 8)): row-major pixels, 8 per byte, most significant bit first.

    Example:

    >>> mask_bits(np.array([[[0.9, 0.1], [0.2, 0.7]]]), mask_size=2)  # 1, 0, 0, 1 -> 0b10010000
    array([[144]], dtype=uint8)
    """
    masks = np.asarray(masks)
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    if masks.ndim != 3 or masks.shape[1:] != (mask_size, mask_size):
        raise ValueError(f"masks must have shape (N, {mask_size}, {mask_size}) or "
                         f"(N, {mask_size}, {mask_size}, 1) for mask_size={mask_size}. "
                         f"Received: masks.shape={masks.shape}")
    if np.issubdtype(masks.dtype, np.floating) and np.isnan(masks).any():
        item = int(np.argwhere(np.isnan(masks))[0][0])
        raise ValueError(f"mask {item} contains NaN; the segmenter produced a non-finite "
                         "output (e.g. from a degenerate image)")
    binary = masks if masks.dtype == bool else masks > MASK_THRESHOLD
    return np.packbits(binary.reshape(binary.shape[0], -1), axis=1)


def unpack_mask_bits(bits, mask_size: int) -> np.ndarray:
    """The inverse of `mask_bits`: uint8 (N, ceil(S²/8)) -> bool (N, S, S)."""
    bits = np.asarray(bits, np.uint8)
    pixels = np.unpackbits(bits, axis=1, count=mask_size * mask_size)
    return pixels.reshape(bits.shape[0], mask_size, mask_size).astype(bool)


class StyleDatabase:
    """The archive of paper 003's reverse image search: rank by any of the nine measures.

    Args:
        channels: C_l of each Gram layer, in order (e.g. [16, 24, 40, 80, 112, 192, 320] for
            EfficientNet-Lite0's block groups).
        layer_weights: β_l of the style loss, one per layer (None: all 1). They are folded into
            the packed rows, so queries are packed with the same ones (`search` does it).
        mask_size: side of the stored mask grid; the Dice coefficient is computed on it.
        model_fingerprint: the style model's fingerprint (`tfmir.export.model_fingerprint`).
        segmenter_fingerprint: the segmenter's, or None when the database has no masks.
        preprocessing: how the items were resized and cropped (`tfmir.data.query_preprocessing`).
        gram_dtype: "float16" (default; see `tfmir.similarity.gram_storage` for its error) or
            "float32" for the packed Grams.
        projection_dim: r, the PCA dimensions kept for fast search (at most N and P).

    Example:

    >>> database = StyleDatabase(channels=[2]).build(
    ...     np.eye(3, 4), grams=[np.stack([np.eye(2), 2 * np.eye(2), 3 * np.eye(2)])],
    ...     ids=["a", "b", "c"])
    >>> [row["id"] for row in database.search(
    ...     {"vector": np.eye(3, 4)[1], "grams": [2.2 * np.eye(2)]}, k=2, measure="style")]
    ['b', 'c']
    """

    kind = KIND

    def __init__(self, *, channels: Sequence[int], layer_weights: Sequence[float] | None = None,
                 mask_size: int = DEFAULT_MASK_SIZE, model_fingerprint: str | None = None,
                 segmenter_fingerprint: str | None = None, preprocessing: dict | None = None,
                 gram_dtype: str = "float16", projection_dim: int = DEFAULT_PROJECTION_DIM):
        self.packed_size = packed_size(channels)
        self.channels = [int(c) for c in channels]
        if layer_weights is not None:
            # pack_grams checks them; this gives the error before any data is given.
            pack_grams([np.zeros((1, c, c)) for c in self.channels], layer_weights, "float64")
            layer_weights = [float(weight) for weight in layer_weights]
        self.layer_weights = layer_weights
        _check_positive_int("mask_size", mask_size)
        _check_positive_int("projection_dim", projection_dim)
        if gram_dtype not in GRAM_DTYPES:
            raise ValueError(f"gram_dtype must be one of {GRAM_DTYPES}. "
                             f"Received: gram_dtype={gram_dtype!r}")
        for name, value in (("model_fingerprint", model_fingerprint),
                            ("segmenter_fingerprint", segmenter_fingerprint)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string or None. Received: {name}={value!r}")
        if preprocessing is not None and not isinstance(preprocessing, dict):
            raise ValueError(f"preprocessing must be a dict or None. "
                             f"Received: preprocessing={preprocessing!r}")
        self.mask_size = int(mask_size)
        self.model_fingerprint = model_fingerprint
        self.segmenter_fingerprint = segmenter_fingerprint
        self.preprocessing = preprocessing
        self.gram_dtype = gram_dtype
        self.projection_dim = int(projection_dim)
        self.vectors = None
        self.packed_grams = None
        self.mask_bits = None
        self.projection_mean = None
        self.projection = None
        self.projected_grams = None
        self.gram_residuals = None
        self._masks = None
        self._table = ([], [], [], [])

    # === Building ===

    def build(self, vectors, *, grams: Sequence | None = None, packed_grams=None, masks=None,
              packed_masks=None, ids, labels=None, sources=None, paths=None,
              seed: int = 0) -> "StyleDatabase":
        """Stores N items and fits the projection; replaces any previous contents.

        Args:
            vectors: float (N, D) feature vectors, N >= 1.
            grams: L arrays (N, C_l, C_l), packed here with the layer weights; or
            packed_grams: (N, P) rows already packed with `pack_grams` and the same weights.
            masks: (N, S, S) or (N, S, S, 1) probabilities or bools at S = `mask_size`; or
            packed_masks: uint8 (N, ceil(S²/8)) from `mask_bits`. Neither: no masks (the Dice
                measures are then refused). Masks need a `segmenter_fingerprint`, and it them.
            ids: N unique ids (strings or integers).
            labels, sources, paths: optional N table values each.
            seed: seeds the sample the PCA is fitted on (when N is above 2048).

        Returns:
            The database itself.
        """
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"vectors must have shape (N, D) with N >= 1. "
                             f"Received: vectors.shape={vectors.shape}")
        _refuse_non_finite(vectors, "vectors")
        count = vectors.shape[0]
        if (grams is None) == (packed_grams is None):
            raise ValueError("give the Gram matrices as exactly one of grams= (L arrays "
                             "(N, C_l, C_l)) and packed_grams= ((N, P) pack_grams rows).")
        if grams is not None:
            shapes = [tuple(np.shape(gram)) for gram in grams]
            expected = [(count, c, c) for c in self.channels]
            if shapes != expected:
                raise ValueError(f"grams must have shapes {expected} (N={count}, channels "
                                 f"{self.channels}). Received: {shapes}")
            packed = pack_grams(grams, self.layer_weights, self.gram_dtype)
        else:
            packed = np.asarray(packed_grams)
            if packed.shape != (count, self.packed_size):
                raise ValueError(f"packed_grams must have shape ({count}, {self.packed_size}) "
                                 f"for N={count} and channels {self.channels}. Received: "
                                 f"packed_grams.shape={packed.shape}")
            packed = packed.astype(self.gram_dtype, copy=False)
            _refuse_non_finite(packed, "packed_grams")
        bits = None
        if masks is not None and packed_masks is not None:
            raise ValueError("give masks= or packed_masks=, not both.")
        if masks is not None:
            bits = mask_bits(masks, self.mask_size)
        elif packed_masks is not None:
            bits = np.asarray(packed_masks)
            width = -(-self.mask_size ** 2 // 8)
            if bits.dtype != np.uint8 or bits.shape != (count, width):
                raise ValueError(f"packed_masks must be uint8 ({count}, {width}) for "
                                 f"mask_size={self.mask_size}. Received: dtype={bits.dtype}, "
                                 f"shape={bits.shape}")
        if bits is not None and bits.shape[0] != count:
            raise ValueError(f"masks must have one entry per vector. Received: {bits.shape[0]} "
                             f"masks for {count} vectors")
        if self.segmenter_fingerprint is not None and bits is None:
            raise ValueError("segmenter_fingerprint is set but no masks were given; give the "
                             "segmenter's masks, or no segmenter_fingerprint.")
        table = _table(count, ids, labels, sources, paths)
        self.vectors = np.ascontiguousarray(vectors)
        self.packed_grams = packed
        self.mask_bits = bits
        self._masks = None
        self._table = table
        self._fit_projection(seed)
        return self

    def _fit_projection(self, seed: int):
        """PCA of the packed rows (on a seeded sample of at most 2048) and every row's residual."""
        count, size = self.packed_grams.shape
        rows = np.arange(count)
        if count > _FIT_ITEMS:
            rows = np.sort(np.random.default_rng(seed).choice(count, _FIT_ITEMS, replace=False))
        sample = self.packed_grams[rows]
        mean = np.zeros(size)
        for start in range(0, size, _CHUNK_COLUMNS):
            mean[start:start + _CHUNK_COLUMNS] = sample[:, start:start + _CHUNK_COLUMNS].astype(
                np.float64).mean(axis=0)
        mean = mean.astype(np.float32)
        # Principal directions from the sample's (n, n) Gram matrix: n is far below P.
        kernel = np.zeros((len(rows), len(rows)))
        for start in range(0, size, _CHUNK_COLUMNS):
            block = sample[:, start:start + _CHUNK_COLUMNS].astype(np.float32) - \
                mean[start:start + _CHUNK_COLUMNS]
            kernel += block @ block.T
        eigenvalues, eigenvectors = np.linalg.eigh(kernel)
        order = np.argsort(eigenvalues)[::-1]
        keep = order[eigenvalues[order] > eigenvalues.max() * 1e-10][:self.projection_dim]
        rank = max(1, len(keep))
        keep = order[:rank]
        coefficients = eigenvectors[:, keep] / np.sqrt(np.maximum(eigenvalues[keep], 1e-300))
        components = np.empty((size, rank))
        for start in range(0, size, _CHUNK_COLUMNS):
            block = sample[:, start:start + _CHUNK_COLUMNS].astype(np.float64) - \
                mean[start:start + _CHUNK_COLUMNS]
            components[start:start + _CHUNK_COLUMNS] = block.T @ coefficients
        components, _ = np.linalg.qr(components)  # orthonormal to float64 rounding
        self.projection_mean = mean
        self.projection = np.ascontiguousarray(components.T.astype(np.float32))
        projected, residuals = self._project_rows(self.packed_grams)
        self.projected_grams = projected
        self.gram_residuals = residuals

    def _project_rows(self, packed) -> tuple[np.ndarray, np.ndarray]:
        """(N, r) projected coordinates and (N,) residual norms of packed rows, in float32."""
        count = packed.shape[0]
        projected = np.empty((count, self.projection.shape[0]), np.float32)
        residuals = np.empty(count, np.float32)
        for start in range(0, count, _CHUNK_ROWS):
            block = packed[start:start + _CHUNK_ROWS].astype(np.float32) - self.projection_mean
            coordinates = block @ self.projection.T
            total = np.einsum("np,np->n", block, block, dtype=np.float64)
            kept = np.einsum("nr,nr->n", coordinates, coordinates, dtype=np.float64)
            projected[start:start + _CHUNK_ROWS] = coordinates
            residuals[start:start + _CHUNK_ROWS] = np.sqrt(np.maximum(total - kept, 0.0))
        return projected, residuals

    # === Contents ===

    def __len__(self) -> int:
        return 0 if self.vectors is None else self.vectors.shape[0]

    def __repr__(self):
        return (f"StyleDatabase(count={len(self)}, dimension={self.dimension}, "
                f"channels={self.channels}, masks={self.has_masks}, "
                f"model_fingerprint={self.model_fingerprint!r})")

    @property
    def dimension(self) -> int | None:
        """D, the feature vector length (None before `build`)."""
        return None if self.vectors is None else int(self.vectors.shape[1])

    @property
    def has_masks(self) -> bool:
        return self.mask_bits is not None

    @property
    def ids(self) -> list:
        return list(self._table[0])

    @property
    def labels(self) -> list:
        return list(self._table[1])

    @property
    def sources(self) -> np.ndarray:
        return np.asarray(self._table[2], dtype=object)

    @property
    def masks(self) -> np.ndarray:
        """bool (N, S, S) masks (unpacked once, on first use); refused without a segmenter."""
        if self.mask_bits is None:
            raise ValueError("the database was built without --segmenter: it holds no masks.")
        if self._masks is None:
            self._masks = unpack_mask_bits(self.mask_bits, self.mask_size)
        return self._masks

    def bytes_per_image(self) -> dict:
        """Stored bytes per item, by array: vector, packed Grams, mask, projection, and total."""
        self._require_contents()
        count = len(self)
        sizes = {
            "vector": self.vectors.nbytes // count,
            "packed_grams": self.packed_grams.nbytes // count,
            "mask": 0 if self.mask_bits is None else self.mask_bits.nbytes // count,
            "projection": (self.projected_grams.nbytes + self.gram_residuals.nbytes) // count,
        }
        sizes["total"] = sum(sizes.values())
        return sizes

    def describe(self) -> dict:
        """What the database holds, its sizes and its provenance (the manifest's summary)."""
        self._require_contents()
        return {
            "kind": KIND,
            "count": len(self),
            "dimension": self.dimension,
            "channels": self.channels,
            "packed_size": self.packed_size,
            "layer_weights": self.layer_weights,
            "mask_size": self.mask_size if self.has_masks else None,
            "has_masks": self.has_masks,
            "projection_dim": int(self.projection.shape[0]),
            "dtypes": {"vectors": str(self.vectors.dtype),
                       "packed_grams": str(self.packed_grams.dtype),
                       "masks": "bits (uint8, np.packbits)" if self.has_masks else None,
                       "projection": str(self.projection.dtype)},
            "bytes_per_image": self.bytes_per_image(),
            "fixed_bytes": self.projection.nbytes + self.projection_mean.nbytes,
            "model_fingerprint": self.model_fingerprint,
            "segmenter_fingerprint": self.segmenter_fingerprint,
            "preprocessing": self.preprocessing,
            "sources": sorted({str(source) for source in self._table[2] if source is not None}),
        }

    # === Search ===

    def search(self, query: Mapping, k: int, measure: str = "style", *, mode: str = "exact",
               candidates: int = DEFAULT_CANDIDATES, max_refine: int | None = None,
               query_name: str = "the query", details: bool = False):
        """The k items most similar to the query by `measure`, best first.

        Args:
            query: the query's fields: "vector" (D,); "grams" (L arrays (C_l, C_l)) or
                "packed_grams" (P,) packed with the database's layer weights; "mask" (S, S) or
                (S, S, 1) probabilities at the database's mask size (only the Dice measures
                read it).
            k: results, 1 <= k <= len(database).
            measure: one of `tfmir.similarity.MEASURES`.
            mode: "exact" or "fast" (see the module docstring).
            candidates: C, items taken from each candidate list in fast mode (at least k);
                C >= N makes fast mode exact.
            max_refine: most exact style losses evaluated to pin LS_max down in fast mode
                (default 64); past it the estimates of the items not ruled out take part.
            query_name: names the query in error messages (e.g. its file).
            details: also return what fast mode did.

        Returns:
            A list of `{"id", "label", "source", "path", "score", "rank"}` (score: the measure,
            in [0, 1], higher is more similar); with `details`, `(results, info)` where `info`
            holds "mode", "candidates" (items re-ranked exactly), "style_max" ("exact",
            "estimated" or None when the measure has no style component) and, in fast mode
            for a style measure, "style_max_value" (the LS_max used).

        Raises:
            ValueError: an unknown measure or mode, k out of range, a query whose fields do not
                fit the database (both shapes named) or hold NaN / inf, or a Dice measure on a
                database without masks.
        """
        self.check_request(measure, mode, candidates)
        size = len(self)
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= size:
            raise ValueError(f"k must be an integer in [1, {size}] (the database holds {size} "
                             f"items). Received: k={k!r}")
        components = COMPONENTS[measure]
        fields = self._query_fields(query, components, query_name)
        if mode == "exact" or "style" not in components or max(candidates, k) >= size:
            scores = similarity_scores(measure, fields, self._fields(components))
            rows = np.argsort(-scores, kind="stable")[:k]
            info = {"mode": mode, "candidates": size,
                    "style_max": "exact" if "style" in components else None}
            return self._results(rows, scores[rows], details, info)
        rows, scores, info = self._fast_search(measure, fields, components, k,
                                               max(candidates, k), max_refine)
        return self._results(rows, scores, details, info)

    def check_request(self, measure: str, mode: str = "exact",
                      candidates: int = DEFAULT_CANDIDATES) -> None:
        """Refuses, as `search` would, a measure, mode or candidates it cannot answer.

        Raises:
            ValueError: an unknown measure (the similarity module's error), an unknown mode,
                candidates below 1, or a Dice measure on a database without masks.
        """
        self._require_contents()
        if not isinstance(measure, str) or measure not in MEASURES:
            similarity_scores(measure, {}, {})  # raises the similarity module's own error
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}. Received: mode={mode!r}")
        _check_positive_int("candidates", candidates)
        if "dice" in COMPONENTS[measure] and not self.has_masks:
            raise ValueError(f"measure {measure!r} needs masks: the database was built without "
                             "--segmenter")

    def _fast_search(self, measure, fields, components, k, candidates, max_refine):
        others = [component for component in components if component != "style"]
        database = self._fields(others)
        # The vectors are cheap next to the Grams: ED_max is exact, and the nearest vectors
        # are candidates even for the measures that do not read them.
        distances = euclidean_distances(fields["vector"], self.vectors)
        maxima = {"euclidean": float(distances.max())}
        query_projected = self._project_query(fields["packed_grams"])
        query_residual = float(query_projected[-1])
        differences = self.projected_grams - query_projected[:-1]
        kept = np.einsum("nr,nr->n", differences, differences, dtype=np.float64)
        residuals = self.gram_residuals.astype(np.float64)
        estimates = kept + query_residual ** 2 + residuals ** 2
        upper = (kept + (query_residual + residuals) ** 2) * (1 + _BOUND_SLACK)
        if max_refine is None:
            max_refine = _MAX_REFINE
        style_max, state = self._style_maximum(fields["packed_grams"], estimates, upper,
                                               max_refine)
        maxima["style"] = style_max
        # The measure scored with estimated losses: as squared distances of augmented rows
        # [P y, ‖r_y‖, 0] and [P q, 0, ‖r_q‖], whose squared distance is the estimate.
        augmented = np.zeros((len(self), self.projected_grams.shape[1] + 2))
        augmented[:, :-2] = self.projected_grams
        augmented[:, -2] = residuals
        query_augmented = np.zeros(augmented.shape[1])
        query_augmented[:-2] = query_projected[:-1]
        query_augmented[-1] = query_residual
        approximate = similarity_scores(
            measure, {**fields, "packed_grams": query_augmented},
            {**database, "packed_grams": augmented}, maxima=maxima)
        lists = [np.argsort(-approximate, kind="stable")[:candidates],
                 np.argsort(estimates, kind="stable")[:candidates],
                 np.argsort(distances, kind="stable")[:candidates]]
        chosen = np.unique(np.concatenate(lists))
        subset = {name: values[chosen] for name, values in self._fields(components).items()}
        scores = similarity_scores(measure, fields, subset, maxima=maxima)
        order = np.argsort(-scores, kind="stable")[:k]
        info = {"mode": "fast", "candidates": int(len(chosen)), "style_max": state,
                "style_max_value": style_max}
        return chosen[order], scores[order], info

    def _style_maximum(self, query_packed, estimates, upper, max_refine) -> tuple[float, str]:
        """LS_max: exact when every item not evaluated is bounded below the best found."""
        evaluated = np.zeros(len(self), bool)
        best = 0.0
        batch = np.argsort(-estimates, kind="stable")[:_MAXIMUM_SEEDS]
        while True:
            batch = np.sort(batch)
            losses = style_losses_packed(query_packed, self.packed_grams[batch])
            evaluated[batch] = True
            best = max(best, float(losses.max()))
            open_items = np.flatnonzero(~evaluated & (upper > best))
            if open_items.size == 0:
                return best, "exact"
            budget = max_refine - int(evaluated.sum())
            if budget <= 0:
                return max(best, float(estimates[open_items].max())), "estimated"
            order = np.argsort(-upper[open_items], kind="stable")
            batch = open_items[order[:min(budget, max(_MAXIMUM_SEEDS, open_items.size // 4))]]

    def _project_query(self, query_packed) -> np.ndarray:
        """[P (q − μ), ‖r_q‖]: the query's projected coordinates and residual norm."""
        projected, residuals = self._project_rows(np.asarray(query_packed)[None])
        return np.append(projected[0].astype(np.float64), float(residuals[0]))

    def _query_fields(self, query: Mapping, components, name: str) -> dict:
        """The query's fields the components need, checked against the database's shapes."""
        if not isinstance(query, Mapping):
            raise ValueError(f"the query must be a dict with 'vector', 'grams' or "
                             f"'packed_grams', and 'mask'. Received: {type(query).__name__}")
        fields = {}
        if {"euclidean", "cosine", "style"} & set(components):
            if "vector" not in query:
                raise ValueError(f"{name} has no 'vector' (the feature vector)")
            vector = np.asarray(query["vector"], np.float64)
            if vector.shape != (self.dimension,):
                raise ValueError(f"{name}'s vector has shape {vector.shape}, the database's "
                                 f"vectors {self.vectors.shape} (N, D): it was built by "
                                 "another model")
            if not np.all(np.isfinite(vector)):
                raise ValueError(f"{name}'s feature vector contains NaN or inf; the model "
                                 "produced a non-finite output (e.g. for a blank or all-black "
                                 "image)")
            fields["vector"] = vector
        if "style" in components:
            fields["packed_grams"] = self._query_packed(query, name)
        if "dice" in components:
            if "mask" not in query or query["mask"] is None:
                raise ValueError(f"{name} has no 'mask': the Dice measures need the query's "
                                 "segmentation (give the segmenter that built the database)")
            mask = np.asarray(query["mask"])
            if mask.ndim == 3 and mask.shape[-1] == 1:
                mask = mask[..., 0]
            if mask.shape != (self.mask_size, self.mask_size):
                raise ValueError(f"{name}'s mask has shape {mask.shape}, the database's masks "
                                 f"({self.mask_size}, {self.mask_size})")
            fields["mask"] = unpack_mask_bits(mask_bits(mask[None], self.mask_size),
                                              self.mask_size)[0]
        return fields

    def _query_packed(self, query: Mapping, name: str) -> np.ndarray:
        if "packed_grams" in query:
            packed = np.asarray(query["packed_grams"], np.float64)
            if packed.shape != (self.packed_size,):
                raise ValueError(f"{name}'s packed Grams have shape {packed.shape}, the "
                                 f"database's ({len(self)}, {self.packed_size}) (channels "
                                 f"{self.channels})")
        elif "grams" in query:
            grams = [np.asarray(gram, np.float64) for gram in query["grams"]]
            shapes = [gram.shape for gram in grams]
            expected = [(c, c) for c in self.channels]
            if shapes != expected:
                raise ValueError(f"{name}'s Gram matrices have shapes {shapes}, the "
                                 f"database's {expected}: it was built by another model")
            for layer, gram in enumerate(grams):
                if not np.all(np.isfinite(gram)):
                    raise ValueError(
                        f"{name}'s Gram matrix of layer {layer + 1} contains NaN or inf; the "
                        "model produced a non-finite output (e.g. a blank or all-black image)")
            packed = pack_grams([gram[None] for gram in grams], self.layer_weights,
                                "float64")[0]
        else:
            raise ValueError(f"{name} has no 'grams' or 'packed_grams': the style measures "
                             "need its Gram matrices")
        if not np.all(np.isfinite(packed)):
            raise ValueError(f"{name}'s packed Grams contain NaN or inf; the model produced a "
                             "non-finite output (e.g. a blank or all-black image)")
        return packed

    def _fields(self, components) -> dict:
        fields = {}
        if "euclidean" in components or "cosine" in components:
            fields["vector"] = self.vectors
        if "style" in components:
            fields["packed_grams"] = self.packed_grams
        if "dice" in components:
            fields["mask"] = self.masks
        return fields

    def _results(self, rows, scores, details, info):
        ids, labels, sources, paths = self._table
        results = [{"id": ids[row], "label": labels[row], "source": sources[row],
                    "path": paths[row], "score": float(score), "rank": rank}
                   for rank, (row, score) in enumerate(zip(rows.tolist(), scores), start=1)]
        return (results, info) if details else results

    # === Saving and loading ===

    def save(self, directory, *, overwrite: bool = False) -> pathlib.Path:
        """Writes the database directory atomically (`tfmir.files.atomic_directory`).

        Args:
            directory: the target; its parent is created if needed.
            overwrite: replace an existing database there. Without it an existing database is
                refused; a directory that is not a database (no manifest) is always refused
                unless it is empty.

        Returns:
            The absolute path written.
        """
        self._require_contents()
        target = pathlib.Path(directory).absolute()
        _refuse_save_marker_name(target)
        if target.exists():
            is_database = (target / MANIFEST_FILE).is_file()
            if not target.is_dir() or (not is_database and any(target.iterdir())):
                raise ValueError(f"Refusing to replace {str(target)!r}: it exists and is not an "
                                 "index directory (no manifest.json).")
            if is_database and not overwrite:
                raise ValueError(f"{str(target)!r} already holds an index; pass overwrite=True "
                                 "(--overwrite) to replace it, or choose another path.")
        with atomic_directory(target) as temporary:
            with open(temporary / TABLE_FILE, "w", encoding="utf-8",
                      errors="surrogateescape") as stream:
                for row in zip(*self._table):
                    stream.write(json.dumps(dict(zip(("id", "label", "source", "path"), row)),
                                            ensure_ascii=False) + "\n")
            for name, array in self._arrays().items():
                np.save(temporary / name, array)
            files = {path.name: {"sha256": _sha256(path)}
                     for path in sorted(temporary.iterdir()) if path.is_file()}
            manifest = {
                **self.describe(),
                "format_version": FORMAT_VERSION,
                "gram_dtype": self.gram_dtype,
                "mask_size": self.mask_size,
                "mask_threshold": MASK_THRESHOLD,
                "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"),
                "tfmir_version": tfmir.__version__,
                "files": files,
            }
            (temporary / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2,
                                                              sort_keys=True))
        return target

    def _arrays(self) -> dict:
        arrays = {VECTORS_FILE: self.vectors, PACKED_GRAMS_FILE: self.packed_grams,
                  MEAN_FILE: self.projection_mean, PROJECTION_FILE: self.projection,
                  PROJECTED_FILE: self.projected_grams, RESIDUALS_FILE: self.gram_residuals}
        if self.mask_bits is not None:
            arrays[MASKS_FILE] = self.mask_bits
        return arrays

    @classmethod
    def load(cls, directory, *, expected_model_fingerprint: str | None = None,
             expected_segmenter_fingerprint: str | None = None,
             expected_preprocessing: dict | None = None, verify: bool = True) -> "StyleDatabase":
        """Loads a database directory; the packed Grams stay on disk (`mmap_mode="r"`).

        Args:
            directory: written by `save` (or `tfmir index` with a style model).
            expected_model_fingerprint: refuse a database built by another style model.
            expected_segmenter_fingerprint: refuse one whose masks came from another segmenter
                (None: not checked).
            expected_preprocessing: refuse one whose items were preprocessed otherwise.
            verify: check every file's sha256 against the manifest (reads every byte once).

        Raises:
            FingerprintMismatchError: another model, segmenter or preprocessing (both named).
            ValueError: not a style database, a missing or modified file, an unknown version.
        """
        directory = pathlib.Path(directory)
        manifest = read_manifest(directory)
        if manifest.get("kind") != KIND:
            raise ValueError(f"{str(directory)!r} holds a {manifest.get('kind')!r} index, not a "
                             f"{KIND!r} database.")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"Unsupported style database format_version "
                             f"{manifest.get('format_version')!r} in {str(directory)!r}; this "
                             f"tfmir reads format_version {FORMAT_VERSION}.")
        for what, key, expected in (
                ("model fingerprint", "model_fingerprint", expected_model_fingerprint),
                ("segmenter fingerprint", "segmenter_fingerprint",
                 expected_segmenter_fingerprint),
                ("query preprocessing", "preprocessing", expected_preprocessing)):
            _check_expected(what, manifest.get(key), expected, error=FingerprintMismatchError)
        required = [TABLE_FILE, VECTORS_FILE, PACKED_GRAMS_FILE, MEAN_FILE, PROJECTION_FILE,
                    PROJECTED_FILE, RESIDUALS_FILE] + ([MASKS_FILE] if manifest.get("has_masks")
                                                       else [])
        if verify:
            _verify_files(directory, manifest, required=required)
        database = cls(channels=manifest["channels"], layer_weights=manifest.get("layer_weights"),
                       mask_size=manifest.get("mask_size") or DEFAULT_MASK_SIZE,
                       model_fingerprint=manifest.get("model_fingerprint"),
                       segmenter_fingerprint=manifest.get("segmenter_fingerprint"),
                       preprocessing=manifest.get("preprocessing"),
                       gram_dtype=manifest.get("gram_dtype", "float16"),
                       projection_dim=manifest.get("projection_dim") or DEFAULT_PROJECTION_DIM)

        def array(name, mmap_mode=None):
            return np.load(directory / name, allow_pickle=False, mmap_mode=mmap_mode)

        database.vectors = array(VECTORS_FILE)
        database.packed_grams = array(PACKED_GRAMS_FILE, mmap_mode="r")
        database.mask_bits = array(MASKS_FILE) if manifest.get("has_masks") else None
        database.projection_mean = array(MEAN_FILE)
        database.projection = array(PROJECTION_FILE)
        database.projected_grams = array(PROJECTED_FILE)
        database.gram_residuals = array(RESIDUALS_FILE)
        rows = _read_table(directory / TABLE_FILE)
        count = manifest.get("count")
        counts = {name: value.shape[0] for name, value in database._arrays().items()
                  if name not in (MEAN_FILE, PROJECTION_FILE)}
        if len(rows) != count or set(counts.values()) != {count}:
            raise ValueError(f"{str(directory)!r} is inconsistent: manifest count {count}, "
                             f"{len(rows)} table rows, arrays {counts}.")
        if database.packed_grams.shape[1] != database.packed_size:
            raise ValueError(f"{str(directory)!r} is inconsistent: packed Grams of width "
                             f"{database.packed_grams.shape[1]} for channels "
                             f"{database.channels} (expected {database.packed_size}).")
        database._table = _table(count, [row.get("id") for row in rows],
                                 [row.get("label") for row in rows],
                                 [row.get("source") for row in rows],
                                 [row.get("path") for row in rows])
        return database

    def _require_contents(self):
        if self.vectors is None:
            raise ValueError("The style database is empty: build() it first.")


def read_manifest(directory) -> dict:
    """The manifest of an index directory, or a ValueError saying why there is none."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise ValueError(f"Index directory not found: {str(directory)!r}")
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} is not a tfmir index directory: it has no "
                         f"{MANIFEST_FILE} (not an index, or one whose save did not finish).")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{str(path)!r} does not hold a JSON object.")
    return manifest


def is_style_database(directory) -> bool:
    """Whether `directory` holds a style database (its manifest says kind "style")."""
    try:
        return read_manifest(directory).get("kind") == KIND
    except (ValueError, OSError):
        return False


def _table(count, ids, labels, sources, paths) -> tuple:
    ids = [_as_id(item) for item in _column(ids, "ids", count, required=True)]
    seen, repeated = set(), []
    for item in ids:
        if item in seen:
            repeated.append(item)
        seen.add(item)
    if repeated:
        raise ValueError(f"Duplicate ids: {sorted(set(map(str, repeated)))[:10]}")
    columns = [[_as_cell(value, name) for value in _column(values, name, count)]
               for name, values in (("labels", labels), ("sources", sources), ("paths", paths))]
    return (ids, *columns)


def _refuse_non_finite(array: np.ndarray, name: str):
    finite = np.isfinite(array).reshape(array.shape[0], -1).all(axis=1)
    if not finite.all():
        rows = np.flatnonzero(~finite)[:10].tolist()
        raise ValueError(f"{name} has NaN or infinite values in rows {rows}")


def _check_positive_int(name: str, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")




class StyleFeatureExtractor:
    """A style model and an optional segmenter, loaded from `.keras` files, applied to images.

    Both see the same preprocessed crop (`tfmir.data.make_dataset`, evaluation: resize to
    `resize_size`, central crop to the style model's input side); the segmenter gets that crop
    resized (bilinear) to its own input side when it has one, and its probabilities are resized
    (bilinear, antialiased) to `mask_size` × `mask_size` and thresholded at 0.5, the grid the
    database stores.

    Args:
        model: a `.keras` style model: a dict with "embedding" and "gram_1".."gram_L" outputs
            (`tfmir.models.gram_outputs`), e.g. `tfmir.models.StyleEnsemble`.
        segmenter: a `.keras` model from (B, S, S, 3) pixels to (B, S, S, 1) lesion
            probabilities (or a dict with a "mask" output), or None.
        resize_size: resize side (default: `config.json` beside the style model).
        batch_size: images per model call.
        mask_size: side of the mask grid returned.
        loaded_model: the model already loaded from `model` (saves loading it again).

    Attributes:
        fingerprint, segmenter_fingerprint: `tfmir.export.model_fingerprint` of each (None
            without a segmenter); preprocessing: `tfmir.data.query_preprocessing`; channels:
            C_l of each Gram output; dimension: D; description: the models, for messages.

    Example:

    ```python
    extract = StyleFeatureExtractor("ensemble.keras", "segmenter.keras", resize_size=400)
    fields = extract(examples)  # "vector" (N, D), "grams" [(N, C_l, C_l), ...], "mask" (N, 64, 64)
    ```
    """

    def __init__(self, model, segmenter=None, *, resize_size: int | None = None,
                 batch_size: int = 32, mask_size: int = DEFAULT_MASK_SIZE, loaded_model=None):
        from tfmir.data import query_preprocessing
        from tfmir.export import model_fingerprint
        from tfmir.index.embedding import read_resize_size
        from tfmir.models import EMBEDDING, gram_outputs, output_names, output_shape

        _check_positive_int("batch_size", batch_size)
        _check_positive_int("mask_size", mask_size)
        model = os.fspath(model)
        self.resize_size = read_resize_size(model, resize_size)
        self.model = loaded_model if loaded_model is not None else load_keras_model(model, "model")
        self.gram_names = gram_outputs(self.model)
        if not self.gram_names or EMBEDDING not in output_names(self.model):
            raise ValueError(f"{model} is not a style model: expected an {EMBEDDING!r} output "
                             "and Gram matrix outputs 'gram_1', 'gram_2', .... Received a model "
                             f"with outputs {list(output_names(self.model)) or ['(one tensor)']}")
        self.image_size = getattr(self.model, "image_size", None) or int(
            self.model.inputs[0].shape[1])
        self.channels = [int(output_shape(self.model, name)[-1]) for name in self.gram_names]
        self.dimension = int(output_shape(self.model, EMBEDDING)[-1])
        self.fingerprint = model_fingerprint(self.model)
        self.preprocessing = query_preprocessing(image_size=self.image_size,
                                                 resize_size=self.resize_size)
        self.batch_size = int(batch_size)
        self.mask_size = int(mask_size)
        self.description = f"style model {model} (resize_size {self.resize_size})"
        self.segmenter = self.segmenter_fingerprint = None
        if segmenter is not None:
            segmenter = os.fspath(segmenter)
            self.segmenter = load_keras_model(segmenter, "segmenter")
            self.segmenter_fingerprint = model_fingerprint(self.segmenter)
            self.description += f" and segmenter {segmenter}"
        self._functions = None

    def _traced(self):
        if self._functions is None:
            import tensorflow as tf

            from tfmir.models import EMBEDDING, MASK, select_output

            signature = [tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.float32)]
            names = (EMBEDDING, *self.gram_names)

            @tf.function(input_signature=signature)
            def style(images):
                outputs = self.model(images, training=False)
                return {name: outputs[name] for name in names}

            segment = None
            if self.segmenter is not None:
                side = self.segmenter.inputs[0].shape[1]

                @tf.function(input_signature=signature)
                def segment_images(images):
                    if side is not None and side != self.image_size:
                        images = tf.image.resize(images, (side, side), method="bilinear")
                    probabilities = select_output(self.segmenter(images, training=False), MASK)
                    return tf.image.resize(tf.cast(probabilities, tf.float32),
                                           (self.mask_size, self.mask_size), method="bilinear",
                                           antialias=True)

                segment = segment_images
            self._functions = style, segment
        return self._functions

    def __call__(self, examples) -> dict:
        """{"vector": float32 (N, D), "grams": L float32 (N, C_l, C_l), "mask": bool (N, S, S)
        or None} for the items of `examples` (`tfmir.data.Examples`), in order."""
        from tfmir.data import make_dataset
        from tfmir.models import EMBEDDING

        style, segment = self._traced()
        vectors, grams, masks = [], [[] for _ in self.gram_names], []
        dataset = make_dataset(examples, training=False, batch_size=self.batch_size,
                               image_size=self.image_size, resize_size=self.resize_size,
                               fields=("image",))
        for element in dataset:
            outputs = style(element["image"])
            vectors.append(outputs[EMBEDDING].numpy())
            for layer, name in enumerate(self.gram_names):
                grams[layer].append(outputs[name].numpy())
            if segment is not None:
                masks.append(segment(element["image"]).numpy()[..., 0] > MASK_THRESHOLD)
        if not vectors:
            return {"vector": np.zeros((0, self.dimension), np.float32),
                    "grams": [np.zeros((0, c, c), np.float32) for c in self.channels],
                    "mask": None if segment is None else
                    np.zeros((0, self.mask_size, self.mask_size), bool)}
        return {"vector": np.concatenate(vectors).astype(np.float32),
                "grams": [np.concatenate(layer).astype(np.float32) for layer in grams],
                "mask": np.concatenate(masks) if masks else None}


def load_keras_model(path: str, what: str = "model"):
    """A `.keras` file loaded with tfmir's classes registered, or a one-line ValueError."""
    import zipfile

    if not os.path.isfile(path) or not path.endswith(".keras"):
        raise ValueError(f"{what} {path} is not a .keras file (a style model and its segmenter "
                         "are read from .keras checkpoints).")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a valid .keras file (not a zip archive); it may be "
                         "truncated or corrupted.")
    import importlib

    import keras

    importlib.import_module("tfmir.models")  # registers tfmir's Keras classes for loading
    try:
        return keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types for a bad archive
        raise ValueError(f"could not load {path} as a Keras model: "
                         f"{type(error).__name__}: {error}") from error
