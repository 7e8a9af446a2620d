"""Compact Gram storage: weighted upper triangles whose squared distance is the style loss.

A Gram matrix is symmetric, so the style loss over a full matrix counts every off-diagonal
difference twice: Σ_ij d_ij² = Σ_i d_ii² + 2 Σ_{i<j} d_ij². Packing keeps the upper triangle
(diagonal included) of each layer, multiplies every entry by its layer weight β_l and the
off-diagonal ones by sqrt(2), and concatenates the layers. The squared Euclidean distance
between two packed vectors is then the style loss of eq. 6, and an archive of N items is one
(N, P) matrix with P = Σ_l C_l (C_l + 1) / 2, about half the full size, that any
nearest-neighbour index can hold.

Float16 halves it again. Each stored entry is then rounded with relative error at most
u = 2⁻¹¹ (≈ 4.9e-4), so with the query packed in float64 and e the rounding of the packed
database item y, |LS₁₆ − LS| = |2 d·e + ‖e‖²| <= 2 u ‖y‖ sqrt(LS) + u² ‖y‖² (entries below
6.1e-5 are subnormal: their error is up to 2⁻²⁵ absolute instead). The roundings of different
entries mostly cancel in d·e, so in practice the error is far below that bound and shrinks as
P grows. Measured (4 seeds × 100 items) on Grams of random correlated features normalised by
H·W (144 positions; entries up to ~20, median ~0.5): between unrelated images the relative
error of the loss has median 2e-6 and maximum 1.5e-5 for C_l = 32, 40, 72, 144, 200, and
median 7e-6, maximum 4e-5 for C_l = 32, 40, 72 (float32: ~1e-9). Between near-duplicates
(Gram differences ~1e-3 of the entries) it reaches 11% of their tiny loss, yet the style score
1 − LS/LS_max of a database holding both kinds moves by at most 5e-5.
Unnormalised Grams (sums over positions) overflow float16 (largest finite value 65504):
packing refuses them and suggests float32.
"""

import numbers
from collections.abc import Sequence

import numpy as np

from tfmir.similarity.style import _layer_weights

PACKED_DTYPES = ("float16", "float32", "float64")

# Blocks of database items are converted to float64 this many elements at a time, so a
# 10k × 80k float16 archive never needs a 6.4 GB float64 copy.
_CHUNK_ELEMENTS = 1 << 22

# Gram matrices computed in float32 (or float16 under mixed precision) are symmetric only up to
# rounding; anything far beyond that is not a Gram matrix (e.g. transposed feature maps).
_SYMMETRY_TOLERANCE = 1e-2


