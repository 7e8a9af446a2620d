"""Metric learning: an embedder trained with a pair-based loss on class-balanced batches."""

from __future__ import annotations

import keras

from tfmir.losses import BatchHardTriplet
from tfmir.losses import KNNTriplet
from tfmir.losses import MultiSimilarity
from tfmir.models import Embedder
from tfmir.tasks.task import Task, check_task_arguments

LOSSES = {"multi_similarity": MultiSimilarity, "knn_triplet": KNNTriplet,
          "batch_hard_triplet": BatchHardTriplet}


@keras.saving.register_keras_serializable(package="tfmir")
class MetricLearning(Task):
    """Trains an `Embedder` with a metric-learning loss (paper 000's specialist: Multi-Similarity).

    Batches are `({"image"}, {"label"})`, c classes x k images each (class-balanced, or
    source-aware with one source per batch); the loss sees the batch's labels and embeddings.
    The deployable model is the embedder.

    Args:
        embedder: the `Embedder` (or any model from pixels to embeddings) to train.
        loss: a `keras.losses.Loss` with the metric-learning signature (labels, embeddings), or
            a config {"name": "multi_similarity", **arguments}; default Multi-Similarity with
            the paper's alpha=2, beta=50, lambda=0.5, epsilon=0.1.
        **kwargs: `keras.Model` arguments such as `name`.

    Example:

    ```python
    task = MetricLearning(Embedder.from_preset("tiny"))
    fit(task_config, {"train": train, "val": val}, "runs/retina")
    ```

    Reference:
        Feng et al., "Universal Model for Multi-Domain Medical Image Retrieval",
        https://arxiv.org/abs/2007.08628, Sec. IV-B; Wang et al., "Multi-Similarity Loss with
        General Pair Weighting for Deep Metric Learning", https://arxiv.org/abs/1904.06627
    """

    fields = ("image", "label")
    samplers = ("source_aware", "class_balanced")

    def __init__(self, embedder: keras.Model, loss=None, **kwargs):
        if not getattr(embedder, "inputs", None):
            raise ValueError("embedder must be a functional keras.Model with known inputs, such "
                             f"as an Embedder. Received {type(embedder).__name__}")
        loss = make_loss(loss)

        # === Functional Model ===
        images = keras.Input(tuple(embedder.inputs[0].shape[1:]), name="image")
        embeddings = embedder(images)
        kwargs.setdefault("name", "metric_learning")
        super().__init__(inputs={"image": images}, outputs=embeddings, **kwargs)

        self.embedder = embedder
        self.loss_function = loss

    @property
    def deployable_model(self) -> keras.Model:
        return self.embedder

    def objective(self, x, y, y_pred, training: bool):
        return self.loss_function(y["label"], y_pred)

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "embedder": keras.saving.serialize_keras_object(self.embedder),
            "loss": keras.saving.serialize_keras_object(self.loss_function),
        }

    @classmethod
    def from_config(cls, config: dict) -> "MetricLearning":
        config = dict(config)
        config["embedder"] = keras.saving.deserialize_keras_object(config["embedder"])
        config["loss"] = keras.saving.deserialize_keras_object(config["loss"])
        return cls(**config)

    @classmethod
    def from_task_config(cls, model: dict, args: dict, splits: dict) -> "MetricLearning":
        """Builds the task of a `tfmir.configs.TaskConfig` (model = `Embedder` arguments)."""
        del splits
        check_task_arguments("metric_learning", args, ("loss",))
        return cls(Embedder(**model), loss=args.get("loss"))


def make_loss(loss) -> keras.losses.Loss:
    """A loss instance from an instance, None (Multi-Similarity) or {"name": ..., **arguments}."""
    if isinstance(loss, keras.losses.Loss):
        return loss
    if loss is None:
        return MultiSimilarity()
    if isinstance(loss, dict):
        arguments = dict(loss)
        name = arguments.pop("name", "multi_similarity")
        if name in LOSSES:
            return LOSSES[name](**arguments)
        raise ValueError(f"loss name must be one of {sorted(LOSSES)}. Received: name={name!r}")
    raise ValueError("loss must be a keras.losses.Loss, None or {'name': ..., **arguments}. "
                     f"Received: loss={loss!r}")
