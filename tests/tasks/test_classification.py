"""Classification task: class weights and loss by hand, the head's input, deep kNN* init."""

import math

import keras
import numpy as np
import pytest

from tfmir.configs import TaskConfig, get_config
from tfmir.data import Examples
from tfmir.models import Embedder
from tfmir.tasks import (
    Classification,
    MetricLearning,
    build_task,
    initialize_from,
    inverse_frequency_weights,
)

TINY = dict(get_config("deep_knn_classifier:tiny").task.model)


def _split(labels, num_classes):
    labels = np.asarray(labels)
    return Examples(labels=labels, sources="s", ids=[f"i{i}" for i in range(len(labels))],
                    class_names=[str(c) for c in range(num_classes)],
                    images=np.zeros((len(labels), 8, 8, 3), np.uint8))


def test_inverse_frequency_weights_by_hand():
    """labels 0,0,0,1 of 3 classes: N = 4, C = 2 present; w = N / (C n_c) = 4/6, 4/2, and 0 for
    the absent class; sum_c n_c w_c = 3 * 2/3 + 1 * 2 = 4 = N."""
    weights = inverse_frequency_weights([0, 0, 0, 1], num_classes=3)
    np.testing.assert_allclose(weights, [2 / 3, 2.0, 0.0], rtol=1e-6)
    assert weights.dtype == np.float32
    # Balanced labels give every class weight 1.
    np.testing.assert_allclose(inverse_frequency_weights([0, 1, 2, 2, 1, 0], 3), [1, 1, 1])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        inverse_frequency_weights([0, 2], num_classes=2)
    with pytest.raises(ValueError, match="at least one training label"):
        inverse_frequency_weights([], num_classes=2)


def test_weighted_cross_entropy_by_hand():
    """Labels 0,0,0,1 with weights 2/3 and 2 (above).

    Zero logits: every item's CE is ln 2, the weighted batch mean (3 * 2/3 + 2) ln 2 / 4 = ln 2.
    Item 4's logits (ln 3, 0): p(class 1) = 1/4, CE = ln 4; mean (2 ln 2 + 2 ln 4) / 4 = 1.5 ln 2.
    Unweighted, the latter is (3 ln 2 + ln 4) / 4 = 1.25 ln 2.
    """
    keras.utils.set_random_seed(0)
    task = Classification(Embedder(**TINY), num_classes=2, class_weights=[2 / 3, 2.0])
    labels = {"label": np.array([0, 0, 0, 1])}
    logits = np.zeros((4, 2), np.float32)
    assert float(task.objective({}, labels, logits, training=True)) == pytest.approx(
        math.log(2), rel=1e-5)
    logits[3, 0] = math.log(3)
    assert float(task.objective({}, labels, logits, training=True)) == pytest.approx(
        1.5 * math.log(2), rel=1e-5)
    unweighted = Classification(task.embedder, num_classes=2, name="unweighted")
    assert float(unweighted.objective({}, labels, logits, training=True)) == pytest.approx(
        1.25 * math.log(2), rel=1e-5)


