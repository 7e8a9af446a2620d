"""`tfmir index` / `search` / `serve` with a style model: paper 003's database end to end.

Twelve synthetic PNG lesions (a bright disk on a dark, noisy background) in two class folders,
a tiny `StyleEnsemble` and a one-layer segmenter (lesion = bright pixels), both saved as .keras.
"""

import json
import os
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
from PIL import Image

from tests.serving import request, search
from tfmir.index import FingerprintMismatchError, StyleDatabase
from tfmir.similarity import MEASURES

RESIZE_SIZE = 36
NUM_IMAGES = 12


def tfmir(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "tfmir.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)


def _style_model(path, seed):
    from tfmir.models import EnsembleMember, StyleEnsemble

    keras.utils.set_random_seed(seed)
    model = StyleEnsemble([EnsembleMember(backbone="small_resnet", image_size=32,
                                          backbone_widths=[8, 8, 8, 16, 16, 16, 16])
                           for _ in range(2)])
    model.save(path)
    return path


def _segmenter(path):
    # sigmoid(20 · mean(RGB) / 255 − 10): lesion where the mean channel is above 127.5.
    inputs = keras.Input((32, 32, 3))
    probabilities = keras.layers.Conv2D(
        1, 1, activation="sigmoid", kernel_initializer=keras.initializers.Constant(20 / 765),
        bias_initializer=keras.initializers.Constant(-10.0))(inputs)
    keras.Model(inputs, probabilities).save(path)
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("style")
    rng = np.random.default_rng(0)
    rows, columns = np.mgrid[:40, :40]
    for number in range(NUM_IMAGES):
        folder = root / "data" / ("nevus" if number % 2 else "melanoma")
        folder.mkdir(parents=True, exist_ok=True)
        centre = rng.integers(12, 28, 2)
        disk = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 < (5 + number) ** 2
        pixels = rng.integers(0, 60, (40, 40, 3))
        pixels[disk] = rng.integers(150, 255, 3)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"lesion{number:02d}.png")
    model = _style_model(root / "ensemble.keras", seed=1)
    segmenter = _segmenter(root / "segmenter.keras")
    output = root / "ris"
    result = tfmir("index", f"--model={model}", f"--segmenter={segmenter}",
                   f"--data={root / 'data'}", f"--output={output}",
                   f"--resize_size={RESIZE_SIZE}", "--projection_dim=8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Wrote a style database of 12 items" in result.stdout
    return {"root": root, "model": model, "segmenter": segmenter, "index": output}


def test_index_writes_a_style_database_with_masks(archive):
    database = StyleDatabase.load(archive["index"])
    description = database.describe()
    assert description["count"] == NUM_IMAGES and description["has_masks"]
    assert description["channels"] == [8, 8, 8, 16, 16, 16, 16]
    assert description["preprocessing"]["resize_size"] == RESIZE_SIZE
    assert not os.path.exists(str(archive["index"]) + ".shards")
    # The segmenter marks the bright disk: every stored mask holds some lesion and some skin.
    areas = database.masks.reshape(NUM_IMAGES, -1).mean(axis=1)
    assert np.all((areas > 0.02) & (areas < 0.9))


def test_search_prints_the_json_of_tfmir_search_with_the_measure_named(archive):
    query = sorted((archive["root"] / "data" / "nevus").glob("*.png"))[0]
    result = tfmir("search", f"--index={archive['index']}", f"--model={archive['model']}",
                   f"--segmenter={archive['segmenter']}", f"--resize_size={RESIZE_SIZE}",
                   "--measure=I1_SD", "--mode=fast", "--candidates=2", "--k=3", query)
    assert result.returncode == 0, result.stderr[-3000:]
    (entry,) = json.loads(result.stdout)
    assert (entry["query"], entry["measure"], entry["mode"]) == (str(query), "I1_SD", "fast")
    assert [row["rank"] for row in entry["results"]] == [1, 2, 3]
    assert set(entry["results"][0]) == {"id", "label", "source", "path", "score", "rank"}
    # The indexed copy of the query: the same pixels, so the same features and mask.
    assert entry["results"][0]["path"] == str(query)
    assert entry["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert entry["predicted_label"] in ("nevus", "melanoma")


def test_search_in_process_matches_every_measure_and_refuses_other_models(archive):
    from tfmir.cli import style_index

    queries = [str(path) for path in sorted((archive["root"] / "data").glob("*/*.png"))[:2]]
    database, extractor = style_index.load_for_search(
        str(archive["index"]), str(archive["model"]), str(archive["segmenter"]), "style",
        resize_size=RESIZE_SIZE)
    fields = style_index.query_fields(extractor, queries)
    for measure in MEASURES:
        for query, query_fields in zip(queries, fields):
            for mode in ("exact", "fast"):
                results = database.search(query_fields, 4, measure, mode=mode, candidates=2)
                assert results[0]["path"] == query
    other = _style_model(archive["root"] / "other.keras", seed=2)
    with pytest.raises(FingerprintMismatchError, match="model fingerprint mismatch"):
        style_index.load_for_search(str(archive["index"]), str(other), None, "style",
                                    resize_size=RESIZE_SIZE)
    with pytest.raises(ValueError, match="measure 'I1_SD' needs the query's mask: give "
                                         "--segmenter"):
        style_index.load_for_search(str(archive["index"]), str(archive["model"]), None, "I1_SD",
                                    resize_size=RESIZE_SIZE)
    with pytest.raises(ValueError, match="measure must be one of"):
        style_index.load_for_search(str(archive["index"]), str(archive["model"]), None, "gram",
                                    resize_size=RESIZE_SIZE)


class _Running:
    """`make_server` serving in a thread (as tests/serving/test_server.py)."""

    def __init__(self, *args, **kwargs):
        from tfmir.serving import make_server

        self.server = make_server(*args, **kwargs)

    def __enter__(self) -> str:
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.server.url

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=60)


def test_serve_answers_a_measure_and_refuses_an_unknown_one(archive):
    query = sorted((archive["root"] / "data" / "melanoma").glob("*.png"))[1]
    with _Running(archive["index"], archive["model"], segmenter=archive["segmenter"],
                  resize_size=RESIZE_SIZE, k=3) as url:
        status, health, _ = request(f"{url}/healthz")
        assert status == 200 and (health["kind"], health["count"]) == ("style", NUM_IMAGES)
        status, answer = search(url, query.read_bytes(), "measure=style&mode=fast&k=2",
                                content_type="image/png")
        assert status == 200, answer
        assert (answer["measure"], answer["mode"], len(answer["results"])) == ("style", "fast", 2)
        assert answer["results"][0]["path"] == str(query)
        status, answer = search(url, query.read_bytes(), "measure=gram",
                                content_type="image/png")
        assert status == 400
        assert answer["error"].startswith("measure must be one of ('euclidean', 'cosine'")
        status, answer = search(url, query.read_bytes(), "source=isic",
                                content_type="image/png")
        assert status == 400 and "unknown query parameter(s) ['source']" in answer["error"]


@pytest.mark.large
def test_index_refuses_another_kind_for_a_style_model_and_an_existing_output(archive, tmp_path):
    result = tfmir("index", f"--model={archive['model']}", f"--data={archive['root'] / 'data'}",
                   f"--output={tmp_path / 'exact'}", f"--resize_size={RESIZE_SIZE}",
                   "--kind=exact")
    assert result.returncode != 0
    assert "--kind=exact does not fit" in result.stderr and "style model" in result.stderr
    assert not (tmp_path / "exact").exists()
    result = tfmir("index", f"--model={archive['model']}", f"--data={archive['root'] / 'data'}",
                   f"--output={archive['index']}", f"--resize_size={RESIZE_SIZE}")
    assert result.returncode != 0 and "already holds an index; pass --overwrite" in result.stderr


@pytest.mark.large
def test_search_refuses_a_database_of_another_model_before_writing(archive, tmp_path):
    other = _style_model(tmp_path / "other.keras", seed=3)
    query = sorted((archive["root"] / "data" / "nevus").glob("*.png"))[0]
    result = tfmir("search", f"--index={archive['index']}", f"--model={other}",
                   f"--resize_size={RESIZE_SIZE}", f"--output_json={tmp_path / 'out.json'}",
                   query)
    assert result.returncode != 0 and "model fingerprint mismatch" in result.stderr
    assert not (tmp_path / "out.json").exists()
