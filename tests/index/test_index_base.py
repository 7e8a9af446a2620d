"""The shared index interface on all three kinds: contents, errors, and the index directory.

Saving and loading are checked against the directory itself (listings, sha256 of
files) and against searches made before saving, never against the code's own
idea of what it wrote.
"""

import hashlib
import json
import os
import pathlib
import shutil

import numpy as np
import pytest

import tfmir.files
from tfmir.index import ExactIndex
from tfmir.index import FingerprintMismatchError
from tfmir.index import HammingIndex
from tfmir.index import Index
from tfmir.index import ScannIndex
from tfmir.index import base

NUM_ITEMS = 200
KINDS = ("exact", "scann", "hamming")


def make_index(kind, fingerprint="model-a"):
    if kind == "exact":
        return ExactIndex(metric="l2", dimension=8, model_fingerprint=fingerprint)
    if kind == "scann":
        # Hashing + reorder, so the ScaNN files saved are more than a dataset.
        return ScannIndex(
            metric="l2", dimension=8, model_fingerprint=fingerprint, mode="asymmetric_hashing"
        )
    return HammingIndex(dimension=36, model_fingerprint=fingerprint)


def make_vectors(kind, count, seed):
    rng = np.random.default_rng(seed)
    if kind == "hamming":
        return rng.integers(0, 2, size=(count, 36))
    return rng.normal(size=(count, 8)).astype("float32")


def built(kind, count=NUM_ITEMS, seed=0):
    return make_index(kind).build(
        make_vectors(kind, count, seed),
        ids=[f"case-{i}" for i in range(count)],
        labels=[i % 3 for i in range(count)],
        sources=["retina" if i % 2 else "xray" for i in range(count)],
        paths=[f"images/{i}.png" for i in range(count)],
    )


def snapshot(directory):
    """{relative path: sha256} of every file under directory (the parent when given a file)."""
    directory = pathlib.Path(directory)
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


# === Contents ===


def test_table_rows_and_search_results(kind):
    index = built(kind)
    assert len(index) == NUM_ITEMS and index.kind == kind
    assert index.get("case-4") == {
        "id": "case-4",
        "label": 1,
        "source": "xray",
        "path": "images/4.png",
        "row": 4,
    }
    assert [row["row"] for row in index.get(["case-9", "case-2"])] == [9, 2]
    queries = make_vectors(kind, 3, seed=1)
    results = index.search(queries, k=5)
    scores, rows = index.search_arrays(queries, k=5)
    assert len(results) == 3 and all(len(hits) == 5 for hits in results)
    for hits, query_scores, query_rows in zip(results, scores, rows):
        assert [hit["rank"] for hit in hits] == [1, 2, 3, 4, 5]
        assert [hit["id"] for hit in hits] == index.ids[query_rows].tolist()
        assert [hit["label"] for hit in hits] == index.labels[query_rows].tolist()
        np.testing.assert_allclose([hit["score"] for hit in hits], query_scores)
        assert set(hits[0]) == {"id", "label", "source", "path", "score", "rank"}
        # Every kind here scores distances: best first means increasing.
        assert np.all(np.diff(query_scores) >= 0)


def test_a_single_query_vector_is_one_query(kind):
    index = built(kind)
    query = make_vectors(kind, 1, seed=1)
    assert index.search(query[0], k=2) == index.search(query, k=2)


def test_build_replaces_and_add_appends(kind):
    index = built(kind)
    index.build(make_vectors(kind, 10, seed=3), ids=range(10))
    assert len(index) == 10 and index.ids.tolist() == list(range(10))
    with pytest.raises(KeyError):
        index.get("case-0")
    index.add(make_vectors(kind, 5, seed=4), ids=range(10, 15), labels=[7] * 5)
    assert len(index) == 15
    assert index.get(12)["label"] == 7 and index.get(3)["label"] is None


def test_add_matches_building_everything_at_once(kind):
    vectors = make_vectors(kind, NUM_ITEMS, seed=5)
    ids = [f"case-{i}" for i in range(NUM_ITEMS)]
    whole = make_index(kind).build(vectors, ids=ids)
    pieces = make_index(kind).add(vectors[:120], ids=ids[:120]).add(vectors[120:], ids=ids[120:])
    queries = make_vectors(kind, 10, seed=6)
    whole_scores, whole_rows = whole.search_arrays(queries, k=5)
    piece_scores, piece_rows = pieces.search_arrays(queries, k=5)
    np.testing.assert_allclose(piece_scores, whole_scores, rtol=1e-5, atol=1e-5)
    if kind != "scann":  # ScaNN's codebooks differ when trained on 120 vs 200 items
        np.testing.assert_array_equal(piece_rows, whole_rows)