def test_head_reads_the_features_before_l2_normalisation():
    keras.utils.set_random_seed(0)
    embedder = Embedder(**TINY)
    task = Classification(embedder, num_classes=3)
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    projection = keras.Model(embedder.inputs, embedder.get_layer("projection").output)
    kernel, bias = task.get_layer("classifier").get_weights()
    expected = np.asarray(projection.predict(images, verbose=0)) @ kernel + bias
    np.testing.assert_allclose(task({"image": images}), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(task.logits_model()(images), expected, rtol=1e-5, atol=1e-5)
    assert task.deployable_model is embedder
    # The deployable features are the same projection, unit length.
    np.testing.assert_allclose(np.linalg.norm(embedder(images), axis=1), 1.0, rtol=1e-5)
    # Embedder and head are the task's weights, each once.
    assert len(task.weights) == len(embedder.weights) + 2


def test_from_task_config_weights_classes_of_the_training_split():
    train = _split([0, 0, 0, 1, 2, 2], num_classes=4)  # class 3 has no training item
    task = build_task(TaskConfig(name="classification", model=TINY), {"train": train})
    assert task.num_classes == 4 and task.get_layer("classifier").units == 4
    # N = 6, C = 3 present: 6/9, 6/3, 6/6, 0.
    np.testing.assert_allclose(task.class_weights, [2 / 3, 2.0, 1.0, 0.0], rtol=1e-6)
    unweighted = build_task(TaskConfig(name="classification", model=TINY,
                                       args={"class_weighting": "none"}), {"train": train})
    assert unweighted.class_weights is None
    with pytest.raises(ValueError, match=r"unknown classification argument\(s\) \['margin'\]"):
        build_task(TaskConfig(name="classification", model=TINY, args={"margin": 1}),
                   {"train": train})
    with pytest.raises(ValueError, match=r"class_weighting must be one of \('inverse_frequency', "
                                         r"'none'\). Received: class_weighting='sqrt'"):
        build_task(TaskConfig(name="classification", model=TINY,
                              args={"class_weighting": "sqrt"}), {"train": train})


def test_constructor_errors():
    embedder = Embedder(**TINY)
    with pytest.raises(ValueError, match="num_classes must be an integer of at least 2"):
        Classification(embedder, num_classes=1)
    with pytest.raises(ValueError, match="class_weights must give 3 non-negative weights"):
        Classification(embedder, num_classes=3, class_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="class_weights must give 2 non-negative weights"):
        Classification(embedder, num_classes=2, class_weights=[1.0, -1.0])


@pytest.fixture()
def trained_classifier_features(tmp_path):
    """A classifier's feature extractor with weights unlike a fresh embedder's, saved."""
    keras.utils.set_random_seed(3)
    task = Classification(Embedder(**TINY), num_classes=2)
    rng = np.random.default_rng(3)
    task.embedder.set_weights([rng.normal(size=w.shape).astype(w.dtype)
                               for w in task.embedder.get_weights()])
    path = tmp_path / "classifier" / "best.keras"
    path.parent.mkdir()
    task.deployable_model.save(path)
    return task.deployable_model, path


def test_deep_knn_star_starts_from_the_classifier_features_exactly(trained_classifier_features):
    features, path = trained_classifier_features
    config = get_config("deep_knn:tiny")
    config.task.args["init_from"] = str(path)
    train = _split([0, 1] * 6, num_classes=2)
    task = build_task(config.task, {"train": train})
    assert isinstance(task, MetricLearning)
    assert task.loss_function.get_config()["name"] == "knn_triplet"
    for copied, original in zip(task.deployable_model.get_weights(), features.get_weights()):
        np.testing.assert_array_equal(copied, original)
    fresh = build_task(get_config("deep_knn:tiny").task, {"train": train})
    assert not all(np.array_equal(a, b) for a, b in zip(fresh.deployable_model.get_weights(),
                                                        features.get_weights()))


def test_init_from_skips_pretrained_weights_and_refuses_mismatches(trained_classifier_features,
                                                                    tmp_path):
    _, path = trained_classifier_features
    train = _split([0, 1] * 6, num_classes=2)
    # small_resnet refuses weights="imagenet"; with init_from they are not loaded at all.
    model = {**TINY, "weights": "imagenet"}
    task = build_task(TaskConfig(name="metric_learning", model=model,
                                 args={"init_from": str(path)}), {"train": train})
    assert task.deployable_model.weights_source is None
    with pytest.raises(ValueError, match="init_from model not found"):
        build_task(TaskConfig(name="metric_learning", model=TINY,
                              args={"init_from": str(tmp_path / "missing.keras")}),
                   {"train": train})
    narrower = Embedder(**{**TINY, "embedding_dim": 16})
    with pytest.raises(ValueError, match=r"weight 'projection/kernel' has shape \(16, 128\), but "
                                         r"'projection/kernel' of 'embedder' has \(16, 16\)"):
        initialize_from(narrower, path)
