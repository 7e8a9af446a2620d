"""Paper 000's settings: Multi-Similarity specialists and the universal model distilled from them.

`get_config(arg)` returns one setting: "tiny" (tests, seconds), "cpu" (finishes on a 2-core CPU
in minutes, from scratch), "paper" (Sec. IV-B: ImageNet ResNet50 -> Dense(128) -> L2;
256 -> random crop 224 + flip; batches of 26 classes x 5; Adam, learning rate 1e-5).

Reference:
    Feng et al., "Universal Model for Multi-Domain Medical Image Retrieval",
    https://arxiv.org/abs/2007.08628, Sec. III-IV.
"""

from __future__ import annotations

from tfmir.configs.config import Config, DataConfig, OptimizerConfig, SamplerConfig, TaskConfig

SETTINGS = ("tiny", "cpu", "paper")

# The embedder, the data sizes and the schedule of each setting.
_MODELS = {
    "tiny": {"backbone": "small_resnet", "backbone_widths": [8, 16], "embedding_dim": 128,
             "image_size": 32, "weights": None},
    "cpu": {"backbone": "small_resnet", "backbone_widths": [16, 32, 64, 128],
            "embedding_dim": 128, "image_size": 64, "weights": None},
    "paper": {"backbone": "resnet50", "backbone_widths": None, "embedding_dim": 128,
              "image_size": 224, "weights": "imagenet"},
}
_RESIZE = {"tiny": 36, "cpu": 72, "paper": 256}
_SCHEDULES = {
    # (classes per batch, images per class, learning rate, epochs, steps per epoch)
    "tiny": (4, 5, 1e-3, 2, 5),
    # From scratch, larger learning rates drive Multi-Similarity into the collapsed state (all
    # embeddings equal) on classes that overlap, such as RetinaMNIST's grades.
    "cpu": (12, 5, 3e-4, 8, 100),
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
    return _base(setting, TaskConfig(name="metric_learning", model=dict(_MODELS[setting]),
                                     args={"loss": {}}), "source_aware")


def universal(setting: str = "paper") -> Config:
    """The universal student distilled with RKD from per-source specialists.

    `task.args.specialists` maps each source to its specialist's `.keras` file (a source
    without one is out of domain and trains with Multi-Similarity); set it on the command line
    as `--config.task.args.specialists="{'skin': 'runs/skin/best.keras', ...}"`.
    """
    _check(setting)
    return _base(setting, TaskConfig(name="distillation", model=dict(_MODELS[setting]),
                                     args={"specialists": {}, "delta": 1.0}), "source_aware")
