"""Hamming-distance search over packed binary codes (Y-Net hash codes)."""

import math
import numbers

import faiss
import numpy as np

from tfmir.index.base import Index


def pack_bits(codes, num_bits: int) -> np.ndarray:
    """Packs binary codes into uint64 words, 64 bits per word, zero-padded.

    Bit i of a code lands in byte i // 8 (most significant bit first, as
    `np.packbits`), and every 8 bytes are read as one little-endian uint64, so
    the same code always gives the same words on every machine. Bits past
    `num_bits` are zero, so they never add to a distance.

    Args:
        codes: One of
            - bits, shape (N, num_bits): bool, {0, 1}, or {-1, +1} (the sign of a
              tanh / sign hash layer; -1 becomes 0 and +1 becomes 1);
            - packed bytes, uint8 of shape (N, ceil(num_bits / 8)), as
              `np.packbits(bits, axis=1)` gives;
            - packed words, uint64 of shape (N, ceil(num_bits / 64)), as this
              function returns.
            A single code of any of these forms may be given as 1-D.
        num_bits: Code length in bits. Lengths that are not a multiple of 8
            (e.g. the 36-bit setting of the Y-Net paper) are padded with zeros.

    Returns:
        uint64 array (N, ceil(num_bits / 64)).

    Raises:
        ValueError: on values other than {0, 1} / {-1, 1} / bool, a width that
            fits none of the forms, or packed input with non-zero padding bits.

    Example:

    >>> pack_bits([[1, 0, 0, 0, 0, 0, 0, 1]], num_bits=8)
    array([[129]], dtype=uint64)
    """
    if not isinstance(num_bits, numbers.Integral) or isinstance(num_bits, bool) or num_bits <= 0:
        raise ValueError(f"num_bits must be a positive integer. Received: num_bits={num_bits!r}")
    codes = np.asarray(codes)
    if codes.ndim == 1:
        codes = codes[None, :]
    num_bytes = math.ceil(num_bits / 8)
    num_words = math.ceil(num_bits / 64)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D (N, bits). Received: codes.shape={codes.shape}")
    width = codes.shape[1]
    if width == num_bits:
        packed_bytes = np.packbits(_as_bits(codes), axis=1)
    elif width == num_bytes and codes.dtype == np.uint8:
        packed_bytes = codes
    elif width == num_words and codes.dtype == np.uint64:
        words = np.ascontiguousarray(codes, dtype="<u8")
        packed_bytes = words.view(np.uint8).reshape(codes.shape[0], num_words * 8)[:, :num_bytes]
    else:
        raise ValueError(
            f"codes for {num_bits}-bit codes must be bits of shape (N, {num_bits}), uint8 "
            f"bytes of shape (N, {num_bytes}) or uint64 words of shape (N, {num_words}). "
            f"Received: codes.shape={codes.shape}, codes.dtype={codes.dtype}"
        )
    padding_bits = num_bytes * 8 - num_bits
    if width != num_bits and packed_bytes.shape[0]:
        if padding_bits and np.any(packed_bytes[:, -1] & np.uint8((1 << padding_bits) - 1)):
            raise ValueError(
                f"Packed codes have non-zero padding bits beyond bit {num_bits}; pack the bits "
                "with np.packbits (zero padding) or give them unpacked."
            )
        if codes.dtype == np.uint64:
            tail = np.ascontiguousarray(codes, dtype="<u8").view(np.uint8)
            tail = tail.reshape(codes.shape[0], num_words * 8)[:, num_bytes:]
            if np.any(tail):
                raise ValueError(
                    f"Packed codes have non-zero padding bits beyond bit {num_bits}."
                )
    padded = np.zeros((packed_bytes.shape[0], num_words * 8), dtype=np.uint8)
    padded[:, :num_bytes] = packed_bytes
    return padded.view("<u8")


def _as_bits(codes):
    if codes.dtype == bool:
        return codes
    if not np.issubdtype(codes.dtype, np.number):
        raise ValueError(f"codes must be bool or numeric. Received: codes.dtype={codes.dtype}")
    is_one = codes == 1
    # {0, 1} and {-1, +1} codes both map +1 to a set bit; a mix of 0 and -1 is refused.
    if np.all(is_one | (codes == 0)) or np.all(is_one | (codes == -1)):
        return is_one
    bad = np.unique(codes[~(is_one | (codes == 0) | (codes == -1))])
    if bad.size == 0:
        bad = np.array([0, -1])
    raise ValueError(
        "Bit codes must hold only {0, 1}, only {-1, +1}, or bools. "
        f"Received values such as: {bad[:10].tolist()} (real-valued embeddings or tanh codes "
        "become bits by their signs: tfmir.index.sign_codes)"
    )


