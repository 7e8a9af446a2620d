"""Distils frozen per-source specialists into one universal student embedder (paper 000)."""

from __future__ import annotations

from typing import Mapping, Sequence

import keras
import tensorflow as tf
from keras import ops

from tfmir.losses.multi_similarity import multi_similarity
from tfmir.losses.rkd import rkd_distance


@keras.saving.register_keras_serializable(package="tfmir")
class Distiller(keras.Model):
    """Trains a student embedder on source-specific batches, each taught by its source's specialist.

    Training batches are `(images, labels, source_indices)` (e.g. `make_dataset(...,
    with_sources=True)` over a `SourceAwareSampler`), every item of a batch from one source;
    `source_indices[i]` is the position of item i's source in `source_names`. For a batch of
    source s the loss is the RKD distance loss between the embeddings of s's specialist (the
    teacher, frozen, run with `training=False`) and the student's. A source without a
    specialist (out of domain, like ImageNet in the paper) gets the Multi-Similarity loss on the
    student's embeddings instead. The choice is made inside the compiled training step by a
    switch on the batch's source index, so alternating sources never retraces it.

    Calling the distiller calls the student, so it embeds, predicts and is evaluated like an
    `Embedder`; the model to keep, export and index is `distiller.student`.

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
    distiller = Distiller(student, {"retina": retina_specialist, "xray": xray_specialist},
                          source_names=train.source_names)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3))
    distiller.fit(make_dataset(train, training=True, sampler=sampler, with_sources=True,
                               image_size=32, resize_size=36), steps_per_epoch=100)
    distiller.student.save("universal.keras")
    ```

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
        unknown = sorted(set(map(str, specialists)) - set(source_names))
        if unknown:
            raise ValueError(f"specialists names sources {unknown} that are not among the "
                             f"training sources {source_names}")
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
        images = keras.Input(input_shape, name="images")
        embeddings = student(images)
        kwargs.setdefault("name", "distiller")
        super().__init__(inputs=images, outputs=embeddings, **kwargs)

        self.student = student
        self.specialists = specialists
        self.source_names = source_names
        self.delta = float(delta)
        self.loss_tracker = keras.metrics.Mean(name="loss")
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
    def from_config(cls, config: dict) -> "Distiller":
        config = dict(config)
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        config["specialists"] = {name: keras.saving.deserialize_keras_object(specialist)
                                 for name, specialist in config["specialists"].items()}
        return cls(**config)

    @property
    def metrics(self):
        trackers = [self.loss_tracker]
        if self.specialists:
            trackers.append(self.rkd_loss_tracker)
        if len(self.specialists) < len(self.source_names):
            trackers.append(self.ms_loss_tracker)
        return trackers

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
        source_indices = ops.reshape(source_indices, (-1,))
        # Checked outside XLA; under XLA the assertion compiles to nothing.
        tf.debugging.assert_equal(source_indices, source_indices[0], message=(
            "every item of a Distiller batch must come from one source; use a "
            "SourceAwareSampler"))
        embeddings = self.student(images, training=training)
        source_index = self._source_index(source_indices)
        if not self.specialists:
            return multi_similarity(labels, embeddings)
        # One switch holds every source's teacher: alternating sources never retraces the step.
        # Only the teachers' forward passes sit inside it; the losses are computed outside, so
        # no gradient has to flow back through the switch.
        teacher_embeddings = ops.switch(
            source_index, [self._teacher_branch(name) for name in self.source_names], images)
        distillation = rkd_distance(teacher_embeddings, embeddings, delta=self.delta)
        if all(self._taught):
            return distillation
        out_of_domain = multi_similarity(labels, embeddings)
        return ops.where(self._is_taught(source_index), distillation, out_of_domain)

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

    def _batch_loss(self, data, training):
        images, labels, source_indices = data
        losses = self.distillation_losses(images, labels, source_indices, training=training)
        batch_loss = ops.mean(losses)
        loss = batch_loss
        if self.student.losses:
            loss = loss + ops.sum([ops.cast(extra, "float32") for extra in self.student.losses])
        taught = ops.cast(self._is_taught(self._source_index(source_indices)), "float32")
        self.loss_tracker.update_state(loss)
        self.rkd_loss_tracker.update_state(batch_loss, sample_weight=taught)
        self.ms_loss_tracker.update_state(batch_loss, sample_weight=1.0 - taught)
        return loss

    def train_step(self, data):
        with tf.GradientTape() as tape:
            loss = self._batch_loss(data, training=True)
            # Replica gradients are summed across replicas: average them, as Keras' losses do.
            loss = loss / tf.distribute.get_strategy().num_replicas_in_sync
            loss = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        gradients = tape.gradient(loss, variables)
        self.optimizer.apply_gradients(zip(gradients, variables))
        return {metric.name: metric.result() for metric in self.metrics}

    def test_step(self, data):
        self._batch_loss(data, training=False)
        return {metric.name: metric.result() for metric in self.metrics}


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
