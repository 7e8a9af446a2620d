"""HammingIndex and pack_bits against an explicit Python loop over unpacked bits."""

import json

import numpy as np
import pytest

from tfmir.index import HammingIndex
from tfmir.index import Index
from tfmir.index import pack_bits
from tfmir.index import sign_codes


def loop_search(queries, codes, k):
    """Counts differing bits one by one; ties go to the lower row. Returns (distances, rows)."""
    all_distances, all_rows = [], []
    for query in queries:
        distances = []
        for row, code in enumerate(codes):
            differing = 0
            for query_bit, code_bit in zip(query, code):
                if bool(query_bit > 0) != bool(code_bit > 0):
                    differing += 1
            distances.append((differing, row))
        distances.sort()
        all_distances.append([distance for distance, _ in distances[:k]])
        all_rows.append([row for _, row in distances[:k]])
    return np.array(all_distances), np.array(all_rows)


@pytest.mark.parametrize("num_bits", [36, 64, 100])
@pytest.mark.parametrize("form", ["binary", "signs", "bool"])
def test_matches_python_loop(num_bits, form):
    rng = np.random.default_rng(num_bits)
    bits = rng.integers(0, 2, size=(150, num_bits))
    # Near-duplicates of a few codes make small distances and ties likely.
    bits[100:] = bits[:50] ^ (rng.random((50, num_bits)) < 0.05)
    queries = bits[rng.choice(150, size=12, replace=False)] ^ (rng.random((12, num_bits)) < 0.1)
    convert = {
        "binary": lambda b: b,
        "signs": lambda b: np.where(b == 1, 1.0, -1.0).astype("float32"),
        "bool": lambda b: b.astype(bool),
    }[form]
    index = HammingIndex(dimension=num_bits, batch_size=5)
    index.build(convert(bits[:90]), ids=range(90)).add(convert(bits[90:]), ids=range(90, 150))
    distances, rows = index.search_arrays(convert(queries), k=15)
    expected_distances, expected_rows = loop_search(queries, bits, 15)
    np.testing.assert_array_equal(distances, expected_distances)
    np.testing.assert_array_equal(rows, expected_rows)
    assert distances.dtype == np.int32
    hits = index.search(convert(queries[:1]), k=2)[0]
    assert [hit["score"] for hit in hits] == expected_distances[0, :2].tolist()


def test_hand_example_and_ties_in_row_order():
    codes = [
        [1, 1, 1, 1, 0, 0, 0, 0],  # distance 1 from the query
        [0, 0, 0, 0, 1, 1, 1, 1],  # 7
        [1, 1, 0, 0, 0, 0, 0, 0],  # 1
        [1, 1, 1, 0, 0, 0, 0, 0],  # 0
    ]
    index = HammingIndex(dimension=8).build(codes, ids=["a", "b", "c", "d"])
    hits = index.search([[1, 1, 1, 0, 0, 0, 0, 0]], k=4)[0]
    assert [(hit["id"], hit["score"]) for hit in hits] == [("d", 0), ("a", 1), ("c", 1), ("b", 7)]


def test_all_equal_codes_tie_in_row_order():
    index = HammingIndex(dimension=16, batch_size=1).build(np.zeros((40, 16)), ids=range(40))
    _, rows = index.search_arrays(np.ones((3, 16)), k=7)
    np.testing.assert_array_equal(rows, np.tile(np.arange(7), (3, 1)))


def numpy_search(queries, codes, k):
    """NumPy brute force on packed words: popcount by np.unpackbits, stable sort (row order)."""
    all_distances, all_rows = [], []
    for query in queries:
        differing = np.bitwise_xor(codes, query[None, :]).view(np.uint8)
        distances = np.unpackbits(differing, axis=1).sum(axis=1)
        rows = np.argsort(distances, kind="stable")[:k]
        all_distances.append(distances[rows])
        all_rows.append(rows)
    return np.array(all_distances), np.array(all_rows)


