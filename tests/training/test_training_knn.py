"""Leave-one-out kNN on the training split (paper 001's Fig. 2), on hand-computable embeddings.

Fixtures from tests/training/test_evaluators.py: an image filled with value v embeds as the unit
vector table[v], so cosine neighbours are read off the angles.
"""

import numpy as np
import pytest

from tfmir.training import evaluators as evaluators_module
from tfmir.training.evaluators import (
    EVALUATORS,
    Evaluation,
    TrainingKNNClassification,
    check_monitor,
    make_evaluator,
)

from tests.training.test_evaluators import SIZE, _examples, _table_model, _unit


def _train_split():
    """Angles 0, 10, 22 (class 0, 0, 1), 60, 65 (1, 1), 100 (2); each item left out of its own
    gallery.

    K_p = 1: 0 -> 10 ✓, 10 -> 0 ✓, 22 -> 10 ✗, 60 -> 65 ✓, 65 -> 60 ✓, 100 -> 65 ✗.
      Acc 4/6; recalls c0 1, c1 2/3, c2 0 -> MCR 5/9; RS (class 2, the smallest) 0.
    K_p = 3: 0 -> 10, 22, 60 (c1 wins) ✗; 10 -> 0, 22, 60 ✗; 22 -> 10, 0, 60 (c0) ✗;
      60 -> 65, 22, 100 ✓; 65 -> 60, 100, 22 ✓; 100 -> 65, 60, 22 ✗.
      Acc 2/6; recalls c0 0, c1 2/3, c2 0 -> MCR 2/9; RS 0.
    With the query in its own gallery K_p = 1 would score 1.0 everywhere.
    """
    angles = [0, 10, 22, 60, 65, 100]
    model = _table_model({value: _unit([angle])[0] for value, angle in enumerate(angles)})
    return model, _examples(range(6), [0, 0, 1, 1, 1, 2])


def test_leave_one_out_knn_on_the_training_split_by_hand():
    model, train = _train_split()
    val = train.subset([0, 5])  # not used
    evaluator = TrainingKNNClassification(num_neighbors=(1, 3))
    metrics = evaluator.evaluate(model, val, resize_size=SIZE, train=train)
    assert metrics == pytest.approx({
        "knn@1_accuracy": 4 / 6, "knn@1_mcr": 5 / 9, "knn@1_rs": 0.0,
        "knn@3_accuracy": 2 / 6, "knn@3_mcr": 2 / 9, "knn@3_rs": 0.0,
    })


def test_logged_with_the_train_prefix_sharing_the_validation_gallery(monkeypatch):
    model, train = _train_split()
    val = train.subset([0, 3, 5])
    calls = []
    real_embed = evaluators_module.embed_examples

    def counting_embed(model, examples, **kwargs):
        calls.append(examples)
        return real_embed(model, examples, **kwargs)

    monkeypatch.setattr(evaluators_module, "embed_examples", counting_embed)
    specs = [{"name": "knn", "num_neighbors": 1}, {"name": "train_knn", "num_neighbors": 1}]
    callback = Evaluation(specs, val, model=model, resize_size=SIZE, train=train)
    logs = {}
    callback.on_epoch_end(0, logs)
    assert logs["train_knn_accuracy"] == pytest.approx(4 / 6)
    assert logs["val_knn_accuracy"] == pytest.approx(1.0)  # val items are in the gallery
    # The training split is embedded once, for both evaluators.
    assert len(calls) == 2 and calls[0] is val and calls[1] is train
    check_monitor("train_knn_mcr", specs, val)
    with pytest.raises(ValueError, match="produced by no evaluator"):
        check_monitor("val_train_knn_mcr", specs, val)
    assert EVALUATORS["train_knn"] is TrainingKNNClassification


def test_sampled_queries_search_the_whole_training_split():
    """Queries rows R of the split above: each is scored as in the full leave-one-out run
    (K_p = 1 hits 1, 1, 0, 1, 1, 0), with every training item but itself as its gallery."""
    model, train = _train_split()
    hits = np.array([1, 1, 0, 1, 1, 0], bool)
    evaluator = TrainingKNNClassification(num_neighbors=1, max_items=3, seed=1)
    rows = evaluator.query_rows(train)
    assert len(rows) < len(train) and 5 in rows  # the smallest class is always queried
    metrics = evaluator.evaluate(model, train, resize_size=SIZE, train=train)
    labels = train.labels[rows]
    recalls = [hits[rows][labels == label].mean() for label in np.unique(labels)]
    assert metrics == pytest.approx({"knn_accuracy": hits[rows].mean(),
                                     "knn_mcr": np.mean(recalls), "knn_rs": 0.0})


def test_query_sample_is_fixed_stratified_and_keeps_every_class():
    labels = [0] * 90 + [1] * 8 + [2] * 2
    train = _examples(range(100), labels)
    evaluator = make_evaluator({"name": "train_knn", "num_neighbors": [1, 5], "max_items": 20})
    rows = evaluator.query_rows(train)
    counts = np.bincount(train.labels[rows], minlength=3)
    # Shares 20 * 90/100 = 18, 20 * 8/100 -> at least min(8, 5 + 1) = 6, and both items of class 2.
    assert counts.tolist() == [18, 6, 2]
    assert evaluator.query_rows(train) is rows
    again = TrainingKNNClassification(num_neighbors=[1, 5], max_items=20).query_rows(train)
    np.testing.assert_array_equal(again, rows)
    np.testing.assert_array_equal(TrainingKNNClassification().query_rows(train), np.arange(100))


def test_checks_and_arguments():
    _, train = _train_split()
    with pytest.raises(ValueError, match="classifies the training split. Received: train=None"):
        TrainingKNNClassification().check(train)
    with pytest.raises(ValueError, match=r"training split has 6 items.*needs at least 7"):
        TrainingKNNClassification(num_neighbors=6).check(train, train)
    with pytest.raises(ValueError, match="max_items must be a positive integer or None"):
        TrainingKNNClassification(max_items=0)
