"""`tfmir evaluate` run as a user runs it, checked against a NumPy oracle on real PH2 images.

The oracle embeds the same images with `load_embedding_function` and recomputes every number
with brute-force cosine neighbours (np.argsort), explicit per-query loops for Recall@K and
AP@k (R = relevant items in the top k), and a hand-written majority vote with ties going to the
nearest of the tied classes.
"""

import json
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from tfmir.data.specs import load_specs
from tfmir.export import export_saved_model, model_fingerprint
from tfmir.index import ExactIndex, Index
from tfmir.index.embedding import load_embedding_function
from tfmir.models import Embedder

# Three classes of unequal size, so that the smallest class is not a tie.
CLASS_SIZES = {"common": 20, "rarer": 12, "rarest": 8}
KS, MAP_KS, KPS = (1, 2, 4), (5,), (1, 3)
RESIZE_SIZE = 36


def tfmir(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "tfmir.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)


def evaluate(*args):
    return tfmir("evaluate", *args, *(f"--{name}={','.join(map(str, values))}" for name, values
                                      in (("k", KS), ("map_k", MAP_KS), ("kp", KPS))))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny embedder as a .keras checkpoint (with config.json) and as a SavedModel export."""
    root = tmp_path_factory.mktemp("model")
    # Seed 6 leaves no near tie between differently labelled neighbours (see _oracle).
    keras.utils.set_random_seed(6)
    embedder = Embedder.from_preset("tiny")
    embedder.save(root / "best.keras")
    (root / "config.json").write_text(json.dumps({"resize_size": RESIZE_SIZE}))
    export_saved_model(embedder, root / "export" / "1", resize_size=RESIZE_SIZE)
    return {"checkpoint": root / "best.keras", "export": root / "export",
            "fingerprint": model_fingerprint(embedder)}


@pytest.fixture(scope="module")
def folder(shared_data_dir, tmp_path_factory):
    """40 real PH2 images in three class folders of 20, 12 and 8 images."""
    images = iter(sorted((shared_data_dir / "ph2" / "images").glob("*.jpg")))
    root = tmp_path_factory.mktemp("skin")
    for name, size in CLASS_SIZES.items():
        (root / name).mkdir()
        for _ in range(size):
            image = next(images)
            shutil.copy(image, root / name / image.name)
    return root


def _oracle(query_vectors, query_labels, gallery_vectors, gallery_labels, self_rows):
    """Every number of the JSON, by brute force; self_rows[q] is q's own gallery row or -1."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    similarity = unit(np.asarray(query_vectors, np.float64)) @ unit(
        np.asarray(gallery_vectors, np.float64)).T
    ranked = []
    depth = max(KS + MAP_KS + KPS) + 1
    for scores, row, own in zip(similarity, np.argsort(-similarity, axis=1, kind="stable"),
                                self_rows):
        row = [item for item in row if item != own]
        ranked.append([gallery_labels[item] for item in row])
        # The search runs in float32: two neighbours of different classes whose cosines were
        # within 1e-5 could come in either order, and the oracle would not be one.
        for first, second in zip(row[:depth], row[1:depth]):
            if gallery_labels[first] != gallery_labels[second]:
                assert scores[first] - scores[second] > 1e-5, "near tie: use another seed"
    return _metrics(ranked, query_labels, gallery_labels)


def _metrics(ranked, query_labels, gallery_labels):
    """Every number of the JSON from each query's gallery labels, nearest first."""
    retrieval = {}
    for k in KS:
        hits = [query_labels[q] in ranked[q][:k] for q in range(len(ranked))]
        retrieval[f"recall@{k}"] = sum(hits) / len(hits)
    for k in MAP_KS:
        total = 0.0
        for q, labels in enumerate(ranked):
            relevant, precisions = 0, 0.0
            for rank, label in enumerate(labels[:k], start=1):
                if label == query_labels[q]:
                    relevant += 1
                    precisions += relevant / rank
            total += precisions / relevant if relevant else 0.0
        retrieval[f"map@{k}"] = total / len(ranked)
    smallest = min(CLASS_SIZES, key=lambda name: list(gallery_labels).count(name))
    knn = {}
    for kp in KPS:
        predictions = []
        for labels in ranked:
            voters = labels[:kp]
            most = max(voters.count(label) for label in voters)
            predictions.append(next(label for label in voters if voters.count(label) == most))
        recalls = {}
        for name in CLASS_SIZES:
            members = [q for q, label in enumerate(query_labels) if label == name]
            if members:
                recalls[name] = sum(predictions[q] == name for q in members) / len(members)
        knn[f"kp={kp}"] = {
            "accuracy": float(np.mean([p == t for p, t in zip(predictions, query_labels)])),
            "mean_class_recall": float(np.mean(list(recalls.values()))),
            "smallest_class_recall": recalls[smallest],
            "class_recall": recalls,
        }
    return {"retrieval": retrieval, "knn": knn, "smallest_class": smallest}


