"""Training tasks: one `keras.Model` per objective, each owning its loss in `compute_loss`."""

from __future__ import annotations

import os

import keras

from tfmir.tasks.classification import Classification, inverse_frequency_weights
from tfmir.tasks.distillation import Distillation
from tfmir.tasks.focal_classification import FocalClassification
from tfmir.tasks.metric_learning import MetricLearning
from tfmir.tasks.segmentation import Segmentation
from tfmir.tasks.task import FIELDS, SAMPLERS, Task
from tfmir.tasks.ynet import YNetTraining

# config task name -> task class (each has `from_task_config(model, args, splits)`)
TASKS = {
    "metric_learning": MetricLearning,
    "distillation": Distillation,
    "classification": Classification,
    "ynet": YNetTraining,
    "focal_classification": FocalClassification,
    "segmentation": Segmentation,
}

# A task argument every task takes: start the deployable model from a saved one.
INIT_FROM = "init_from"


def build_task(config, splits: dict) -> Task:
    """The task of `config.task` (a `tfmir.configs.TaskConfig`) for the data in `splits`.

    `config.args["init_from"]`, for every task: the path of a saved deployable model (a run's
    `best.keras` or `final.keras`) whose weights the new task's deployable model starts from, e.g.
    a classifier's feature extractor fine-tuned with the deep-kNN loss (paper 001's deep kNN*).
    The model is then built without pretrained weights (`model["weights"] = None`), since they
    would be replaced.

    Raises:
        ValueError: an unknown task name, arguments the task does not take, or an `init_from`
            model whose weights do not fit the deployable model.
    """
    name = config.name
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}. Received: task={name!r}")
    model, args = dict(config.model), dict(config.args)
    init_from = args.pop(INIT_FROM, None)
    if init_from is not None and "weights" in model:
        model["weights"] = None
    task = TASKS[name].from_task_config(model, args, splits)
    if init_from is not None:
        initialize_from(task.deployable_model, init_from)
    return task


def initialize_from(model: keras.Model, path) -> None:
    """Copies the weights of the model saved at `path` into `model`, which must match it.

    Args:
        model: the model to initialise (a task's deployable model).
        path: a `.keras` file of a model with the same weights (order and shapes).

    Raises:
        ValueError: a missing file, or weights of another number or shape (the message names
            the first mismatch).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"init_from model not found: {path!r}")
    source = keras.saving.load_model(path, compile=False)
    weights, targets = source.weights, model.weights
    if len(weights) != len(targets):
        raise ValueError(f"init_from model {path!r} has {len(weights)} weights; the model to "
                         f"initialise ({model.name!r}) has {len(targets)}")
    for weight, target in zip(weights, targets):
        if tuple(weight.shape) != tuple(target.shape):
            raise ValueError(f"init_from model {path!r}: weight {weight.path!r} has shape "
                             f"{tuple(weight.shape)}, but {target.path!r} of {model.name!r} has "
                             f"{tuple(target.shape)}")
    model.set_weights(source.get_weights())


__all__ = ["Classification", "Distillation", "FIELDS", "FocalClassification", "INIT_FROM",
           "MetricLearning", "SAMPLERS", "Segmentation", "TASKS", "Task", "YNetTraining",
           "build_task", "initialize_from", "inverse_frequency_weights"]