@pytest.mark.parametrize("num_words", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [None, 1, 7])
def test_ties_in_row_order_over_many_codes(num_words, batch_size):
    # 70,000 codes (more than faiss scans per block, 65,536) made of 30 codes with 0-3 bits
    # flipped: thousands of exact duplicates and ties at every distance, far past k.
    rng = np.random.default_rng(num_words)
    maximum = np.iinfo(np.uint64).max
    base = rng.integers(0, maximum, size=(30, num_words), dtype=np.uint64, endpoint=True)
    codes = base[rng.integers(0, 30, size=70_000)]
    for _ in range(3):
        bits = rng.integers(0, 64, size=codes.shape).astype(np.uint64)
        codes ^= np.where(rng.random(codes.shape) < 0.3, np.uint64(1) << bits, np.uint64(0))
    queries = codes[rng.choice(70_000, size=9, replace=False)] ^ np.uint64(0b101)
    index = HammingIndex(dimension=64 * num_words, batch_size=batch_size)
    index.build(codes[:40_000], ids=range(40_000)).add(codes[40_000:], ids=range(40_000, 70_000))
    for k in (1, 10, 300):
        expected_distances, expected_rows = numpy_search(queries, codes, k)
        distances, rows = index.search_arrays(queries, k)
        np.testing.assert_array_equal(rows, expected_rows)
        np.testing.assert_array_equal(distances, expected_distances)
    distances, rows = index.search_arrays(queries[4], 10)
    np.testing.assert_array_equal(rows, numpy_search(queries[4:5], codes, 10)[1])


def test_pack_bits_layout():
    # 36 bits pad to 40 (5 bytes), then to one 64-bit word; bit 0 is the first byte's MSB.
    bits = np.zeros((1, 36), dtype=int)
    bits[0, 0] = 1
    bits[0, 35] = 1
    words = pack_bits(bits, num_bits=36)
    assert words.dtype == np.dtype("<u8") and words.shape == (1, 1)
    np.testing.assert_array_equal(words.view(np.uint8)[0], [0x80, 0, 0, 0, 0x10, 0, 0, 0])
    # Packed bytes and packed words give the same words.
    np.testing.assert_array_equal(pack_bits(np.packbits(bits, axis=1), num_bits=36), words)
    np.testing.assert_array_equal(pack_bits(words, num_bits=36), words)
    assert pack_bits(np.ones((2, 130)), num_bits=130).shape == (2, 3)


@pytest.mark.parametrize("num_bits", [36, 64, 128, 256])
def test_pack_unpack_round_trip_and_popcount_distances(num_bits):
    # Y-Net's code lengths: packed words unpack (little-endian bytes, MSB first) to the bits,
    # padding zero, and the popcount of two codes' XOR, counted bit by bit in Python, is the
    # number of differing bits.
    rng = np.random.default_rng(num_bits)
    bits = rng.integers(0, 2, size=(6, num_bits))
    words = pack_bits(np.where(bits == 1, 1.0, -1.0), num_bits=num_bits)
    unpacked = np.unpackbits(words.view(np.uint8), axis=1)
    np.testing.assert_array_equal(unpacked[:, :num_bits], bits)
    assert not unpacked[:, num_bits:].any()
    for first in range(6):
        for second in range(6):
            popcount = sum(bin(int(a) ^ int(b)).count("1")
                           for a, b in zip(words[first], words[second]))
            assert popcount == int(np.sum(bits[first] != bits[second]))


def test_packed_input_searches_like_bits():
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2, size=(60, 36))
    from_bits = HammingIndex(dimension=36).build(bits, ids=range(60))
    from_bytes = HammingIndex(dimension=36).build(np.packbits(bits, axis=1), ids=range(60))
    queries = rng.integers(0, 2, size=(5, 36))
    expected = from_bits.search_arrays(queries, k=10)
    for query_form in (queries, np.packbits(queries, axis=1), pack_bits(queries, 36)):
        result = from_bytes.search_arrays(query_form, k=10)
        np.testing.assert_array_equal(result[0], expected[0])
        np.testing.assert_array_equal(result[1], expected[1])