def _assert_matches(result, expected):
    assert result["retrieval"] == pytest.approx(expected["retrieval"])
    assert set(result["knn"]) == set(expected["knn"])
    for key, scores in expected["knn"].items():
        assert result["knn"][key]["class_recall"] == pytest.approx(scores.pop("class_recall"))
        assert {name: result["knn"][key][name] for name in scores} == pytest.approx(scores)
    assert result["smallest_class"]["name"] == expected["smallest_class"]


def _names(examples):
    return [examples.class_names[label] for label in examples.labels]


def test_test_split_against_the_training_split(model, folder, tmp_path):
    output = tmp_path / "evaluation.json"
    result = evaluate(f"--model={model['checkpoint']}", f"--data=skin={folder}",
                      f"--output_json={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(output.read_text())

    splits = load_specs([f"skin={folder}"])
    embed = load_embedding_function(model["checkpoint"])
    test, train = splits["test"], splits["train"]
    expected = _oracle(embed(test), _names(test), embed(train), _names(train),
                       self_rows=[-1] * len(test))
    _assert_matches(written, expected)
    assert written["queries_in_gallery"] == 0
    assert written["gallery"] == {"from": "split", "split": "train", "kind": "exact",
                                  "metric": "cosine", "num_items": len(train)}
    assert written["num_queries"] == len(test)
    assert written["model_fingerprint"] == model["fingerprint"]
    assert "R = relevant items in the top k" in written["conventions"]["map@k"]
    # RS is the training split's smallest class, 'rarest', and the table says so.
    assert written["smallest_class"]["gallery_items"] == _names(train).count("rarest")
    assert "RS = recall of 'rarest' (the train split's smallest class" in result.stdout
    assert "No query is a gallery item" in result.stdout

    # The JSON is not replaced without --overwrite; with it, it is.
    output.write_text("kept")
    again = evaluate(f"--model={model['checkpoint']}", f"--data=skin={folder}",
                     f"--output_json={output}")
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert "already exists; pass --overwrite" in again.stderr
    assert output.read_text() == "kept"
    again = evaluate(f"--model={model['checkpoint']}", f"--data=skin={folder}",
                     f"--output_json={output}", "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(output.read_text())["retrieval"] == written["retrieval"]


def test_queries_against_an_index_that_holds_them(model, folder, tmp_path):
    # `tfmir index` indexes every split by default, so the training queries are in the index
    # and each must be left out of its own neighbours; the test queries are there too.
    index_directory = tmp_path / "index"
    built = tfmir("index", f"--model={model['export']}", f"--data=skin={folder}",
                  f"--output={index_directory}")
    assert built.returncode == 0, built.stderr[-3000:]
    output = tmp_path / "evaluation.json"
    result = evaluate(f"--model={model['export']}", f"--data=skin={folder}",
                      f"--index={index_directory}", "--splits=train,test",
                      f"--output_json={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(output.read_text())

    splits = load_specs([f"skin={folder}"])
    queries = [*splits["train"].paths.tolist(), *splits["test"].paths.tolist()]
    query_labels = _names(splits["train"]) + _names(splits["test"])
    gallery_paths = [str(path) for path in sorted(folder.glob("*/*.jpg"))]
    gallery_labels = [os.path.basename(os.path.dirname(path)) for path in gallery_paths]
    embed = load_embedding_function(model["export"])
    expected = _oracle(np.concatenate([embed(splits["train"]), embed(splits["test"])]),
                       query_labels, embed(_as_examples(gallery_paths)), gallery_labels,
                       self_rows=[gallery_paths.index(path) for path in queries])
    _assert_matches(written, expected)
    assert written["queries_in_gallery"] == len(queries)
    assert written["gallery"]["from"] == "index" and written["gallery"]["num_items"] == 40
    assert written["smallest_class"] == {"name": "rarest", "chosen": "the index's smallest class",
                                         "gallery_items": 8,
                                         "queries": query_labels.count("rarest")}
    assert f"{len(queries)} of the {len(queries)} queries are gallery items" in result.stdout


def test_kind_hamming_ranks_the_signs_of_a_float_model(model, folder, tmp_path):
    output = tmp_path / "evaluation.json"
    result = evaluate(f"--model={model['checkpoint']}", f"--data=skin={folder}", "--kind=hamming",
                      f"--output_json={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads(output.read_text())
    assert (written["gallery"]["kind"], written["gallery"]["metric"]) == ("hamming", "hamming")

    # Oracle: bit i set where component i is positive; distances by an explicit loop over the
    # bits, equal distances in gallery order.
    splits = load_specs([f"skin={folder}"])
    embed = load_embedding_function(model["checkpoint"])
    test, train = splits["test"], splits["train"]
    query_vectors, gallery_vectors = embed(test), embed(train)
    assert min(np.abs(query_vectors).min(), np.abs(gallery_vectors).min()) > 1e-6  # no sign flips
    gallery_labels = _names(train)
    ranked = []
    for query in query_vectors > 0:
        distances = [(sum(int(a != b) for a, b in zip(query, item)), row)
                     for row, item in enumerate(gallery_vectors > 0)]
        ranked.append([gallery_labels[row] for _, row in sorted(distances)])
    expected = _metrics(ranked, _names(test), gallery_labels)
    _assert_matches(written, expected)

    refused = evaluate(f"--model={model['checkpoint']}", f"--data=skin={folder}",
                       "--kind=hamming", "--metric=l2")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "tfmir evaluate: error: --metric does not apply to --kind=hamming" in refused.stderr


def _as_examples(paths):
    from tfmir.data import Examples

    return Examples(labels=np.zeros(len(paths), np.int64), sources="skin", ids=paths,
                    class_names=("",), paths=paths)


def test_bad_input_is_one_line(model, folder, tmp_path):
    def refused(*args, expected):
        result = evaluate(f"--model={model['export']}", *args)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert f"tfmir evaluate: error: {expected}" in result.stderr, result.stderr[-2000:]
        return result.stderr

    data = f"--data=skin={folder}"
    refused(data, "--splits=tset", expected="--splits must name some of train, val, test. "
                                            "Received: --splits=tset")
    refused(data, "--gallery_split=all", expected="--gallery_split must be one of")
    # A folder of images without class sub-folders has no labels.
    plain = tmp_path / "plain"
    plain.mkdir()
    for image in sorted((folder / "common").iterdir())[:3]:
        shutil.copy(image, plain / image.name)
    message = refused(f"--data=skin={plain}", expected="cannot load labelled data from --data: ")
    assert "has no class folders" in message
    # The training split of 20 images cannot give 21 neighbours.
    train_size = len(load_specs([f"skin={folder}"])["train"])
    result = tfmir("evaluate", f"--model={model['export']}", data, f"--kp={train_size + 1}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert (f"--kp={train_size + 1} is larger than the gallery ({train_size} items): give at "
            f"most {train_size}") in result.stderr
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a keras archive")
    result = tfmir("evaluate", f"--model={broken}", f"--resize_size={RESIZE_SIZE}", data)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "tfmir evaluate: error: cannot read --model: " in result.stderr
    assert "not a valid .keras file" in result.stderr
    # An index of this model without labels cannot score anything.
    embed = load_embedding_function(model["export"])
    paths = [str(path) for path in sorted(plain.iterdir())]
    unlabelled = tmp_path / "unlabelled"
    vectors = embed(_as_examples(paths))
    ExactIndex(dimension=vectors.shape[1], model_fingerprint=embed.fingerprint,
               preprocessing=embed.preprocessing).build(
        vectors, ids=paths, paths=paths).save(unlabelled)
    assert Index.load(unlabelled).labels.tolist() == [None] * 3
    refused(data, f"--index={unlabelled}",
            expected=f"the index {unlabelled} has 3 of 3 items without a label")
    refused(data, f"--index={unlabelled}", "--kind=scann",
            expected="--kind do(es) not apply with --index")
