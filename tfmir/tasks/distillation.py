"""Distils frozen per-source specialists into one universal student embedder (paper 000)."""

from __future__ import annotations

import os

from typing import Mapping, Sequence

import keras
import tensorflow as tf
from keras import ops

from tfmir.losses.multi_similarity import MultiSimilarity, multi_similarity
from tfmir.losses.rkd import RKDDistance, rkd_distance
from tfmir.models import Embedder
from tfmir.tasks.task import Task, check_task_arguments


@keras.saving.register_keras_serializable(package="tfmir")
class Distillation(Task):
    """Trains a student embedder on source-specific batches, each taught by its source's specialist.

    Training batches are `({"image"}, {"label", "source"})` (`make_dataset(..., fields=("image",
    "label", "source"))` over a `SourceAwareSampler`), every item of a batch from one source;
    `source[i]` is the position of item i's source in `source_names`. For a batch of
    source s the loss is the RKD distance loss between the embeddings of s's specialist (the
    teacher, frozen, run with `training=False`) and the student's. A source without a
    specialist (out of domain, like ImageNet in the paper) gets the Multi-Similarity loss on the
    student's embeddings instead. The choice is made inside the compiled training step by a
    switch on the batch's source index, so alternating sources never retraces it.

    Calling the task calls the student; the deployable model, which `best.keras`, export and
    index hold, is `task.student`.

    Logs `loss` (all batches), `rkd_loss` (batches of sources with a specialist) and, when some
    source has none, `ms_loss` (the others): the means over the epoch's batches of that kind
    (NaN in an epoch that drew no batch of that kind).

    Args:
        student: the embedder to train (a functional `keras.Model`, e.g. an `Embedder`).
        specialists: source name -> frozen teacher mapping the student's input images to
            embeddings of any size. They are set to `trainable=False` here.
        source_names: every training source, in source-index order (`Examples.source_names`).
        delta: the Huber threshold of the RKD loss.
        **kwargs: `keras.Model` arguments such as `name`.

    Example:

    ```python
    student = Embedder.from_preset("tiny")
    task = Distillation(student, {"retina": retina_specialist, "xray": xray_specialist},
                        source_names=train.source_names)
    ```
    or, from the command line, `tfmir train --config=universal:cpu
    --config.task.args.specialists="{'retina': 'runs/retina/best.keras', ...}"`.

    Reference:
        Feng et al., "Universal Model for Multi-Domain Medical Image Retrieval",
        https://arxiv.org/abs/2007.08628, Sec. III and IV-D; RKD: Park et al., CVPR 2019,
        https://arxiv.org/abs/1904.05068
    """

    def __init__(self, student: keras.Model, specialists: Mapping[str, keras.Model],
                 source_names: Sequence[str], *, delta: float = 1.0, **kwargs):
        source_names = tuple(str(name) for name in source_names)
        if not source_names or len(set(source_names)) != len(source_names):
            raise ValueError("source_names must be a non-empty sequence of distinct names. "
                             f"Received: source_names={source_names!r}")
        specialists = check_specialists(dict(specialists), source_names)
        if not getattr(student, "inputs", None):
            raise ValueError("student must be a functional keras.Model with known inputs, such as "
                             f"an Embedder. Received {type(student).__name__}")
        if not float(delta) > 0:
            raise ValueError(f"delta must be positive. Received: delta={delta!r}")
        input_shape = tuple(student.inputs[0].shape[1:])
        specialists = {name: specialists[name] for name in source_names if name in specialists}
        for name, specialist in specialists.items():
            if specialist is student:
                raise ValueError(f"the specialist of {name!r} is the student itself; pass a "
                                 "separate (e.g. cloned) model")
            teacher_inputs = getattr(specialist, "inputs", None)
            if teacher_inputs and tuple(teacher_inputs[0].shape[1:]) != input_shape:
                raise ValueError(
                    f"the specialist of {name!r} takes inputs of shape "
                    f"{tuple(teacher_inputs[0].shape[1:])} but the student takes {input_shape}; "
                    "both embed the same images"
                )
            specialist.trainable = False

        # === Functional Model ===
        images = keras.Input(input_shape, name="image")
        embeddings = student(images)
        kwargs.setdefault("name", "distillation")
        super().__init__(inputs={"image": images}, outputs=embeddings, **kwargs)

        self.student = student
        self.specialists = specialists
        self.source_names = source_names
        self.delta = float(delta)
        self.rkd_loss = RKDDistance(delta=self.delta)
        self.ms_loss = MultiSimilarity()
        self.rkd_loss_tracker = _MeanOrNaN(name="rkd_loss")
        self.ms_loss_tracker = _MeanOrNaN(name="ms_loss")
        self._taught = tuple(name in specialists for name in source_names)
        self._teacher_width = max((_output_width(specialist, input_shape)
                                   for specialist in specialists.values()), default=1)

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "student": keras.saving.serialize_keras_object(self.student),
            "specialists": {name: keras.saving.serialize_keras_object(specialist)
                            for name, specialist in self.specialists.items()},
            "source_names": list(self.source_names),
            "delta": self.delta,
        }

    @classmethod
    def from_config(cls, config: dict) -> "Distillation":
        config = dict(config)
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        config["specialists"] = {name: keras.saving.deserialize_keras_object(specialist)
                                 for name, specialist in config["specialists"].items()}
        return cls(**config)

    fields = ("image", "label", "source")
    samplers = ("source_aware",)

    @property
    def deployable_model(self) -> keras.Model:
        return self.student

    @property
    def metrics(self):
        trackers = list(super().metrics)
        if not self.specialists:
            trackers.remove(self.rkd_loss_tracker)
        if len(self.specialists) == len(self.source_names):
            trackers.remove(self.ms_loss_tracker)
        return trackers

    @classmethod
    def from_task_config(cls, model: dict, args: dict, splits: dict) -> "Distillation":
        """Builds the task of a `tfmir.configs.TaskConfig`: the student from `model`
        (`Embedder` arguments), args = {"specialists": {source: .keras path or model},
        "delta": ...}; the source names are the training split's."""
        check_task_arguments("distillation", args, ("specialists", "delta"))
        specialists = check_specialists(args.get("specialists") or {},
                                        splits["train"].source_names)
        # The student first: its initial weights must not depend on how teachers are given.
        student = Embedder(**model)
        teachers = {name: (specialist if isinstance(specialist, keras.Model)
                           else keras.saving.load_model(specialist, compile=False))
                    for name, specialist in specialists.items()}
        return cls(student, teachers, source_names=splits["train"].source_names,
                   delta=args.get("delta", 1.0))

    def distillation_losses(self, images, labels, source_indices, training=False):
        """Per-sample losses of a one-source batch: RKD to its specialist, else Multi-Similarity.

        Args:
            images: (B, S, S, 3) pixels, all from one source.
            labels: (B,) class labels (used by the Multi-Similarity loss only).
            source_indices: (B,) position of each item's source in `source_names`, all equal
                (or a scalar).
            training: run the student in training mode (the teachers never are).

        Returns:
            float32 (B,) tensor.
        """
        embeddings = self.student(images, training=training)
        teacher_embeddings, source_index = self.teacher_embeddings(images, source_indices)
        if not self.specialists:
            return multi_similarity(labels, embeddings)
        distillation = rkd_distance(teacher_embeddings, embeddings, delta=self.delta)
        if all(self._taught):
            return distillation
        out_of_domain = multi_similarity(labels, embeddings)
        return ops.where(self._is_taught(source_index), distillation, out_of_domain)

    def teacher_embeddings(self, images, source_indices):
        """The embeddings of the batch's teacher (zeros for a source without one) and the source.

        Returns:
            (float32 (B, widest teacher) embeddings, the batch's int32 source index).
        """
        source_indices = ops.reshape(source_indices, (-1,))
        # Checked outside XLA; under XLA the assertion compiles to nothing.
        tf.debugging.assert_equal(source_indices, source_indices[0], message=(
            "every item of a Distillation batch must come from one source; use a "
            "SourceAwareSampler"))
        source_index = self._source_index(source_indices)
        if not self.specialists:
            return ops.zeros((ops.shape(images)[0], 1), "float32"), source_index
        # One switch holds every source's teacher: alternating sources never retraces the step.
        # Only the teachers' forward passes sit inside it; the losses are computed outside, so
        # no gradient has to flow back through the switch.
        teacher_embeddings = ops.switch(
            source_index, [self._teacher_branch(name) for name in self.source_names], images)
        return teacher_embeddings, source_index

    def _teacher_branch(self, name):
        """images -> the teacher's embeddings, zero-padded to the widest teacher's size.

        Zero columns leave every pairwise distance unchanged, and one width lets the switch
        return one static shape whatever the teachers' embedding sizes.
        """
        specialist = self.specialists.get(name)
        width = self._teacher_width
        if specialist is None:
            return lambda images: ops.zeros((ops.shape(images)[0], width), "float32")

        def embed(images):
            embeddings = ops.cast(specialist(images, training=False), "float32")
            padding = width - embeddings.shape[-1]
            return ops.pad(embeddings, [[0, 0], [0, padding]]) if padding else embeddings

        return embed

    def _source_index(self, source_indices):
        return ops.cast(ops.reshape(source_indices, (-1,))[0], "int32")

    def _is_taught(self, source_index):
        return ops.take(ops.convert_to_tensor(self._taught), source_index)

    def objective(self, x, y, y_pred, training: bool):
        # One compiled loss per kind, each weighted by whether this batch is of its kind: a
        # batch comes from one source, so exactly one of them counts, and both reduce (and
        # replica-scale) like any keras.losses.Loss.
        del training  # y_pred is the student's output, in the step's mode
        labels, embeddings = y["label"], y_pred
        teacher_embeddings, source_index = self.teacher_embeddings(x["image"], y["source"])
        taught = ops.cast(self._is_taught(source_index), "float32")
        weights = ops.ones_like(ops.cast(labels, "float32"))
        loss = ops.zeros((), "float32")
        replicas = ops.cast(tf.distribute.get_strategy().num_replicas_in_sync, "float32")
        if self.specialists:
            distillation = self.rkd_loss(teacher_embeddings, embeddings,
                                         sample_weight=weights * taught)
            # The trackers log this batch's unscaled mean, as Keras' loss tracker does.
            self.rkd_loss_tracker.update_state(distillation * replicas, sample_weight=taught)
            loss = loss + distillation
        if not all(self._taught):
            out_of_domain = self.ms_loss(labels, embeddings, sample_weight=weights * (1 - taught))
            self.ms_loss_tracker.update_state(out_of_domain * replicas, sample_weight=1 - taught)
            loss = loss + out_of_domain
        return loss


