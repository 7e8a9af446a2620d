"""Paper 000's trainers as thin wrappers over `tfmir.training.fit` with the paper's configs.

`train_embedder` trains a Multi-Similarity specialist (`get_config("specialist:<preset>")`) and
`train_universal` the distilled universal model (`get_config("universal:<preset>")`); their
keyword arguments override the config's keys.
"""

from __future__ import annotations

import os
from typing import Mapping

from tfmir.configs import Config, get_config, override
from tfmir.data import Examples
from tfmir.training.fit import TrainingResult, fit

SAMPLINGS = ("source", "class")


def preset_config(name: str, preset: str, *, epochs=None, steps_per_epoch=None,
                  learning_rate=None, num_classes_per_batch=None, num_per_class=None,
                  source_weights="size", strategy="auto", mixed_precision=False, seed=0,
                  model_overrides=None, eval_ks=(1, 2, 4, 8)) -> Config:
    """`get_config(f"{name}:{preset}")` with the trainers' keyword arguments applied."""
    config = get_config(f"{name}:{preset}")
    values = {"epochs": epochs, "steps_per_epoch": steps_per_epoch,
              "optimizer.learning_rate": learning_rate,
              "sampler.num_classes_per_batch": num_classes_per_batch,
              "sampler.num_per_class": num_per_class}
    values = {key: value for key, value in values.items() if value is not None}
    model = {**config.task.model, **(model_overrides or {})}
    if model["image_size"] != config.task.model["image_size"]:
        # Keep the setting's resize / crop ratio for another input size.
        values["data.resize_size"] = int(round(
            model["image_size"] * config.data.resize_size / config.task.model["image_size"]))
    values.update({"task.model": model, "sampler.source_weights": source_weights,
                   "strategy": strategy, "mixed_precision": mixed_precision, "seed": seed,
                   "evaluators": [{"name": "recall", "ks": list(eval_ks)}]})
    return override(config, values)


def train_embedder(train: Examples, val: Examples | None, *, workdir: os.PathLike,
                   preset: str = "cpu", sampling: str = "source", verbose: int = 1,
                   callbacks=(), **overrides) -> TrainingResult:
    """Trains an `Embedder` with the Multi-Similarity loss (paper 000's specialist).

    Args:
        train: training split (one or several sources).
        val: validation split, or None to skip evaluation and best-model tracking.
        workdir: output folder (see `tfmir.training.fit`).
        preset: "tiny", "cpu" or "paper": the setting of `get_config("specialist:...")`.
        sampling: "source" (with several sources every batch comes from one source, paper
            000's source-specific sampling) or "class" (c classes drawn from all sources'
            classes, so a batch may mix sources).
        verbose: Keras verbosity.
        callbacks: extra Keras callbacks.
        **overrides: `preset_config` arguments: epochs, steps_per_epoch, learning_rate,
            num_classes_per_batch, num_per_class, source_weights, strategy, mixed_precision,
            seed, model_overrides, eval_ks.

    Returns:
        A `TrainingResult`.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}. Received: sampling={sampling!r}")
    config = preset_config("specialist", preset, **overrides)
    if sampling == "class":
        config = override(config, {"sampler.name": "class_balanced"})
    return fit(config, {"train": train, "val": val}, workdir, callbacks=callbacks,
               verbose=verbose)


def train_universal(train: Examples, val: Examples | None, *, specialists: Mapping,
                    workdir: os.PathLike, preset: str = "cpu", verbose: int = 1, callbacks=(),
                    **overrides) -> TrainingResult:
    """Distils per-source specialists into one universal `Embedder` (paper 000, "Ours").

    Every batch comes from one source, c classes x k images. A batch of a source with a
    specialist trains the student with the RKD distance loss to that specialist (frozen); a
    source without one is out of domain and trains it with Multi-Similarity
    (`tfmir.tasks.Distillation`). The log adds `rkd_loss` and, with an out-of-domain source,
    `ms_loss`; `best.keras` and `final.keras` hold the student.

    Args:
        train: training split with several sources.
        val: validation split, or None.
        specialists: source name -> its specialist, a `keras.Model` or a `.keras` path.
        workdir: output folder.
        preset: "tiny", "cpu" or "paper": the setting of `get_config("universal:...")`.
        verbose: Keras verbosity.
        callbacks: extra Keras callbacks.
        **overrides: as for `train_embedder`.

    Returns:
        A `TrainingResult` whose `model` is the student embedder.

    Reference:
        Feng et al., "Universal Model for Multi-Domain Medical Image Retrieval",
        https://arxiv.org/abs/2007.08628, Sec. III and IV-D.
    """
    config = preset_config("universal", preset, **overrides)
    config.task.args["specialists"] = dict(specialists)
    return fit(config, {"train": train, "val": val}, workdir, callbacks=callbacks,
               verbose=verbose)
