"""A CNN classifier trained with class-weighted cross-entropy; its feature extractor is deployed."""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
from keras import ops

from tfmir.models import Embedder
from tfmir.tasks.task import Task, check_task_arguments

CLASS_WEIGHTINGS = ("inverse_frequency", "none")


def inverse_frequency_weights(labels, num_classes: int) -> np.ndarray:
    """Class weights proportional to 1 / class frequency, normalised to a mean sample weight of 1.

    w_c = N / (C * n_c), with n_c the number of items of class c, N = sum_c n_c and C the number
    of classes present; a class without items gets 0 (it never appears in a batch). Then
    sum_c n_c * w_c = N: over the training split the weights average to 1, so the weighted loss
    keeps the scale of the plain one, and each present class carries the same total weight N / C.

    Args:
        labels: the training labels, shape (N,).
        num_classes: the number of classes (the head's width).

    Returns:
        float32 array (num_classes,).

    Example:

    >>> inverse_frequency_weights([0, 0, 0, 1], num_classes=3)  # 4/(2*3), 4/(2*1), 0
    array([0.6666667, 2.       , 0.       ], dtype=float32)
    """
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        raise ValueError("class weights need at least one training label. Received none")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}). Received labels from "
                         f"{labels.min()} to {labels.max()}")
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = labels.size / (present.sum() * counts[present])
    return weights.astype(np.float32)


@keras.saving.register_keras_serializable(package="tfmir")
class Classification(Task):
    """A CNN classifier: an embedder's features -> Dense(num_classes), class-weighted cross-entropy.

    The head reads the embedder's features before their L2 normalisation (an `Embedder`'s
    "projection" layer; a model without one: its output), so the logits are not bounded by unit
    features. The loss is the softmax cross-entropy of each item weighted by its class's weight,
    averaged over the batch (`keras.losses.SparseCategoricalCrossentropy` with sample weights):
    with plain random batches ("shuffled", the default sampler) and inverse-frequency weights
    (`inverse_frequency_weights`) every class contributes equally to the expected loss.

    Calling the task gives the logits (`logits_model()`: the same from a plain image tensor). The
    deployable model is the embedder: the classifier with
    its last fully connected layer removed, whose (normalised) features kNN classification,
    export and index use; `MetricLearning` can start from it (`task.args.init_from`, paper 001's
    deep kNN*).

    Args:
        embedder: the feature extractor, a functional model from pixels to features (e.g. an
            `Embedder`).
        num_classes: the number of classes.
        class_weights: one weight per class, or None for the unweighted cross-entropy.
        **kwargs: `keras.Model` arguments such as `name`.

    Example:

    ```python
    weights = inverse_frequency_weights(train.labels, len(train.class_names))
    task = Classification(Embedder.from_preset("tiny"), len(train.class_names), weights)
    fit(get_config("deep_knn_classifier:tiny"), {"train": train, "val": val}, "runs/ce")
    ```

    Reference:
        Zhuang et al., "Deep kNN for Medical Image Classification", MICCAI 2020,
        https://doi.org/10.1007/978-3-030-59710-8_13, Table 2 ("Weighted-CE", "deep kNN*").
    """

    fields = ("image", "label")
    samplers = ("shuffled", "class_balanced")
    evaluators = ({"name": "knn", "num_neighbors": (1, 5)},)
    monitor = "val_knn@5_mcr"
    mode = "max"

    def __init__(self, embedder: keras.Model, num_classes: int,
                 class_weights: Sequence[float] | None = None, **kwargs):
        if not getattr(embedder, "inputs", None):
            raise ValueError("embedder must be a functional keras.Model with known inputs, such "
                             f"as an Embedder. Received {type(embedder).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or (
                num_classes < 2):
            raise ValueError(f"num_classes must be an integer of at least 2. "
                             f"Received: num_classes={num_classes!r}")
        num_classes = int(num_classes)
        if class_weights is not None:
            class_weights = [float(weight) for weight in class_weights]
            if len(class_weights) != num_classes or min(class_weights) < 0 or not any(
                    class_weights):
                raise ValueError(f"class_weights must give {num_classes} non-negative weights, "
                                 f"not all 0. Received: class_weights={class_weights!r}")
        try:
            features_output = embedder.get_layer("projection").output
        except ValueError:
            features_output = embedder.outputs[0]

        # === Functional Model ===
        features = keras.Model(embedder.inputs, features_output, name="features")
        images = keras.Input(tuple(embedder.inputs[0].shape[1:]), name="image")
        logits = keras.layers.Dense(num_classes, dtype="float32", name="classifier")(
            features(images))
        kwargs.setdefault("name", "classification")
        super().__init__(inputs={"image": images}, outputs=logits, **kwargs)

        self.embedder = embedder
        self.num_classes = num_classes
        self.class_weights = class_weights
        self.cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @property
    def deployable_model(self) -> keras.Model:
        return self.embedder

    def logits_model(self) -> keras.Model:
        """A plain functional model from (B, S, S, 3) pixels to logits, sharing the task's layers
        (the classifier's own prediction is their argmax)."""
        images = keras.Input(tuple(self.embedder.inputs[0].shape[1:]), name="images")
        logits = self.get_layer("classifier")(self.get_layer("features")(images))
        return keras.Model(images, logits, name="logits")

    def objective(self, x, y, y_pred, training: bool):
        labels = ops.reshape(ops.cast(y["label"], "int32"), (-1,))
        sample_weight = None
        if self.class_weights is not None:
            sample_weight = ops.take(ops.convert_to_tensor(self.class_weights, "float32"), labels)
        return self.cross_entropy(labels, y_pred, sample_weight=sample_weight)

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "embedder": keras.saving.serialize_keras_object(self.embedder),
            "num_classes": self.num_classes,
            "class_weights": self.class_weights,
        }

    @classmethod
    def from_config(cls, config: dict) -> "Classification":
        config = dict(config)
        config["embedder"] = keras.saving.deserialize_keras_object(config["embedder"])
        return cls(**config)

    @classmethod
    def from_task_config(cls, model: dict, args: dict, splits: dict) -> "Classification":
        """Builds the task of a `tfmir.configs.TaskConfig`: the embedder from `model` (`Embedder`
        arguments), one class per training class name, args = {"class_weighting":
        "inverse_frequency" (default, from the training split) or "none"}."""
        check_task_arguments("classification", args, ("class_weighting",))
        weighting = args.get("class_weighting", "inverse_frequency")
        if weighting not in CLASS_WEIGHTINGS:
            raise ValueError(f"class_weighting must be one of {CLASS_WEIGHTINGS}. "
                             f"Received: class_weighting={weighting!r}")
        train = splits["train"]
        num_classes = len(train.class_names)
        weights = (inverse_frequency_weights(train.labels, num_classes)
                   if weighting == "inverse_frequency" else None)
        return cls(Embedder(**model), num_classes,
                   None if weights is None else weights.tolist())