def packed_size(channels: Sequence[int]) -> int:
    """Length P = Σ_l C_l (C_l + 1) / 2 of one item's packed Gram matrices.

    Args:
        channels: C_l, the number of channels of each Gram layer.

    Returns:
        P, the number of upper-triangle entries (diagonal included) over all layers.

    Example:

    >>> packed_size([2, 3])  # 3 + 6
    9
    """
    values = list(channels) if not isinstance(channels, (str, numbers.Number)) else []
    if not values or not all(isinstance(c, numbers.Integral) and not isinstance(c, bool)
                             and c >= 1 for c in values):
        raise ValueError(f"channels must be a non-empty sequence of integers >= 1. "
                         f"Received: channels={channels!r}")
    return sum(int(c) * (int(c) + 1) // 2 for c in values)


def pack_grams(grams: Sequence, layer_weights: Sequence[float] | None = None,
               dtype: str = "float16") -> np.ndarray:
    """Packs N items' L Gram matrices into (N, P) rows whose squared distance is the style loss.

    Per item and layer l the upper triangle of G_l (diagonal included, row by row) is stored
    as β_l G_ij on the diagonal and sqrt(2) β_l G_ij off it, so that
    `((packed_x - packed_y) ** 2).sum(-1)` equals `style_losses` with the same layer weights
    (exactly, in exact arithmetic; see the module docstring for float16's error).

    Args:
        grams: L arrays, layer l of shape (N, C_l, C_l), symmetric up to rounding.
        layer_weights: β_l, L finite numbers >= 0; None weighs every layer 1. A database and the
            queries compared with it must be packed with the same weights.
        dtype: "float16" (default: a quarter of the full float32 size), "float32" or "float64".

    Returns:
        array (N, P) of `dtype`, P = `packed_size([C_1, ..., C_L])`.

    Example:

    >>> gram = np.array([[[1.0, 2.0], [2.0, 3.0]]])
    >>> pack_grams([gram], dtype="float64")  # G_00, sqrt(2)·G_01, G_11
    array([[1.        , 2.82842712, 3.        ]])

    Reference:
        Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data
        using Style Transfer, Semantic Image Segmentation and Ensemble Learning", 2021,
        https://arxiv.org/abs/2110.06331, eq. 6 (the style loss this storage preserves).
    """
    if not isinstance(dtype, str) or dtype not in PACKED_DTYPES:
        raise ValueError(f"dtype must be one of {PACKED_DTYPES}. Received: dtype={dtype!r}")
    grams = _database_grams(grams)
    weights = _layer_weights(layer_weights, len(grams))
    num_items = grams[0].shape[0]
    channels = [gram.shape[1] for gram in grams]
    largest = float(np.finfo(dtype).max)
    packed = np.empty((num_items, packed_size(channels)), dtype)
    offset = 0
    for layer, (gram, weight) in enumerate(zip(grams, weights)):
        rows, columns = np.triu_indices(gram.shape[1])
        scale = weight * np.where(rows == columns, 1.0, np.sqrt(2.0))
        chunk = max(1, _CHUNK_ELEMENTS // gram[0].size)
        for start in range(0, num_items, chunk):
            block = np.asarray(gram[start:start + chunk], np.float64)
            _check_gram_block(block, layer, start)
            # The mean of G_ij and G_ji is G_ij for an exactly symmetric matrix and the closest
            # symmetric one otherwise.
            values = (block[:, rows, columns] + block[:, columns, rows]) / 2 * scale
            peak = np.abs(values).max(axis=1)
            if peak.max() > largest:
                item = start + int(np.argmax(peak))
                raise ValueError(
                    f"packed Gram values reach {peak.max():.4g} (layer {layer}, item {item}), "
                    f"above {dtype}'s largest finite value {largest:.6g}; pack with "
                    "dtype='float32', or scale the Gram matrices down (e.g. normalise them by "
                    "the number of positions H·W)"
                )
            packed[start:start + chunk, offset:offset + rows.size] = values
        offset += rows.size
    return packed


def unpack_grams(packed, channels: Sequence[int],
                 layer_weights: Sequence[float] | None = None) -> list[np.ndarray]:
    """Rebuilds the full symmetric Gram matrices from `pack_grams` rows (its inverse).

    Args:
        packed: array (N, P) from `pack_grams`.
        channels: C_l of each layer, in packing order.
        layer_weights: the β_l used for packing (None: all 1); every β_l must be > 0, since a
            layer packed with weight 0 stored only zeros.

    Returns:
        L float64 arrays, layer l of shape (N, C_l, C_l).

    Example:

    >>> unpack_grams([[1.0, 2.0 * np.sqrt(2.0), 3.0]], channels=[2])[0]
    array([[[1., 2.],
            [2., 3.]]])
    """
    size = packed_size(channels)
    packed = np.asarray(packed)
    if packed.ndim != 2 or packed.shape[1] != size:
        raise ValueError(f"packed must have shape (N, {size}) for channels={list(channels)}. "
                         f"Received: packed.shape={packed.shape}")
    weights = _layer_weights(layer_weights, len(channels))
    if np.any(weights == 0):
        raise ValueError("layer_weights must all be > 0 to unpack: a layer packed with weight 0 "
                         f"stored only zeros. Received: layer_weights={layer_weights!r}")
    grams = []
    offset = 0
    for num_channels, weight in zip(channels, weights):
        rows, columns = np.triu_indices(num_channels)
        scale = weight * np.where(rows == columns, 1.0, np.sqrt(2.0))
        values = packed[:, offset:offset + rows.size].astype(np.float64) / scale
        gram = np.empty((packed.shape[0], num_channels, num_channels))
        gram[:, rows, columns] = values
        gram[:, columns, rows] = values
        grams.append(gram)
        offset += rows.size
    return grams


def style_losses_packed(query_packed, database_packed) -> np.ndarray:
    """Style losses as squared distances between packed rows, accumulated in float64.

    Equals `style_losses` on the unpacked Grams when both sides were packed with the same
    layer weights. The database (float16, float32 or float64) is converted a block of rows at
    a time, never as a whole.

    Args:
        query_packed: the query's packed Grams, shape (P,) (pack it in float64 for accuracy).
        database_packed: N items' packed Grams, shape (N, P), N >= 1.

    Returns:
        float64 array (N,) of style losses >= 0.

    Example:

    >>> query = pack_grams([np.eye(2)[None]], dtype="float64")[0]
    >>> database = pack_grams([np.array([np.eye(2), [[1.0, 2.0], [2.0, 1.0]]])], dtype="float64")
    >>> style_losses_packed(query, database)  # (sqrt(2)·2)² = 2² + 2²
    array([0., 8.])
    >>> database = pack_grams([np.array([np.eye(2), [[1.0, 2.0], [2.0, 1.0]]])])  # float16
    >>> style_losses_packed(query, database)  # sqrt(2)·2 is stored as 2.828125
    array([0.        , 7.99829102])

    Reference:
        Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data
        using Style Transfer, Semantic Image Segmentation and Ensemble Learning", 2021,
        https://arxiv.org/abs/2110.06331, eq. 6.
    """
    query = np.asarray(query_packed, np.float64)
    database = np.asarray(database_packed)
    if (query.ndim != 1 or database.ndim != 2 or database.shape[0] == 0
            or database.shape[1] != query.shape[0]):
        raise ValueError(
            "query_packed must be (P,) and database_packed (N, P) with the same P and N >= 1 "
            "(both packed from the same Gram layers). "
            f"Received: query_packed.shape={query.shape}, database_packed.shape={database.shape}"
        )
    if not np.all(np.isfinite(query)):
        raise ValueError(
            "the query's packed Grams contain NaN or inf; the feature extractor produced a "
            "non-finite output (e.g. a blank or all-black image normalised by zero)"
        )
    num_items = database.shape[0]
    losses = np.empty(num_items)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, query.size))
    for start in range(0, num_items, chunk):
        differences = database[start:start + chunk].astype(np.float64) - query
        losses[start:start + chunk] = np.einsum("np,np->n", differences, differences)
    if not np.all(np.isfinite(losses)):
        item = int(np.flatnonzero(~np.isfinite(losses))[0])
        if not np.all(np.isfinite(database[item])):
            raise ValueError(
                f"database item {item}'s packed Grams contain NaN or inf; they were probably "
                "computed from a degenerate image (e.g. blank or all black) or stored in a "
                "dtype too small for them"
            )
        raise ValueError(f"the style loss to database item {item} overflowed float64; "
                         "scale the Gram matrices down")
    return losses


