"""Binary classification with the focal loss: paper 003's ensemble members and ensemble head."""

from __future__ import annotations

import os

import keras
from keras import ops

from tfmir.losses import BinaryFocalLoss
from tfmir.metrics import positive_class_index
from tfmir.models import PROBABILITY, EnsembleMember
from tfmir.tasks.task import Task, check_task_arguments

ARCHITECTURES = ("member", "ensemble")


@keras.saving.register_keras_serializable(package="tfmir")
class FocalClassification(Task):
    """Trains a model's "probability" output (one class against the rest) with the focal loss.

    The same objective trains both stages of paper 003's classification module: each
    `EnsembleMember` (a backbone with a sigmoid head), then the head of a `StyleEnsemble` on the
    frozen members. An item's target is 1 when its label is the positive class (melanoma) and 0
    otherwise; the loss is Lin et al.'s α-balanced focal loss (`tfmir.losses.BinaryFocalLoss`,
    α = 0.25 on positives, γ = 2) averaged over the batch, on plain random batches by default, as
    the paper trains on the imbalanced data without resampling. The deployable model is the
    model itself; evaluation is its validation ROC AUC (`BinaryAUC`), which picks `best.keras`.

    Only the probability is computed in training: the task calls a view of the model that
    leaves out its Gram matrices.

    Args:
        model: an `EnsembleMember` or a `StyleEnsemble` (any functional model with a (B, 1)
            "probability" output).
        positive_class: the label index of the positive class.
        positive_name: its class name, kept for the evaluator (e.g. "mel").
        alpha: the focal loss's weight of positives (negatives get 1 − α).
        gamma: the focal loss's focusing exponent.
        **kwargs: `keras.Model` arguments such as `name`.

    Example:

    ```python
    task = FocalClassification(EnsembleMember.from_preset("tiny"), positive_class=4)
    fit(get_config("melanoma_member:tiny"), {"train": train, "val": val}, "runs/member0")
    ```

    Reference:
        Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data using
        Style Transfer, Semantic Image Segmentation and Ensemble Learning", 2021,
        https://arxiv.org/abs/2110.06331, Sec. 3.3; Lin et al.,
        "Focal Loss for Dense Object Detection", ICCV 2017, https://arxiv.org/abs/1708.02002.
    """

    fields = ("image", "label")
    samplers = ("shuffled", "class_balanced")
    monitor = "val_auc"
    mode = "max"

    def __init__(self, model: keras.Model, positive_class: int = 1,
                 positive_name: str | None = None, alpha: float = 0.25, gamma: float = 2.0,
                 **kwargs):
        output = getattr(model, "output", None)
        if not isinstance(output, dict) or PROBABILITY not in output:
            raise ValueError(f"model must be a functional keras.Model with a {PROBABILITY!r} "
                             f"output, such as an EnsembleMember. Received {type(model).__name__}")
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must be in (0, 1). Received: alpha={alpha!r}")
        if float(gamma) < 0.0:
            raise ValueError(f"gamma must be non-negative. Received: gamma={gamma!r}")

        # === Functional Model ===
        classifier = keras.Model(model.inputs, output[PROBABILITY], name="classifier")
        images = keras.Input(tuple(model.inputs[0].shape[1:]), name="image")
        kwargs.setdefault("name", "focal_classification")
        super().__init__(inputs={"image": images}, outputs=classifier(images), **kwargs)

        self.network = model
        self.positive_class = int(positive_class)
        self.positive_name = positive_name
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.evaluators = ({"name": "auc", "positive_class": (
            positive_name if positive_name is not None else self.positive_class)},)
        self.focal_loss = BinaryFocalLoss(alpha=self.alpha, gamma=self.gamma)

    @property
    def deployable_model(self) -> keras.Model:
        return self.network

    def objective(self, x, y, y_pred, training: bool):
        labels = ops.reshape(ops.cast(y["label"], "int32"), (-1, 1))
        targets = ops.cast(ops.equal(labels, self.positive_class), "float32")
        return self.focal_loss(targets, ops.cast(y_pred, "float32"))

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "model": keras.saving.serialize_keras_object(self.network),
            "positive_class": self.positive_class,
            "positive_name": self.positive_name,
            "alpha": self.alpha,
            "gamma": self.gamma,
        }

    @classmethod
    def from_config(cls, config: dict) -> "FocalClassification":
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)

    @classmethod
    def from_task_config(cls, model: dict, args: dict, splits: dict) -> "FocalClassification":
        """Builds the task of a `tfmir.configs.TaskConfig`.

        `model["architecture"]` picks the model: "member" builds an `EnsembleMember` from the
        other `model` arguments; "ensemble" builds a `StyleEnsemble` from `model["members"]`, the
        paths of the trained members' `best.keras` files, and `model["feature_dim"]`. `args`:
        `positive_class` (a class name of the training split, or an index; required), `alpha`,
        `gamma`.
        """
        check_task_arguments("focal_classification", args, ("positive_class", "alpha", "gamma"))
        args = dict(args)
        if "positive_class" not in args:
            raise ValueError("focal_classification needs args.positive_class, the positive "
                             "class's name or index (e.g. 'mel')")
        class_names = splits["train"].class_names
        positive = args.pop("positive_class")
        index = positive_class_index(class_names, positive)
        return cls(build_classifier(model), positive_class=index,
                   positive_name=str(class_names[index]), **args)


def build_classifier(model: dict) -> keras.Model:
    """The `EnsembleMember` or `StyleEnsemble` that a config's `task.model` describes.

    Raises:
        ValueError: an unknown architecture, an ensemble without members, or a member file that
            is missing or holds another kind of model.
    """
    from tfmir.models.style_ensemble import StyleEnsemble

    model = dict(model)
    architecture = model.pop("architecture", "member")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}. "
                         f"Received: architecture={architecture!r}")
    if architecture == "member":
        return EnsembleMember(**model)
    paths = model.pop("members", None)
    if not paths:
        raise ValueError("an ensemble needs model.members: the paths of its trained members' "
                         "best.keras files. Received none")
    members = []
    for path in paths:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"ensemble member not found: {path!r}")
        member = keras.saving.load_model(path, compile=False)
        if not isinstance(member, EnsembleMember):
            raise ValueError(f"ensemble member {path!r} holds a {type(member).__name__}, not an "
                             "EnsembleMember")
        members.append(member)
    return StyleEnsemble(members, **model)