def sign_codes(embeddings) -> np.ndarray:
    """Binary codes of real-valued embeddings: bit i is set where component i is positive.

    The sign is how an embedding model's output becomes a code for a `HammingIndex`
    (`tfmir index --kind=hamming`, and the queries of `tfmir search` and `tfmir serve`):
    D-dimensional embeddings give D-bit codes, and the Hamming distance counts the
    components whose signs differ. Bit codes already binary ({0, 1}, {-1, +1}, bool)
    come back unchanged (as bools), so the codes of a hashing model can go through it too.

    Args:
        embeddings: Array (N, D) or one vector (D,) of finite numbers.

    Returns:
        bool array of the same shape, `embeddings > 0`.

    Raises:
        ValueError: on NaN or infinite values.

    Example:

    >>> sign_codes([[0.3, -0.1, 0.0, 2.0]])
    array([[ True, False, False,  True]])
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if not np.all(np.isfinite(embeddings)):
        raise ValueError("embeddings have NaN or infinite values; they have no sign code.")
    return embeddings > 0


class HammingIndex(Index):
    """Exact Hamming-distance search over binary codes packed into uint64 words.

    Codes are stored packed (`pack_bits`); the distance of a query to every
    item is the popcount of their XOR, computed on the packed words by faiss's
    exhaustive Hamming k-NN (`faiss.knn_hamming`, the search of faiss
    `IndexBinaryFlat`, queries spread over every core) — never on floats.
    Memory is O(batch_size × k) beside the codes. `add` appends codes; there is
    nothing to rebuild.

    Score: the Hamming distance, an integer number of differing bits (lower is
    better). Equal distances come in row order: faiss scans each query's items
    in row order and lets a new item into its heap of the k best only at a
    strictly smaller distance than the worst kept, so among equal distances the
    lower rows stay, and the heap is sorted by (distance, row) at the end (faiss
    1.15's code; tests hold it to a NumPy brute force with many ties).

    Args:
        metric: `"hamming"`, the only one.
        dimension: Code length in bits (e.g. 36, 64, 128, 256). Lengths that are
            not a multiple of 8 are padded with zero bits; the manifest keeps the
            true length as `dimension` (and `num_bits` in the searcher entry).
        model_fingerprint: Identifies the model that made the codes.
        batch_size: Queries per faiss call; None: all of them in one call
            (fewest passes over the codes; memory O(queries × k), the size of
            the results).

    Example:

    >>> index = HammingIndex(dimension=8).build(
    ...     [[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]], ids=["a", "b"])
    >>> [(hit["id"], hit["score"]) for hit in index.search([[1, 1, 1, 0, 0, 0, 0, 0]], k=2)[0]]
    [('a', 1), ('b', 7)]

    Reference:
        Fang et al., "Combating Ambiguity for Hash-code Learning in Medical
        Instance Retrieval" (Y-Net hash codes; 36/64/128/256 bits).
    """

    kind = "hamming"
    metrics = ("hamming",)
    data_file = "codes.npy"
    default_settings = {"batch_size": None}

    def __init__(
        self,
        *,
        metric: str = "hamming",
        dimension: int,
        model_fingerprint: str | None = None,
        preprocessing: dict | None = None,
        **settings,
    ):
        super().__init__(
            metric=metric, dimension=dimension, model_fingerprint=model_fingerprint,
            preprocessing=preprocessing, **settings,
        )

    @property
    def num_bits(self) -> int:
        return self.dimension

    @property
    def num_words(self) -> int:
        return math.ceil(self.dimension / 64)

    def _validate_settings(self):
        batch_size = self.settings["batch_size"]
        if batch_size is not None and (
            not isinstance(batch_size, numbers.Integral)
            or isinstance(batch_size, bool)
            or batch_size <= 0
        ):
            raise ValueError(
                "batch_size must be a positive integer or None. "
                f"Received: batch_size={batch_size!r}"
            )

    def _prepare_vectors(self, vectors, name):
        try:
            return pack_bits(vectors, self.dimension)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None

    def _loaded_data(self, data):
        if data.dtype != np.dtype("<u8") or data.ndim != 2 or data.shape[1] != self.num_words:
            raise ValueError(
                f"codes.npy must be uint64 (count, {self.num_words}) for {self.dimension}-bit "
                f"codes. Found dtype={data.dtype}, shape={data.shape}"
            )
        return np.ascontiguousarray(data)

    def _build_searcher(self, data):
        pass  # the packed codes are the searcher

    def _extend_searcher(self, all_data, new_data):
        pass

    def _read_searcher(self, directory, manifest):
        pass

    def _searcher_state(self):
        return {"num_bits": self.dimension, "num_words": self.num_words, "word": "<u8"}

    def _score_dtype(self):
        return np.int32

    def _search(self, queries, k):
        # faiss counts bits over bytes: the packed words are read as their 8 bytes each.
        codes = self._data.view(np.uint8)
        queries = np.ascontiguousarray(queries).view(np.uint8)
        num_queries = queries.shape[0]
        batch_size = self.settings["batch_size"] or num_queries
        all_distances = np.empty((num_queries, k), dtype=np.int32)
        all_rows = np.empty((num_queries, k), dtype=np.int64)
        for start in range(0, num_queries, batch_size):
            stop = min(start + batch_size, num_queries)
            all_distances[start:stop], all_rows[start:stop] = faiss.knn_hamming(
                queries[start:stop], codes, k
            )
        return all_distances, all_rows
