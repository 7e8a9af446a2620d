"""Every task through the shared contract (tests/tasks/harness.py) and through `fit` twice."""

import keras
import numpy as np
import pytest

from tfmir.configs import get_config, override
from tfmir.models import Embedder
from tfmir.samples import load_sample
from tfmir.tasks import Classification, Distillation, MetricLearning, build_task

from tests.tasks.harness import run_determinism_test, run_task_test


@pytest.fixture(scope="module")
def sample():
    """The shipped two-source sample (retina, xray), 40 training images per class."""
    splits = load_sample()
    rng = np.random.default_rng(0)

    def few(examples, per_class):
        keep = np.concatenate([rng.choice(np.flatnonzero(examples.labels == label),
                                          min(per_class, int((examples.labels == label).sum())),
                                          replace=False)
                               for label in np.unique(examples.labels)])
        return examples.subset(np.sort(keep))

    return {"train": few(splits["train"], 40), "val": few(splits["val"], 12)}


def specialist_config():
    return override(get_config("specialist:tiny"), {"epochs": 2, "steps_per_epoch": 3})


def classifier_config():
    return override(get_config("deep_knn_classifier:tiny"), {"epochs": 2, "steps_per_epoch": 3})


def universal_config(specialists):
    config = override(get_config("universal:tiny"), {"epochs": 2, "steps_per_epoch": 3})
    config.task.args["specialists"] = specialists
    return config


@pytest.fixture(scope="module")
def retina_specialist(tmp_path_factory):
    keras.utils.set_random_seed(7)
    path = tmp_path_factory.mktemp("specialists") / "retina.keras"
    Embedder.from_preset("tiny", name="retina_specialist").save(path)
    return path


def test_metric_learning_contract(sample, tmp_path):
    config = specialist_config()
    task = run_task_test(lambda: build_task(config.task, sample), config, sample["train"],
                         tmp_path)
    assert isinstance(task, MetricLearning) and task.fields == ("image", "label")
    assert isinstance(task.deployable_model, Embedder)


def test_distillation_contract(sample, retina_specialist, tmp_path):
    config = universal_config({"retina": str(retina_specialist)})
    task = run_task_test(lambda: build_task(config.task, sample), config, sample["train"],
                         tmp_path)
    assert isinstance(task, Distillation) and task.fields == ("image", "label", "source")
    assert task.deployable_model is task.student
    assert [metric.name for metric in task.metrics] == ["loss", "rkd_loss", "ms_loss"]


def test_classification_contract(sample, tmp_path):
    config = classifier_config()
    task = run_task_test(lambda: build_task(config.task, sample), config, sample["train"],
                         tmp_path)
    assert isinstance(task, Classification) and task.fields == ("image", "label")
    assert task.samplers[0] == "shuffled"
    assert isinstance(task.deployable_model, Embedder)
    assert task.num_classes == len(sample["train"].class_names)


@pytest.mark.parametrize("name", ["specialist", "universal"])
def test_the_same_run_twice_gives_identical_weights(name, sample, retina_specialist, tmp_path):
    config = (specialist_config() if name == "specialist"
              else universal_config({"retina": str(retina_specialist)}))
    result = run_determinism_test(config, sample, tmp_path)
    assert result.history["epoch"] == [0.0, 1.0]
    assert {"loss", "val_recall@1_retina", "val_recall@1_xray"} <= set(result.history)
    if name == "universal":
        assert {"rkd_loss", "ms_loss"} <= set(result.history)


def test_the_same_classifier_run_twice_gives_identical_weights(sample, tmp_path):
    result = run_determinism_test(classifier_config(), sample, tmp_path)
    assert result.history["epoch"] == [0.0, 1.0]
    # kNN on the validation split, leave-one-out kNN on the training split (paper 001's Fig. 2).
    assert {"loss", "val_knn@5_mcr", "val_knn@1_rs", "train_knn@1_accuracy",
            "train_knn@5_rs"} <= set(result.history)
    assert result.best_path.exists()


def test_unknown_task_and_task_arguments_are_named(sample):
    config = specialist_config()
    with pytest.raises(ValueError, match=r"task must be one of \['classification', "
                                         r"'distillation', 'focal_classification', "
                                         r"'metric_learning', 'segmentation', 'ynet'\]. "
                                         r"Received: task='hash_net'"):
        build_task(override(config, {"task.name": "hash_net"}).task, sample)
    with pytest.raises(ValueError, match=r"unknown metric_learning argument\(s\) \['margin'\]"):
        build_task(override(config, {"task.args.margin": 0.1}).task, sample)
    with pytest.raises(ValueError, match=r"specialists names sources \['ct'\]"):
        build_task(universal_config({"ct": "x.keras"}).task, sample)
    with pytest.raises(ValueError, match="the specialist of 'retina' was not found"):
        build_task(universal_config({"retina": "missing.keras"}).task, sample)


def test_a_task_asking_for_masks_refuses_a_split_without_them(sample):
    task = build_task(specialist_config().task, sample)
    task.fields = ("image", "label", "mask")
    with pytest.raises(ValueError, match="trains on masks, but the training split has no masks"):
        task.check_fields(sample["train"], "training")


def test_a_config_without_evaluators_uses_the_tasks(sample, tmp_path):
    from tfmir.training import fit

    config = override(specialist_config(), {"evaluators": None, "monitor": None, "mode": None,
                                            "epochs": 1, "steps_per_epoch": 1})
    result = fit(config, sample, tmp_path, verbose=0)
    assert MetricLearning.monitor == "val_recall@1" and MetricLearning.mode == "max"
    assert {"val_recall@1", "val_recall@8"} <= set(result.history)
    assert result.best_path.exists()
