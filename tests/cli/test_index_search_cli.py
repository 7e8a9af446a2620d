"""`tfmir index` and `tfmir search` run as a user runs them, on real PH2 dermoscopy images."""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from tfmir.data import Examples, load_image_folder
from tfmir.export import export_saved_model, model_fingerprint
from tfmir.index import Index
from tfmir.index.embedding import (ShardMismatchError, embed_in_shards,
                                   load_embedding_function, shard_path)
from tfmir.models import Embedder

NUM_IMAGES = 30


def tfmir(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "tfmir.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)


def _tiny_model(directory, seed):
    keras.utils.set_random_seed(seed)
    model = Embedder.from_preset("tiny")
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory / "best.keras")
    (directory / "config.json").write_text(json.dumps({"resize_size": 36}))
    export_saved_model(model, directory / "export" / "1", resize_size=36)
    return directory / "best.keras", directory / "export", model_fingerprint(model)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"main": _tiny_model(root / "main", seed=1), "other": _tiny_model(root / "other", 2)}


@pytest.fixture(scope="module")
def folder(shared_data_dir, tmp_path_factory):
    """30 real PH2 images in two class folders (the first 15 files and the next 15)."""
    images = sorted((shared_data_dir / "ph2" / "images").glob("*.jpg"))[:NUM_IMAGES]
    root = tmp_path_factory.mktemp("skin")
    for number, image in enumerate(images):
        class_folder = root / ("first" if number < NUM_IMAGES // 2 else "second")
        class_folder.mkdir(exist_ok=True)
        shutil.copy(image, class_folder / image.name)
    return root


@pytest.fixture(scope="module")
def built_index(models, folder, tmp_path_factory):
    _, export, _ = models["main"]
    output = tmp_path_factory.mktemp("indexes") / "skin"
    result = tfmir("index", f"--model={export}", f"--data=skin={folder}", f"--output={output}",
                   "--batch_size=16", "--shard_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result


def test_index_holds_every_image_with_its_class_name(built_index, models, folder):
    output, result = built_index
    index = Index.load(output, expected_model_fingerprint=models["main"][2])
    assert len(index) == NUM_IMAGES
    expected = load_image_folder(folder)
    assert sorted(index.ids.tolist()) == sorted(expected.ids.tolist())
    for row in index.get(expected.ids.tolist()):
        assert row["label"] == row["id"].split("/")[0]  # "first/IMD002.jpg" -> "first"
        assert row["source"] == "skin"
        assert row["path"] == os.path.join(str(folder), row["id"])
    assert not os.path.exists(f"{output}.shards")  # removed once the index is saved
    assert f"Wrote an index of {NUM_IMAGES} items" in result.stdout


def test_search_finds_the_query_itself_first(built_index, models, folder, tmp_path):
    output, _ = built_index
    query = sorted((folder / "second").iterdir())[0]
    gallery = tmp_path / "gallery.png"
    result = tfmir("search", f"--index={output}", f"--model={models['main'][1]}", "--k=3",
                   f"--gallery={gallery}", query)
    assert result.returncode == 0, result.stderr[-3000:]
    (entry,) = json.loads(result.stdout)
    assert entry["query"] == str(query)
    assert [row["rank"] for row in entry["results"]] == [1, 2, 3]
    first = entry["results"][0]
    assert first["id"] == f"second/{query.name}" and first["label"] == "second"
    assert first["score"] == pytest.approx(1.0, abs=1e-4)  # cosine of an image with itself
    labels = [row["label"] for row in entry["results"]]
    assert entry["predicted_label"] == max(labels, key=labels.count)
    assert gallery.is_file() and gallery.stat().st_size > 0


def test_search_with_the_keras_checkpoint_and_a_source_filter(built_index, models, folder,
                                                              tmp_path):
    output, _ = built_index
    query = sorted((folder / "first").iterdir())[0]
    json_path = tmp_path / "results.json"
    result = tfmir("search", f"--index={output}", f"--model={models['main'][0]}", "--k=2",
                   "--source=skin", f"--output_json={json_path}", query)
    assert result.returncode == 0, result.stderr[-3000:]
    (entry,) = json.loads(json_path.read_text())
    assert entry["results"][0]["id"] == f"first/{query.name}"
    assert entry["results"][0]["score"] == pytest.approx(1.0, abs=1e-3)


def test_search_refuses_bad_input(built_index, models, folder, tmp_path):
    output, _ = built_index
    query = sorted((folder / "first").iterdir())[0]
    other_export, other_fingerprint = models["other"][1], models["other"][2]
    result = tfmir("search", f"--index={output}", f"--model={other_export}", query)
    assert result.returncode != 0
    assert "does not match the index" in result.stderr
    assert other_fingerprint in result.stderr and models["main"][2] in result.stderr

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    result = tfmir("search", f"--index={output}", f"--model={models['main'][1]}", broken)
    assert result.returncode != 0 and f"unreadable query image(s): {broken}" in result.stderr

    for k in (0, NUM_IMAGES + 1):
        result = tfmir("search", f"--index={output}", f"--model={models['main'][1]}", f"--k={k}",
                       query)
        assert result.returncode != 0 and f"--k={k}" in result.stderr

    result = tfmir("search", f"--index={tmp_path / 'missing'}", f"--model={models['main'][1]}",
                   query)
    assert result.returncode != 0 and "is not a directory" in result.stderr


def test_search_refuses_queries_preprocessed_otherwise_than_the_index(models, folder, tmp_path):
    # Issue 11, finding 1: an index built from the checkpoint with another resize side was
    # searched through the export (resize 36) and indexed images no longer found themselves.
    checkpoint, export, _ = models["main"]
    output = tmp_path / "resized"
    result = tfmir("index", f"--model={checkpoint}", "--resize_size=72", f"--data=skin={folder}",
                   f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["preprocessing"]["resize_size"] == 72
    assert manifest["preprocessing"]["image_size"] == 32
    query = sorted((folder / "first").iterdir())[0]
    refused = tfmir("search", f"--index={output}", f"--model={export}", query)
    assert refused.returncode != 0
    assert "Index query preprocessing mismatch" in refused.stderr
    assert "'resize_size': 72" in refused.stderr and "'resize_size': 36" in refused.stderr
    assert "Traceback" not in refused.stderr
    # The same checkpoint with the same resize side finds the query itself.
    found = tfmir("search", f"--index={output}", f"--model={checkpoint}", "--resize_size=72",
                  "--k=1", query)
    assert found.returncode == 0, found.stderr[-3000:]
    assert json.loads(found.stdout)[0]["results"][0]["id"] == f"first/{query.name}"


def test_one_index_over_a_folder_on_disk_and_a_medmnist_file_in_memory(models, folder,
                                                                      shared_data_dir, tmp_path):
    _, export, fingerprint = models["main"]
    npz = shared_data_dir / "retinamnist" / "retinamnist.npz"
    output = tmp_path / "both"
    result = tfmir("index", f"--model={export}", f"--data=skin={folder}", f"--data=retina={npz}",
                   "--splits=test", f"--output={output}", "--batch_size=64")
    assert result.returncode == 0, result.stderr[-3000:]
    index = Index.load(output, expected_model_fingerprint=fingerprint)
    sources = index.sources.tolist()
    # The folder is split 2:1:1 (its test split), RetinaMNIST's official test split has 400.
    assert sources.count("retina") == 400 and 0 < sources.count("skin") < NUM_IMAGES
    skin_labels = {row["label"] for row in index.get(index.ids[index.sources == "skin"].tolist())}
    assert skin_labels <= {"skin/first", "skin/second"}  # classes of two sources kept apart
    retina_rows = index.get(index.ids[index.sources == "retina"][:3].tolist())
    assert all(row["label"].startswith("retina/") and row["path"] == "" for row in retina_rows)


class _Interrupted(Exception):
    pass


def test_embedding_resumes_from_finished_shards(models, folder, tmp_path):
    embed = load_embedding_function(models["main"][1])
    examples = load_image_folder(folder, source="skin")
    calls = []

    def failing_after_two_shards(part):
        if len(calls) == 2:
            raise _Interrupted()
        calls.append(len(part))
        return embed(part)

    shards = tmp_path / "index.shards"
    arguments = dict(fingerprint=embed.fingerprint, shard_size=8, batch_size=8, progress=False)
    with pytest.raises(_Interrupted):
        embed_in_shards(failing_after_two_shards, [examples], shards, **arguments)
    finished = [os.stat(shard_path(shards, number)).st_mtime_ns for number in (0, 1)]
    assert not os.path.exists(shard_path(shards, 2))

    calls.clear()

    def counting(part):
        calls.append(len(part))
        return embed(part)

    resumed = embed_in_shards(counting, [examples], shards, **arguments)
    assert calls == [8, 6]  # shards 2 and 3 only: 30 = 8 + 8 + 8 + 6
    assert [os.stat(shard_path(shards, number)).st_mtime_ns for number in (0, 1)] == finished

    uninterrupted = embed_in_shards(embed, [examples], tmp_path / "fresh.shards", **arguments)
    np.testing.assert_allclose(resumed, uninterrupted, atol=1e-5)

    # Shards of another model, or of another preprocessing, are never reused: refused, or
    # discarded with overwrite=True.
    calls.clear()
    with pytest.raises(ShardMismatchError, match="model fingerprint"):
        embed_in_shards(counting, [examples], shards, **{**arguments, "fingerprint": "another"})
    assert calls == []
    embed_in_shards(counting, [examples], shards, overwrite=True,
                    **{**arguments, "fingerprint": "another"})
    assert calls == [8, 8, 8, 6]
    calls.clear()
    embed_in_shards(counting, [examples], shards, overwrite=True,
                    **{**arguments, "fingerprint": "another", "preprocessing": {"resize_size": 72}})
    assert calls == [8, 8, 8, 6]


def _unpacked_codes(index_directory, num_bits):
    """The bits in codes.npy: bit i of a code is bit i of its bytes, most significant first."""
    words = np.load(index_directory / "codes.npy")
    return np.unpackbits(words.astype("<u8").view(np.uint8), axis=1)[:, :num_bits].astype(bool)


def test_hamming_index_and_search_use_the_signs_of_the_embeddings(models, folder, tmp_path):
    _, export, fingerprint = models["main"]
    output = tmp_path / "bits"
    result = tfmir("index", f"--model={export}", f"--data=skin={folder}", "--kind=hamming",
                   f"--output={output}", "--batch_size=16", "--shard_size=8")
    assert result.returncode == 0, result.stderr[-3000:]
    index = Index.load(output, expected_model_fingerprint=fingerprint)
    assert (index.kind, index.metric, index.dimension, len(index)) == ("hamming", "hamming", 128,
                                                                       NUM_IMAGES)
    embed = load_embedding_function(export)

    def embeddings_of(paths):
        return embed(Examples(labels=np.zeros(len(paths), np.int64), sources="query",
                              ids=[str(path) for path in paths], class_names=("",),
                              paths=[str(path) for path in paths]))

    # Oracle: a bit per component, set where the embedding is positive (components within 1e-5
    # of zero may round either way between batch sizes).
    codes = _unpacked_codes(output, 128)
    embeddings = embeddings_of(index.paths.tolist())
    assert np.all((codes == (embeddings > 0)) | (np.abs(embeddings) < 1e-5))

    # An existing index is refused without --overwrite and left as it was.
    before = (output / "manifest.json").read_bytes()
    again = tfmir("index", f"--model={export}", f"--data=skin={folder / 'second'}",
                  "--kind=hamming", f"--output={output}")
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert f"--output={output} already holds an index; pass --overwrite" in again.stderr
    assert (output / "manifest.json").read_bytes() == before

    query = sorted((folder / "second").iterdir())[0]
    result = tfmir("search", f"--index={output}", f"--model={export}", "--k=5", query)
    assert result.returncode == 0, result.stderr[-3000:]
    (entry,) = json.loads(result.stdout)
    distances = (codes != (embeddings_of([query]) > 0)).sum(axis=1)  # explicit Hamming distance
    rows = {item: row for row, item in enumerate(index.ids.tolist())}
    assert [row["score"] for row in entry["results"]] == sorted(distances.tolist())[:5]
    assert all(distances[rows[row["id"]]] == row["score"] for row in entry["results"])
    assert entry["results"][0]["score"] == 0 and distances[rows[f"second/{query.name}"]] == 0

    result = tfmir("index", f"--model={export}", f"--data=skin={folder}", "--kind=hamming",
                   "--metric=l2", f"--output={tmp_path / 'refused'}")
    assert result.returncode != 0 and "--metric does not apply" in result.stderr