class _MeanOrNaN(keras.metrics.Mean):
    """A mean that is NaN, not 0, before any weight arrives: "not measured" is not "zero loss"."""

    def result(self):
        count = ops.cast(self.count, self.dtype)
        return ops.where(count > 0, self.total / ops.maximum(count, 1e-12), float("nan"))


def _output_width(model: keras.Model, input_shape: tuple) -> int:
    """The embedding size of `model` (its last output dimension)."""
    outputs = getattr(model, "outputs", None)
    shape = outputs[0].shape if outputs else model.compute_output_shape((None, *input_shape))
    if shape[-1] is None:
        raise ValueError(f"the embedding size of specialist {model.name!r} is unknown")
    return int(shape[-1])


def check_specialists(specialists, source_names) -> dict:
    """{source: keras.Model or existing .keras path}, every source among `source_names`."""
    if not isinstance(specialists, dict):
        raise ValueError("specialists must map source names to .keras files. "
                         f"Received: specialists={specialists!r}")
    unknown = sorted(set(map(str, specialists)) - set(source_names))
    if unknown:
        raise ValueError(f"specialists names sources {unknown} that are not among the training "
                         f"sources {list(source_names)}")
    for name, specialist in specialists.items():
        if isinstance(specialist, keras.Model):
            continue
        if not isinstance(specialist, (str, os.PathLike)):
            raise ValueError(f"the specialist of {name!r} must be a keras.Model or the path of a "
                             f".keras file. Received {type(specialist).__name__}")
        if not os.path.isfile(specialist):
            raise ValueError(f"the specialist of {name!r} was not found: {os.fspath(specialist)}")
    return {str(name): specialist for name, specialist in specialists.items()}