def test_duplicate_ids_are_refused_and_named(kind):
    index = built(kind)
    with pytest.raises(ValueError, match=r"Duplicate ids.*'case-3'.*'case-7'"):
        index.add(make_vectors(kind, 3, seed=2), ids=["case-3", "new", "case-7"])
    with pytest.raises(ValueError, match=r"Duplicate ids.*'twice'"):
        index.add(make_vectors(kind, 2, seed=2), ids=["twice", "twice"])
    with pytest.raises(ValueError, match=r"Duplicate ids.*'x'"):
        make_index(kind).build(make_vectors(kind, 2, seed=2), ids=["x", "x"])
    # A refused add changes nothing.
    assert len(index) == NUM_ITEMS
    with pytest.raises(KeyError):
        index.get("new")


def test_unknown_ids_raise_key_error_naming_them(kind):
    index = built(kind)
    with pytest.raises(KeyError, match=r"2 of 3 ids.*'nope'.*'missing'"):
        index.get(["case-1", "nope", "missing"])
    with pytest.raises(KeyError, match=r"'case-999'"):
        index.get("case-999")


@pytest.mark.parametrize("k", [0, -1, NUM_ITEMS + 1, 2.0, True])
def test_k_outside_the_index_is_refused(kind, k):
    index = built(kind)
    with pytest.raises(ValueError, match=rf"k must be an integer in \[1, {NUM_ITEMS}\].*k={k!r}"):
        index.search(make_vectors(kind, 1, seed=1), k=k)


def test_k_equal_to_the_size_returns_everything(kind):
    index = built(kind, count=30)
    _, rows = index.search_arrays(make_vectors(kind, 2, seed=1), k=30)
    assert sorted(rows[0].tolist()) == list(range(30))


def test_empty_index_and_wrong_dimension(kind):
    with pytest.raises(ValueError, match="empty"):
        make_index(kind).search(make_vectors(kind, 1, seed=1), k=1)
    with pytest.raises(ValueError, match="empty"):
        make_index(kind).save("never-written")
    index = built(kind)
    wrong = np.ones((2, 7), dtype="float32")
    with pytest.raises(ValueError, match=r"shape.*\(2, 7\)"):
        index.search(wrong, k=1)
    with pytest.raises(ValueError, match=r"shape.*\(2, 7\)"):
        index.add(wrong, ids=["a", "b"])


def test_column_lengths_are_checked(kind):
    with pytest.raises(ValueError, match=r"3 labels for 4 vectors"):
        make_index(kind).build(make_vectors(kind, 4, seed=1), ids=range(4), labels=[0, 1, 2])
    with pytest.raises(ValueError, match=r"ids must be strings or integers.*1.5"):
        make_index(kind).build(make_vectors(kind, 2, seed=1), ids=[1.5, 2.5])


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"metric must be one of .*metric='hamming'"):
        ExactIndex(metric="hamming", dimension=4)
    with pytest.raises(ValueError, match=r"metric must be one of \('hamming',\).*'l2'"):
        HammingIndex(metric="l2", dimension=4)
    with pytest.raises(ValueError, match=r"dimension=0"):
        ExactIndex(dimension=0)
    with pytest.raises(ValueError, match=r"Unknown settings.*\['num_leaves'\]"):
        ExactIndex(dimension=4, num_leaves=3)


