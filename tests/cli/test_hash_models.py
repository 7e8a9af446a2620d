"""A model that outputs hash codes (and a mask), end to end: export, index, search, serve, evaluate.

The model is the stand-in of `tests.models.stand_ins.hash_model` (36 bits, not a multiple of 8,
and a mask), saved as `.keras` with its config.json, over a folder of 16 synthetic PNGs in two
class folders (whose 16 codes are distinct, so every image finds itself first). The oracle of `tfmir evaluate` ranks the index's packed codes by an explicit
popcount loop over their bytes, equal distances in gallery order.
"""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from tests.models.stand_ins import hash_model
from tests.serving import FakeTFServing
from tfmir.data import Examples
from tfmir.data.specs import load_specs
from tfmir.export import model_fingerprint
from tfmir.index import ExactIndex, Index
from tfmir.index.embedding import index_kind_for, load_embedding_function
from tfmir.serving import SearchError, SearchService

NUM_BITS, IMAGE_SIZE, RESIZE_SIZE = 36, 16, 20
PER_CLASS = 8


def tfmir(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "tfmir.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)


def assert_refused(result, command, *fragments):
    """One error line on stderr, naming the problem; no traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("tfmir ")]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"tfmir {command}: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The saved stand-in, its export, a folder of PNGs and the `tfmir index --kind=auto` index."""
    root = tmp_path_factory.mktemp("hashing")
    model = hash_model(NUM_BITS, IMAGE_SIZE, seed=2)
    model.save(root / "best.keras")
    (root / "config.json").write_text(json.dumps({"resize_size": RESIZE_SIZE}))
    folder = root / "skin"
    rng = np.random.default_rng(0)
    for name, tint in (("pale", (1.0, 0.6, 0.5)), ("dark", (0.4, 0.5, 1.0))):
        (folder / name).mkdir(parents=True)
        for number in range(PER_CLASS):  # 4 × 4 blocks of tinted random colours, 24 × 24
            blocks = rng.uniform(0, 255, (4, 4, 3)) * tint
            pixels = np.kron(blocks, np.ones((6, 6, 1))).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{name}{number}.png")
    export = tfmir("export", f"--model={root / 'best.keras'}", f"--output={root / 'export'}")
    assert export.returncode == 0, export.stderr[-3000:]
    index = tfmir("index", f"--model={root / 'export'}", f"--data=skin={folder}", "--kind=auto",
                  f"--output={root / 'index'}")
    assert index.returncode == 0, index.stderr[-3000:]
    return {"root": root, "model": model, "checkpoint": root / "best.keras",
            "export": root / "export", "folder": folder, "index": root / "index",
            "export_stdout": export.stdout, "index_stdout": index.stdout}


def _index_codes(index_directory) -> np.ndarray:
    """The packed code bytes in codes.npy, 5 per 36-bit code (the rest of each word is padding)."""
    words = np.load(index_directory / "codes.npy")
    return words.astype("<u8").view(np.uint8)[:, :-(-NUM_BITS // 8)]


def _float_index(directory, fingerprint, preprocessing):
    index = ExactIndex(metric="cosine", dimension=NUM_BITS, model_fingerprint=fingerprint,
                       preprocessing=preprocessing)
    index.build(np.random.default_rng(0).normal(size=(3, NUM_BITS)), ids=["a", "b", "c"])
    index.save(directory)
    return directory


def test_both_model_forms_give_the_same_hash_bits(setup):
    paths = sorted(str(path) for path in setup["folder"].glob("*/*.png"))
    examples = Examples(labels=np.zeros(len(paths), np.int64), sources="x", ids=paths,
                        class_names=("",), paths=paths)
    bits = {}
    for form in ("export", "checkpoint"):
        embed = load_embedding_function(setup[form])
        assert (embed.kind, embed.output, embed.dimension) == ("hash", "code", NUM_BITS)
        bits[form] = embed(examples)
        assert bits[form].dtype == np.float32 and set(np.unique(bits[form])) == {-1.0, 1.0}
    np.testing.assert_array_equal(bits["export"], bits["checkpoint"])
    assert len({row.tobytes() for row in bits["export"]}) == len(paths)  # every code distinct
    assert index_kind_for("auto", embed) == index_kind_for("hamming", embed) == "hamming"
    with pytest.raises(ValueError, match=r"--kind=scann does not fit Keras checkpoint .*: it "
                                         r"retrieves with the 'code' output \(36-bit hash "
                                         r"codes\), searched by Hamming distance; use "
                                         r"--kind=hamming"):
        index_kind_for("scann", embed)


def test_export_and_index_of_a_hash_model(setup):
    assert "code: uint8 [None, 5]" in setup["export_stdout"]
    assert "segment_images(images: string [None]) -> {mask: float32 [None, 16, 16, 1]}" in \
        setup["export_stdout"]
    index = Index.load(setup["index"], expected_model_fingerprint=model_fingerprint(setup["model"]))
    assert (index.kind, index.dimension, len(index)) == ("hamming", NUM_BITS, 2 * PER_CLASS)
    assert "(hamming, hamming, dimension 36" in setup["index_stdout"]
    # The index holds the sign bits of the checkpoint's codes, packed as np.packbits packs them.
    embed = load_embedding_function(setup["checkpoint"])
    paths = index.paths.tolist()
    bits = embed(Examples(labels=np.zeros(len(paths), np.int64), sources="x", ids=paths,
                          class_names=("",), paths=paths))
    np.testing.assert_array_equal(_index_codes(setup["index"]), np.packbits(bits > 0, axis=1))


def test_search_finds_every_image_itself_first(setup):
    queries = sorted(setup["folder"].glob("*/*.png"))
    result = tfmir("search", f"--index={setup['index']}", f"--model={setup['export']}", "--k=3",
                   *queries)
    assert result.returncode == 0, result.stderr[-3000:]
    entries = json.loads(result.stdout)
    assert len(entries) == len(queries)
    for query, entry in zip(queries, entries):
        first = entry["results"][0]
        assert first["id"] == f"{query.parent.name}/{query.name}" and first["score"] == 0
        assert all(isinstance(row["score"], int) for row in entry["results"])


def _popcount_ranking(query: np.ndarray, gallery: np.ndarray, own_row: int) -> list[int]:
    """Gallery rows by Hamming distance (explicit popcount of the XOR of each byte pair), equal
    distances in gallery order, the query's own row left out."""
    distances = [(sum(bin(int(a) ^ int(b)).count("1") for a, b in zip(query, item)), row)
                 for row, item in enumerate(gallery) if row != own_row]
    return [row for _, row in sorted(distances)]


def _oracle(query_codes, query_labels, gallery_codes, gallery_labels, own_rows, map_k):
    """Recall@1 and mAP@k (AP@k = Σ P(i) rel(i) / R, R = relevant items in the top k)."""
    recalls, precisions = [], []
    for code, label, own in zip(query_codes, query_labels, own_rows):
        ranked = _popcount_ranking(code, gallery_codes, own)
        relevant = [gallery_labels[row] == label for row in ranked[:map_k]]
        recalls.append(float(relevant[0]))
        hits, total = 0, 0.0
        for rank, is_relevant in enumerate(relevant, start=1):
            if is_relevant:
                hits += 1
                total += hits / rank
        precisions.append(total / hits if hits else 0.0)
    return {"recall@1": np.mean(recalls), f"map@{map_k}": np.mean(precisions)}


def test_evaluate_ranks_hash_codes_by_hamming_distance(setup, tmp_path):
    index = Index.load(setup["index"])
    codes, labels = _index_codes(setup["index"]), index.labels.tolist()

    # Against the index: every image is a query, left out of its own neighbours.
    output = tmp_path / "index.json"
    result = tfmir("evaluate", f"--model={setup['export']}", f"--data=skin={setup['folder']}",
                   f"--index={setup['index']}", "--splits=train,val,test", "--k=1",
                   "--map_k=5", "--kp=1", f"--output_json={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "map@5" in result.stdout and "(hamming, hamming)" in result.stdout
    evaluation = json.loads(output.read_text())
    assert evaluation["queries_in_gallery"] == len(index)
    expected = _oracle(codes, labels, codes, labels, range(len(index)), 5)
    assert evaluation["retrieval"] == pytest.approx(expected)

    # Against the train split (the checkpoint this time): a hamming index is built for it.
    output = tmp_path / "split.json"
    result = tfmir("evaluate", f"--model={setup['checkpoint']}",
                   f"--data=skin={setup['folder']}", "--k=1", "--map_k=3", "--kp=1",
                   f"--output_json={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads(output.read_text())
    assert (evaluation["gallery"]["kind"], evaluation["gallery"]["metric"]) == ("hamming",
                                                                                "hamming")
    splits = load_specs([f"skin={setup['folder']}"], seed=0)
    rows = {path: row for row, path in enumerate(index.paths.tolist())}
    train, test = splits["train"], splits["test"]

    def codes_of(examples):
        return codes[[rows[str(path)] for path in examples.paths]]

    expected = _oracle(codes_of(test), test.labels, codes_of(train), train.labels,
                       [-1] * len(test), 3)
    assert evaluation["retrieval"] == pytest.approx(expected)


def test_float_index_kinds_are_refused_for_a_hash_model(setup, tmp_path):
    embed = load_embedding_function(setup["export"])
    # Even an index that records this model's fingerprint (an exact index of its codes, built by
    # hand) is refused for what it is.
    float_index = _float_index(tmp_path / "float", embed.fingerprint, embed.preprocessing)
    query = sorted(setup["folder"].glob("*/*.png"))[0]

    output = tmp_path / "refused"
    result = tfmir("index", f"--model={setup['export']}", f"--data=skin={setup['folder']}",
                   "--kind=exact", f"--output={output}")
    assert_refused(result, "index", "--kind=exact does not fit SavedModel", "the 'code' output (36-bit "
                   "hash codes), searched by Hamming distance; use --kind=hamming")
    assert not output.exists() and not os.path.exists(f"{output}.shards")

    result = tfmir("search", f"--index={float_index}", f"--model={setup['export']}", query)
    assert_refused(result, "search", "outputs hash codes (±1 bits, searched by Hamming distance), but the "
                   f"index {float_index} holds float embeddings (kind exact)",
                   "tfmir index --kind=hamming")

    result = tfmir("evaluate", f"--model={setup['export']}", f"--data=skin={setup['folder']}",
                   "--kind=scann")
    assert_refused(result, "evaluate", "--kind=scann does not fit SavedModel", "use --kind=hamming")


def test_serve_answers_hash_queries_in_process_and_through_tf_serving(setup, tmp_path):
    query = sorted(setup["folder"].glob("*/*.png"))[5]
    own_id = f"{query.parent.name}/{query.name}"
    local = SearchService.load(setup["index"], setup["export"], k=4)
    answer = local.search(query.read_bytes())
    assert answer["results"][0]["id"] == own_id and answer["results"][0]["score"] == 0
    assert local.health()["kind"] == "hamming"

    fake = FakeTFServing(setup["export"])
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    try:
        for model in (setup["export"], None):  # with the export's fingerprint, and without
            remote = SearchService.load(setup["index"], model, k=4,
                                        tf_serving_url=fake.model_url)
            assert remote.embed.kind == "hash"
            assert remote.search(query.read_bytes()) == answer
        # A float index meets the bits TF Serving answers: refused at startup.
        float_index = _float_index(tmp_path / "float", None, None)
        with pytest.raises(SearchError, match=r"TF Serving at .* outputs hash codes .* holds "
                                              r"float embeddings \(kind exact\)"):
            SearchService.load(float_index, None, k=2, tf_serving_url=fake.model_url)
    finally:
        fake.shutdown()
        fake.server_close()
    with pytest.raises(SearchError, match=r"SavedModel .* outputs hash codes"):
        SearchService.load(float_index, setup["export"], k=2)
