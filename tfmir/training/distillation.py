"""Trains paper 000's universal embedder: one student distilled from per-source specialists."""

from __future__ import annotations

import os
from typing import Mapping

import keras

from tfmir.data import Examples, SourceAwareSampler, make_dataset
from tfmir.models import Distiller, Embedder
from tfmir.training.strategy import make_strategy
from tfmir.training.trainer import (
    LOG_FILE,
    TrainingResult,
    _check_splits,
    _fit,
    _prepare_workdir,
    _resolve_schedule,
    _sharded,
    read_log,
)


def train_universal(train: Examples, val: Examples | None, *, specialists: Mapping,
                    workdir: os.PathLike, preset: str = "cpu", epochs: int | None = None,
                    steps_per_epoch: int | None = None, learning_rate: float | None = None,
                    num_classes_per_batch: int | None = None, num_per_class: int | None = None,
                    source_weights="size", strategy: str = "auto", seed: int = 0,
                    model_overrides: dict | None = None, eval_ks=(1, 2, 4, 8), verbose: int = 1,
                    callbacks=()) -> TrainingResult:
    """Distils per-source specialists into one universal `Embedder` (paper 000, "Ours").

    Every batch comes from one source (`SourceAwareSampler`), c classes x k images. A batch of a
    source with a specialist trains the student with the RKD distance loss to that specialist
    (frozen); a source without one is out of domain and trains it with Multi-Similarity. The
    student is built from `preset` like a specialist. Outputs and behaviour are those of
    `train_embedder`: per-epoch Recall@K on `val` per source (the same log keys), the best
    student by validation Recall@1 in `workdir/best.keras`, the last in `workdir/final.keras`
    (plain `Embedder`s), resumption from `workdir/backup`, `workdir/log.csv` and TensorBoard.
    The log adds `rkd_loss` and, with an out-of-domain source, `ms_loss`.

    Args:
        train: training split with several sources (`Examples.sources`).
        val: validation split, or None to skip evaluation and best-model tracking.
        specialists: source name -> its specialist, a `keras.Model` or the path of a `.keras`
            file (e.g. `train_embedder`'s best.keras on that source alone). Paths are loaded
            under the distribution strategy; prefer them to models with `strategy` other than
            "auto". The specialists must take the student's image size.
        workdir: output folder.
        preset: "tiny", "cpu" or "paper" (`tfmir.models.PRESETS`); the other arguments override it.
        epochs: number of epochs.
        steps_per_epoch: batches per epoch.
        learning_rate: Adam learning rate.
        num_classes_per_batch: c, classes per batch.
        num_per_class: k, images per class in a batch.
        source_weights: how the source of a batch is chosen: "size" (in proportion to its
            training images, as in the paper), "uniform" or {source: weight}; the paper's x100
            for medical sources next to ImageNet is `{"imagenet": n_imagenet,
            "derm": 100 * n_derm, ...}`.
        strategy: a `tfmir.training.strategy.STRATEGIES` name.
        seed: seeds weights, sampling and augmentation.
        model_overrides: `Embedder` arguments replacing the preset's (for the student).
        eval_ks: the K values reported each epoch.
        verbose: Keras verbosity (1 shows a progress bar).
        callbacks: extra Keras callbacks, run after tfmir's own (their `self.model` is the
            `Distiller`; its `student` is the embedder).

    Returns:
        A `TrainingResult` whose `model` is the student embedder.

    Example:

    ```python
    result = train_universal(train, val, workdir="runs/universal", preset="cpu",
                             specialists={"retina": "runs/retina/best.keras",
                                          "xray": "runs/xray/best.keras"})
    result.model.save("universal.keras")
    ```

    Reference:
        Feng et al., "Universal Model for Multi-Domain Medical Image Retrieval",
        https://arxiv.org/abs/2007.08628, Sec. III (RKD from the source's specialist,
        source-specific sampling) and IV-D (out-of-domain source with Multi-Similarity).
    """
    unknown = sorted(set(map(str, specialists)) - set(train.source_names))
    if unknown:
        raise ValueError(f"specialists names sources {unknown} that are not among the training "
                         f"sources {train.source_names}")
    for name, specialist in specialists.items():
        if isinstance(specialist, keras.Model):
            continue
        if not isinstance(specialist, (str, os.PathLike)):
            raise ValueError(f"the specialist of {name!r} must be a keras.Model or the path of a "
                             f".keras file. Received {type(specialist).__name__}")
        if not os.path.isfile(specialist):
            raise ValueError(f"the specialist of {name!r} was not found: {os.fspath(specialist)}")
    schedule = _resolve_schedule(preset, model_overrides, epochs=epochs,
                                 steps_per_epoch=steps_per_epoch, learning_rate=learning_rate,
                                 num_classes_per_batch=num_classes_per_batch,
                                 num_per_class=num_per_class)
    _check_splits(train, val)
    workdir, initial_epoch = _prepare_workdir(workdir, {
        "method": "distillation", "preset": preset, "model": schedule.model_config,
        "resize_size": schedule.resize_size, "epochs": schedule.epochs,
        "steps_per_epoch": schedule.steps_per_epoch, "learning_rate": schedule.learning_rate,
        "num_classes_per_batch": schedule.num_classes_per_batch,
        "num_per_class": schedule.num_per_class, "source_weights": source_weights,
        "specialists": {str(name): (f"<in-memory model {specialist.name!r}>"
                                    if isinstance(specialist, keras.Model)
                                    else os.fspath(specialist))
                        for name, specialist in specialists.items()},
        "out_of_domain": [name for name in train.source_names if name not in specialists],
        "strategy": strategy, "seed": seed,
    })

    # First, before any TensorFlow op runs: multi-worker collectives are configured at startup.
    distribution = make_strategy(strategy)
    keras.utils.set_random_seed(seed)
    # A resumed run draws new batches rather than replaying the epochs it already saw.
    sampler = SourceAwareSampler(train.labels, train.sources,
                                 num_classes_per_batch=schedule.num_classes_per_batch,
                                 num_per_class=schedule.num_per_class,
                                 source_weights=source_weights, seed=seed + initial_epoch)
    dataset = _sharded(make_dataset(train, training=True, sampler=sampler, with_sources=True,
                                    image_size=schedule.model_config["image_size"],
                                    resize_size=schedule.resize_size, seed=seed))
    with distribution.scope():
        # The student first: its initial weights must not depend on how teachers are given.
        student = Embedder(**schedule.model_config)
        teachers = {str(name): (specialist if isinstance(specialist, keras.Model)
                                else keras.saving.load_model(specialist, compile=False))
                    for name, specialist in specialists.items()}
        distiller = Distiller(student, teachers, source_names=train.source_names)
        distiller.compile(optimizer=keras.optimizers.Adam(schedule.learning_rate))
    best_path, final_path = _fit(distiller, dataset, saved_model=student, workdir=workdir,
                                 val=val, schedule=schedule, initial_epoch=initial_epoch,
                                 eval_ks=eval_ks, verbose=verbose, callbacks=callbacks)
    return TrainingResult(model=student, history=read_log(workdir / LOG_FILE),
                          initial_epoch=initial_epoch, best_path=best_path, final_path=final_path,
                          resize_size=schedule.resize_size)