def test_non_finite_vectors_are_refused():
    vectors = np.ones((4, 3), dtype="float32")
    vectors[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite values in rows \[2\]"):
        ExactIndex(dimension=3).build(vectors, ids=range(4))


# === Save and load ===


def test_save_load_round_trip(kind, tmp_path):
    index = built(kind)
    queries = make_vectors(kind, 20, seed=7)
    scores, rows = index.search_arrays(queries, k=10)
    path = index.save(tmp_path / "archive")
    assert path == tmp_path / "archive"

    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format_version"] == base.FORMAT_VERSION
    assert manifest["kind"] == kind
    assert manifest["count"] == NUM_ITEMS
    assert manifest["model_fingerprint"] == "model-a"
    assert manifest["dimension"] == (36 if kind == "hamming" else 8)
    assert manifest["settings"] == index.settings
    assert "created_at" in manifest
    files = snapshot(path)
    del files["manifest.json"]
    assert {name: entry["sha256"] for name, entry in manifest["files"].items()} == files
    table = [json.loads(line) for line in (path / "table.jsonl").read_text().splitlines()]
    assert table[5] == {"id": "case-5", "label": 2, "source": "retina", "path": "images/5.png"}

    loaded = Index.load(
        path, expected_dimension=manifest["dimension"], expected_model_fingerprint="model-a"
    )
    assert type(loaded) is type(index) and len(loaded) == NUM_ITEMS
    assert loaded.metric == index.metric and loaded.settings == index.settings
    loaded_scores, loaded_rows = loaded.search_arrays(queries, k=10)
    np.testing.assert_array_equal(loaded_rows, rows)
    np.testing.assert_allclose(loaded_scores, scores, rtol=1e-6)
    assert loaded.search(queries[:2], k=3) == index.search(queries[:2], k=3)
    assert type(index).load(path).get("case-7") == index.get("case-7")


def test_add_after_load(kind, tmp_path):
    vectors = make_vectors(kind, NUM_ITEMS + 50, seed=8)
    ids = [f"case-{i}" for i in range(NUM_ITEMS + 50)]
    make_index(kind).build(vectors[:NUM_ITEMS], ids=ids[:NUM_ITEMS]).save(tmp_path / "archive")
    loaded = Index.load(tmp_path / "archive")
    loaded.add(vectors[NUM_ITEMS:], ids=ids[NUM_ITEMS:], labels=["late"] * 50)
    assert len(loaded) == NUM_ITEMS + 50
    # Each new item finds itself first (distance 0), so the new rows are searchable.
    scores, rows = loaded.search_arrays(vectors[NUM_ITEMS:], k=1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(NUM_ITEMS, NUM_ITEMS + 50))
    np.testing.assert_allclose(scores[:, 0], 0.0, atol=1e-2)
    assert loaded.get("case-210")["label"] == "late"
    loaded.save(tmp_path / "archive")  # replaces the index it was loaded from
    assert len(Index.load(tmp_path / "archive")) == NUM_ITEMS + 50


def test_saving_over_an_index_replaces_it(kind, tmp_path):
    built(kind, count=40).save(tmp_path / "archive")
    built(kind, count=60, seed=1).save(tmp_path / "archive")
    assert len(Index.load(tmp_path / "archive")) == 60
    assert sorted(os.listdir(tmp_path)) == ["archive"]


def test_saving_over_something_else_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.jpg").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="not an index directory"):
        built("exact").save(tmp_path / "photos")
    assert (tmp_path / "photos" / "keep.jpg").read_bytes() == b"not an index"
    (tmp_path / "empty").mkdir()
    built("exact").save(tmp_path / "empty")
    assert len(Index.load(tmp_path / "empty")) == NUM_ITEMS


def fail_on_call(calls_before_failure, real):
    """Wraps `real` so that call number calls_before_failure + 1 (only) raises."""
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == calls_before_failure + 1:
            raise OSError("simulated crash")
        return real(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("existing", [False, True])
def test_crash_while_writing_leaves_the_target_untouched(kind, tmp_path, monkeypatch, existing):
    target = tmp_path / "archive"
    if existing:
        built(kind, count=40).save(target)
    before = snapshot(tmp_path)
    # The table is written, then the first array save fails: a crash midway.
    monkeypatch.setattr(np, "save", fail_on_call(0, np.save))
    with pytest.raises(OSError, match="simulated crash"):
        built(kind).save(target)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == (["archive"] if existing else [])
    if existing:
        assert len(Index.load(target)) == 40


def test_crash_before_the_manifest_leaves_nothing_loadable(tmp_path, monkeypatch):
    # A hard crash: no cleanup runs, and the manifest (written last) never appears.
    monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)
    monkeypatch.setattr(Index, "_manifest", fail_on_call(0, None))
    with pytest.raises(OSError, match="simulated crash"):
        built("exact").save(tmp_path / "archive")
    monkeypatch.undo()
    assert not (tmp_path / "archive").exists()
    (leftover,) = tmp_path.iterdir()
    assert base.TEMPORARY_MARKER in leftover.name
    with pytest.raises(ValueError, match="leftover of an interrupted"):
        Index.load(leftover)
    renamed = tmp_path / "renamed"
    leftover.rename(renamed)
    with pytest.raises(ValueError, match="no manifest.json"):
        Index.load(renamed)


def test_crash_after_the_manifest_leaves_nothing_loadable(kind, tmp_path, monkeypatch):
    # Everything is written but the rename into place never happens.
    built(kind, count=40).save(tmp_path / "archive")
    before = snapshot(tmp_path / "archive")
    monkeypatch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)
    monkeypatch.setattr(tfmir.files, "_move_into_place", fail_on_call(0, None))
    with pytest.raises(OSError, match="simulated crash"):
        built(kind).save(tmp_path / "archive")
    monkeypatch.undo()
    assert snapshot(tmp_path / "archive") == before
    leftovers = [path for path in tmp_path.iterdir() if path.name != "archive"]
    assert len(leftovers) == 1 and (leftovers[0] / "manifest.json").is_file()
    with pytest.raises(ValueError, match="leftover of an interrupted"):
        Index.load(leftovers[0])
    with pytest.raises(ValueError, match="reserved for save"):
        built(kind).save(leftovers[0])


