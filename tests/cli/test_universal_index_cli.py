"""A distilled universal student exports, indexes and searches like any embedder (paper 000).

One SavedModel, one index over both shipped sources, results filterable by source: the path a
hospital takes with the universal model, run through the `tfmir` commands.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tfmir.export import model_fingerprint
from tfmir.index import Index
from tfmir.models import Embedder
from tfmir.samples import load_sample
from tfmir.training import train_universal


def tfmir(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "tfmir.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def universal(tmp_path_factory):
    """A tiny student distilled for a few steps from two tiny specialists on the shipped sample."""
    splits = load_sample()
    root = tmp_path_factory.mktemp("universal")
    specialists = {}
    for seed, source in enumerate(splits["train"].source_names):
        keras.utils.set_random_seed(seed)
        specialists[source] = root / f"specialist_{source}.keras"
        Embedder.from_preset("tiny", name=f"specialist_{source}").save(specialists[source])
    result = train_universal(splits["train"], splits["val"], specialists=specialists,
                             workdir=root / "run", preset="tiny", epochs=1, steps_per_epoch=3,
                             verbose=0)
    return result, splits["test"]


@pytest.fixture(scope="module")
def exported_and_indexed(universal, tmp_path_factory):
    result, _ = universal
    root = tmp_path_factory.mktemp("deploy")
    exported = root / "export"
    run = tfmir("export", f"--model={result.best_path}", f"--output={exported}")
    assert run.returncode == 0, run.stderr[-3000:]
    index_dir = root / "index"
    run = tfmir("index", f"--model={exported}", "--data=sample", "--splits=test",
                f"--output={index_dir}", "--batch_size=128")
    assert run.returncode == 0, run.stderr[-3000:]
    return exported, index_dir


def test_one_index_holds_both_sources_under_the_students_fingerprint(universal,
                                                                    exported_and_indexed):
    result, test = universal
    _, index_dir = exported_and_indexed
    student = keras.saving.load_model(result.best_path)
    assert type(student) is Embedder
    index = Index.load(index_dir, expected_model_fingerprint=model_fingerprint(student))
    assert len(index) == len(test)
    counts = {source: int(np.sum(index.sources == source)) for source in test.source_names}
    assert counts == {source: int(np.sum(test.sources == source)) for source in test.source_names}


@pytest.mark.parametrize("source", ["retina", "xray"])
def test_search_filtered_by_source_returns_only_that_source(exported_and_indexed, tmp_path,
                                                            source):
    exported, index_dir = exported_and_indexed
    # The query is an image of the other source, so an unfiltered search would favour it.
    other = "xray" if source == "retina" else "retina"
    query = tmp_path / "query.png"
    from PIL import Image

    test = load_sample([other])["test"]
    Image.fromarray(test.images[0]).save(query)
    run = tfmir("search", f"--index={index_dir}", f"--model={exported}", "--k=5",
                f"--source={source}", query)
    assert run.returncode == 0, run.stderr[-3000:]
    (entry,) = json.loads(run.stdout)
    assert len(entry["results"]) == 5
    assert {row["source"] for row in entry["results"]} == {source}
    assert entry["predicted_label"].startswith(f"{source}/")
