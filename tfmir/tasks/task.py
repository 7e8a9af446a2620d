"""The base of every training task: a `keras.Model` that owns its objective in `compute_loss`."""

from __future__ import annotations

import keras

FIELDS = ("image", "label", "source", "mask")
SAMPLERS = ("class_balanced", "source_aware", "shuffled")
MODES = ("max", "min")


def check_task_arguments(task: str, args, accepted) -> None:
    """Raises ValueError naming the arguments in `args` that task `task` does not take.

    Every task's `from_task_config` calls it first, so a misspelt `--config.task.args.KEY` fails
    with the list of accepted names instead of a TypeError deep inside a constructor.
    """
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise ValueError(f"unknown {task} argument(s) {unknown}; it takes {list(accepted)}")


class Task(keras.Model):
    """A training objective around a deployable model.

    A task is called on the input dict `{"image": (B, S, S, 3) pixels in [0, 255]}` and its
    `compute_loss(x, y, y_pred)` turns the model outputs and the target dict (`{"label",
    "source", "mask"}`, the fields it asks for) into the loss. Keras' own `train_step` does
    the rest: the gradient step, loss tracking, mixed-precision loss scaling and, because every
    task computes its objective with `keras.losses.Loss` objects (whose reduction divides by
    the number of replicas), the replica scaling under a `tf.distribute` strategy.

    Subclasses build their functional graph in `__init__` and set these attributes (class
    attributes or per instance), which `tfmir.training.fit` reads before training starts:

    - `fields`: the batch fields the task needs, "image" first.
    - `samplers`: the sampler names it trains on (`SAMPLERS`), the first one the default.
    - `deployable_model`: the model that `best.keras`, export and index hold (an embedder, the
      distilled student, a feature extractor).
    - `image_size`: the input side S.

    - `evaluators`, `monitor`, `mode`: what runs on the validation split after every epoch
      (`tfmir.training.evaluators` specs), the logged metric that picks `best.keras` and
      whether higher ("max") or lower ("min") is better. A config may replace them.

    Args:
        inputs: the functional inputs (a dict {"image": keras.Input}).
        outputs: the functional outputs.
        **kwargs: `keras.Model` arguments such as `name`.
    """

    fields: tuple = ("image", "label")
    samplers: tuple = ("class_balanced",)
    evaluators: tuple = ({"name": "recall", "ks": [1, 2, 4, 8]},)
    monitor: str = "val_recall@1"
    mode: str = "max"

    @property
    def deployable_model(self) -> keras.Model:
        raise NotImplementedError(f"{type(self).__name__} must define deployable_model")

    @property
    def image_size(self) -> int:
        return int(self.deployable_model.inputs[0].shape[1])

    def objective(self, x, y, y_pred, training: bool):
        """The task's loss on one batch, computed with `keras.losses.Loss` objects."""
        raise NotImplementedError(f"{type(self).__name__} must define objective")

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        del sample_weight  # tasks weight samples inside their objective
        loss = self.objective(x, y, y_pred, training=training)
        if self.losses:
            # Regularisation and layer losses, replica-scaled by Keras like a compiled loss.
            loss = loss + super().compute_loss(x, y, y_pred, training=training)
        return loss

    def check_fields(self, examples, split: str = "train") -> None:
        """Raises ValueError when `examples` lacks a field this task needs."""
        for field in self.fields:
            if field not in FIELDS:
                raise ValueError(f"{type(self).__name__} asks for field {field!r}; fields must "
                                 f"be among {FIELDS}")
        if "mask" in self.fields and getattr(examples, "masks", None) is None and (
                getattr(examples, "mask_paths", None) is None):
            raise ValueError(f"{type(self).__name__} trains on masks, but the {split} split has "
                             "no masks; give a CSV manifest with a mask column")