def test_failed_swap_puts_the_old_index_back(tmp_path, monkeypatch):
    target = tmp_path / "archive"
    built("exact", count=40).save(target)
    before = snapshot(target)
    # First rename (old index aside) works, the second (new one in) fails.
    monkeypatch.setattr(os, "rename", fail_on_call(1, os.rename))
    with pytest.raises(OSError, match="simulated crash"):
        built("exact").save(target)
    monkeypatch.undo()
    assert snapshot(target) == before
    assert sorted(os.listdir(tmp_path)) == ["archive"]


def test_tampered_files_are_detected(kind, tmp_path):
    path = built(kind).save(tmp_path / "archive")
    names = [name for name in snapshot(path) if name != "manifest.json"]
    for name in names:
        copy = tmp_path / f"copy-{names.index(name)}"
        shutil.copytree(path, copy)
        data = bytearray((copy / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / name).write_bytes(bytes(data))
        before = snapshot(copy)
        with pytest.raises(ValueError, match=rf"{name!r}.*does not match its sha256"):
            Index.load(copy)
        assert snapshot(copy) == before
    (path / "table.jsonl").unlink()
    with pytest.raises(ValueError, match=r"missing 'table.jsonl'"):
        Index.load(path)


def test_mismatches_are_refused_naming_both_values(kind, tmp_path):
    path = built(kind).save(tmp_path / "archive")
    before = snapshot(tmp_path)
    dimension = 36 if kind == "hamming" else 8
    metric = "hamming" if kind == "hamming" else "l2"
    with pytest.raises(ValueError, match=rf"dimension {dimension}, expected 64"):
        Index.load(path, expected_dimension=64)
    with pytest.raises(ValueError, match=rf"metric '{metric}', expected 'cosine'"):
        Index.load(path, expected_metric="cosine")
    with pytest.raises(FingerprintMismatchError, match=r"'model-a', expected 'model-b'"):
        Index.load(path, expected_model_fingerprint="model-b")
    for expected in ({"expected_dimension": 64}, {"expected_metric": "cosine"}):
        with pytest.raises(ValueError) as refused:
            Index.load(path, expected_model_fingerprint="model-b", **expected)
        assert not isinstance(refused.value, FingerprintMismatchError)
    other = "exact" if kind != "exact" else "scann"
    with pytest.raises(ValueError, match=rf"holds a '{kind}' index, not a '{other}' index"):
        {"exact": ExactIndex, "scann": ScannIndex}[other].load(path)
    assert snapshot(tmp_path) == before
    Index.load(path, expected_dimension=dimension, expected_metric=metric)


def test_index_without_fingerprint_is_refused_when_one_is_expected(tmp_path):
    index = ExactIndex(dimension=2).build(np.eye(2), ids=["a", "b"])
    path = index.save(tmp_path / "archive")
    with pytest.raises(FingerprintMismatchError, match=r"fingerprint None, expected 'model-a'"):
        Index.load(path, expected_model_fingerprint="model-a")


def test_bad_manifests_are_refused(tmp_path):
    path = built("exact").save(tmp_path / "archive")
    manifest = json.loads((path / "manifest.json").read_text())
    for change, message in [
        ({"format_version": 99}, r"format_version 99.*reads format_version 1"),
        ({"kind": "faiss"}, r"Unknown index kind 'faiss'"),
        ({"files": {**manifest["files"], "../outside": {"sha256": "0"}}}, r"outside"),
    ]:
        (path / "manifest.json").write_text(json.dumps({**manifest, **change}))
        with pytest.raises(ValueError, match=message):
            Index.load(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Index.load(path)
    with pytest.raises(ValueError, match="not found"):
        Index.load(tmp_path / "nowhere")


def test_file_names_that_are_not_utf8_survive_save_and_load(tmp_path):
    # Python keeps such a name as surrogate escapes (os.fsdecode); the table keeps its bytes.
    name = os.fsdecode(b"scans/img\xff\xfe.png")
    index = ExactIndex(metric="l2", dimension=2)
    index.build(np.eye(2, dtype="float32"), ids=[name, "plain"], labels=["a", "b"],
                paths=["/archive/" + name, ""])
    index.save(tmp_path / "index")
    restored = ExactIndex.load(tmp_path / "index")
    assert restored.ids.tolist() == [name, "plain"]
    assert restored.paths.tolist()[0] == "/archive/" + name
    assert restored.search(np.eye(2, dtype="float32")[:1], k=1)[0][0]["id"] == name