def _database_grams(grams) -> list[np.ndarray]:
    """L arrays (N, C_l, C_l) with the same N >= 1, kept in their own dtype."""
    if isinstance(grams, np.ndarray):
        raise ValueError("grams must be a sequence of L arrays (N, C_l, C_l), one per layer. "
                         f"Received: one array of shape {grams.shape}")
    grams = [np.asarray(gram) for gram in grams]
    shapes = [gram.shape for gram in grams]
    if not grams or not all(
            gram.ndim == 3 and gram.shape[1] == gram.shape[2] and gram.shape[1] >= 1
            and gram.shape[0] == shapes[0][0] and gram.shape[0] >= 1 for gram in grams):
        raise ValueError("grams must be L >= 1 arrays (N, C_l, C_l) with the same N >= 1. "
                         f"Received shapes: {shapes}")
    return grams


def _check_gram_block(block: np.ndarray, layer: int, start: int):
    """Refuses non-finite and clearly non-symmetric Gram matrices, naming the item."""
    finite = np.isfinite(block).all(axis=(1, 2))
    if not finite.all():
        item = start + int(np.argmin(finite))
        raise ValueError(
            f"item {item}'s Gram matrix of layer {layer} contains NaN or inf; it was probably "
            "computed from a degenerate image (e.g. blank or all black, normalised by zero)"
        )
    asymmetry = np.abs(block - block.transpose(0, 2, 1)).max(axis=(1, 2))
    magnitude = np.abs(block).max(axis=(1, 2))
    bad = asymmetry > _SYMMETRY_TOLERANCE * magnitude
    if bad.any():
        item = start + int(np.argmax(bad))
        raise ValueError(
            f"item {item}'s Gram matrix of layer {layer} is not symmetric (max |G − Gᵀ| = "
            f"{asymmetry[bad][0]:.3g}, max |G| = {magnitude[bad][0]:.3g}); pass Gram matrices "
            "F^T F, not feature maps or other square arrays"
        )