def test_bad_codes_are_refused():
    with pytest.raises(ValueError, match=r"only \{0, 1\}.*\[2\]"):
        pack_bits([[0, 1, 2, 1, 0, 0, 0, 0]], num_bits=8)
    with pytest.raises(ValueError, match=r"only \{0, 1\}, only \{-1, \+1\}"):
        pack_bits([[0, 1, -1, 1, 0, 0, 0, 0]], num_bits=8)
    with pytest.raises(ValueError, match=r"non-zero padding bits"):
        pack_bits(np.array([[0, 0, 0, 0, 0x01]], dtype=np.uint8), num_bits=36)
    with pytest.raises(ValueError, match=r"non-zero padding bits"):
        pack_bits(np.array([[1 << 40]], dtype=np.uint64), num_bits=36)
    with pytest.raises(ValueError, match=r"queries: .*codes.shape=\(1, 35\)"):
        HammingIndex(dimension=36).build(np.zeros((2, 36)), ids=[0, 1]).search(np.zeros((1, 35)), 1)
    # Real-valued queries (an embedding, a hashing model's tanh values) name the fix.
    with pytest.raises(ValueError, match=r"queries: Bit codes must hold only \{0, 1\}, only "
                                         r"\{-1, \+1\}, or bools. Received values such as: "
                                         r"\[-0.5, 0.25\] .*tfmir.index.sign_codes"):
        HammingIndex(dimension=2).build([[1, 0]], ids=[0]).search([[0.25, -0.5]], 1)


def test_save_load_keeps_packed_codes(tmp_path):
    rng = np.random.default_rng(4)
    bits = rng.integers(0, 2, size=(80, 36))
    index = HammingIndex(dimension=36, model_fingerprint="ynet-36").build(bits, ids=range(80))
    path = index.save(tmp_path / "codes")
    codes = np.load(path / "codes.npy")
    assert codes.dtype == np.dtype("<u8") and codes.shape == (80, 1)
    np.testing.assert_array_equal(codes, pack_bits(bits, 36))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["dimension"] == 36 and manifest["searcher"]["num_bits"] == 36
    loaded = Index.load(path, expected_dimension=36, expected_metric="hamming")
    queries = rng.integers(0, 2, size=(4, 36))
    np.testing.assert_array_equal(
        loaded.search_arrays(queries, 8)[1], index.search_arrays(queries, 8)[1]
    )


def test_codes_added_after_a_search_are_searched():
    index = HammingIndex(dimension=8).build([[0] * 8, [1] * 8], ids=["zeros", "ones"])
    assert index.search([[1, 1, 1, 1, 1, 1, 1, 0]], k=1)[0][0]["id"] == "ones"
    index.add([[1, 1, 1, 1, 1, 1, 1, 0]], ids=["seven"])  # distance 0 from the same query
    hits = index.search([[1, 1, 1, 1, 1, 1, 1, 0]], k=2)[0]
    assert [(hit["id"], hit["score"]) for hit in hits] == [("seven", 0), ("ones", 1)]


def test_sign_codes_set_the_bits_of_positive_components():
    embeddings = [[0.5, -0.5, 0.0, 1e-9], [-2.0, 3.0, -0.0, -1e-9]]
    np.testing.assert_array_equal(
        sign_codes(embeddings), [[True, False, False, True], [False, True, False, False]]
    )
    # Codes already binary come back as the same bits.
    bits = np.array([[1, 0, 1, 1]])
    np.testing.assert_array_equal(sign_codes(bits), bits == 1)
    np.testing.assert_array_equal(sign_codes(np.where(bits == 1, 1, -1)), bits == 1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        sign_codes([[0.5, np.nan]])
