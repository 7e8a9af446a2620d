"""Y-Net training (paper 002): circle loss on the R-MAC branch, pixel cross-entropy on the FPN branch."""

from __future__ import annotations

import keras
from keras import ops

from tfmir.losses import ClassCircle, LossWeight
from tfmir.models.ynet import YNet
from tfmir.tasks.task import Task, check_task_arguments

CLASSIFICATION_LOSSES = ("circle", "cross_entropy")
LOSS_WEIGHTINGS = ("fixed", "learnable", "sum")
CODE_LENGTHS = (36, 64, 128, 256)  # the paper's Table I


@keras.saving.register_keras_serializable(package="tfmir")
class YNetTraining(Task):
    """Trains a `YNet` with the coupled loss ω·L_class + (1 − ω)·L_seg (the paper's eq. 2).

    L_class is the class-level circle loss (`tfmir.losses.ClassCircle`, scale 32, margin 0.25,
    on the cosine class scores of the R-MAC branch) or, for the paper's "w/o Circle loss"
    ablation, softmax cross-entropy on the same cosines times the circle loss's scale (a cosine
    layer's logits need that scale, or the softmax stays near uniform). L_seg is the binary
    cross-entropy of every mask pixel, averaged over pixels and images. `loss_weighting`: "fixed"
    keeps ω = `weight` (0.5, the paper's initial value), "learnable" trains ω = sigmoid(θ) from
    `weight` (`tfmir.losses.LossWeight`: note that such an ω drifts toward the smaller loss), and
    "sum" is the plain L_class + L_seg the paper compares against. A Y-Net without one of the
    branches trains with the other loss alone.

    Batches are `({"image"}, {"label", "mask"})` (no "mask" without the FPN branch), plain random
    batches by default (the paper's batches of 32). The deployable model maps pixels to {"code":
    tanh values of the `num_bits` hash code, "mask": lesion probabilities} (`YNet.deployable_model`);
    it is what `best.keras`, `tfmir export`, `tfmir index --kind=hamming` and the evaluators use:
    mAP@10 of the codes by Hamming ranking and, with the FPN branch, Dice and IoU of the masks.

    Args:
        ynet: the network.
        classification_loss: one of `CLASSIFICATION_LOSSES`.
        loss_weighting: one of `LOSS_WEIGHTINGS`.
        weight: ω of "fixed", the initial ω of "learnable", in (0, 1).
        num_bits: the deployable model's code length.
        hash_seed: the seed of the fixed hash projection.
        scale: circle loss scale γ (and the cross-entropy's logit scale).
        margin: circle loss margin m.
        **kwargs: `keras.Model` arguments such as `name`.

    Example:

    ```python
    task = YNetTraining(YNet.from_preset("tiny", num_classes=3))
    fit(get_config("ynet:tiny"), {"train": train, "val": val}, "runs/ynet")
    ```

    Reference:
        Fang et al., "Combating Ambiguity for Hash-code Learning in Medical Instance Retrieval",
        IEEE JBHI 2021, Sec. III-E and IV-B; Sun et al., "Circle Loss", CVPR 2020,
        https://arxiv.org/abs/2002.10857.
    """

    samplers = ("shuffled", "class_balanced")
    monitor = "val_map@10"
    mode = "max"

    def __init__(self, ynet: YNet, classification_loss: str = "circle",
                 loss_weighting: str = "fixed", weight: float = 0.5, num_bits: int = 64,
                 hash_seed: int = 0, scale: float = 32.0, margin: float = 0.25, **kwargs):
        if not isinstance(ynet, YNet):
            raise ValueError(f"ynet must be a tfmir.models.YNet. Received {type(ynet).__name__}")
        if classification_loss not in CLASSIFICATION_LOSSES:
            raise ValueError(f"classification_loss must be one of {CLASSIFICATION_LOSSES}. "
                             f"Received: classification_loss={classification_loss!r}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}. "
                             f"Received: loss_weighting={loss_weighting!r}")
        # Built first: an impossible code length is refused before any other work.
        deployable = ynet.deployable_model(num_bits, seed=hash_seed)

        # === Functional Model ===
        images = keras.Input((ynet.image_size, ynet.image_size, 3), name="image")
        kwargs.setdefault("name", "ynet_training")
        super().__init__(inputs={"image": images}, outputs=ynet(images), **kwargs)

        self.ynet = ynet
        self.classification_loss = classification_loss
        self.loss_weighting = loss_weighting
        self.weight = float(weight)
        self.num_bits = int(num_bits)
        self.hash_seed = int(hash_seed)
        self.scale = float(scale)
        self.margin = float(margin)
        self._deployable = deployable
        self.has_class_branch = ynet.branches != "fpn"
        self.fields = ("image", "label", "mask") if ynet.has_mask else ("image", "label")
        self.evaluators = ({"name": "map", "k": 10, "codes": True},) + (
            ({"name": "segmentation"},) if ynet.has_mask else ())
        if classification_loss == "circle":
            self.class_loss = ClassCircle(scale=self.scale, margin=self.margin)
        else:
            self.class_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        self.mask_loss = keras.losses.BinaryCrossentropy(from_logits=True)
        self.loss_weight = LossWeight(mode=loss_weighting, initial=self.weight)

    @property
    def deployable_model(self) -> keras.Model:
        return self._deployable

    def objective(self, x, y, y_pred, training: bool):
        losses = []
        if self.has_class_branch:
            labels = ops.reshape(ops.cast(y["label"], "int32"), (-1,))
            scores = ops.cast(y_pred["class_scores"], "float32")
            if self.classification_loss == "cross_entropy":
                scores = scores * self.scale
            losses.append(self.class_loss(labels, scores))
        if self.ynet.has_mask:
            losses.append(self.mask_loss(ops.cast(y["mask"], "float32"),
                                         ops.cast(y_pred["mask_logits"], "float32")))
        if len(losses) == 1:
            return losses[0]
        return self.loss_weight(*losses)

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "ynet": keras.saving.serialize_keras_object(self.ynet),
            "classification_loss": self.classification_loss,
            "loss_weighting": self.loss_weighting,
            "weight": self.weight,
            "num_bits": self.num_bits,
            "hash_seed": self.hash_seed,
            "scale": self.scale,
            "margin": self.margin,
        }

    @classmethod
    def from_config(cls, config: dict) -> "YNetTraining":
        config = dict(config)
        config["ynet"] = keras.saving.deserialize_keras_object(config["ynet"])
        return cls(**config)

    @classmethod
    def from_task_config(cls, model: dict, args: dict, splits: dict) -> "YNetTraining":
        """Builds the task of a `tfmir.configs.TaskConfig`: the Y-Net from `model` (`YNet`
        arguments; `num_classes` defaults to the training split's classes) and the other
        arguments of this class from `args`."""
        check_task_arguments("ynet", args, ("classification_loss", "loss_weighting", "weight",
                                            "num_bits", "hash_seed", "scale", "margin"))
        model = dict(model)
        model.setdefault("num_classes", len(splits["train"].class_names))
        return cls(YNet(**model), **args)
