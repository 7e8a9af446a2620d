"""Trains an embedder with Multi-Similarity on class-balanced batches, resumable and evaluated per epoch.

The helpers here (schedule from a preset, work folder, callbacks, fit and save) are shared with
`tfmir.training.distillation.train_universal`, so both trainers write the same files and log keys.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib

import keras
import numpy as np
import tensorflow as tf

from tfmir.data import ClassBalancedSampler, Examples, SourceAwareSampler, make_dataset
from tfmir.losses import MultiSimilarity
from tfmir.models import Embedder, get_preset
from tfmir.training.callbacks import RetrievalEvaluation
from tfmir.training.strategy import make_strategy

BEST_MODEL = "best.keras"
FINAL_MODEL = "final.keras"
LOG_FILE = "log.csv"
BACKUP_DIR = "backup"
MONITOR = "val_recall@1"


@dataclasses.dataclass
class TrainingResult:
    """What `train_embedder` or `train_universal` produced.

    Attributes:
        model: the embedder after the last epoch (for `train_universal`, the student).
        history: per-epoch logs of the whole run (across resumes), read back from the CSV log.
        initial_epoch: the epoch training started from (> 0 when it resumed from a backup).
        best_path: the best checkpoint by validation Recall@1 (None without a validation split).
        final_path: the model after the last epoch.
        resize_size: the resize side used before cropping (evaluate with the same).
    """

    model: keras.Model
    history: dict
    initial_epoch: int
    best_path: pathlib.Path | None
    final_path: pathlib.Path
    resize_size: int


SAMPLINGS = ("source", "class")


def make_sampler(examples: Examples, *, num_classes_per_batch: int, num_per_class: int,
                 source_weights="size", sampling: str = "source", seed: int = 0):
    """The batch sampler for `examples`.

    Args:
        examples: the training split.
        num_classes_per_batch: c.
        num_per_class: k.
        source_weights: with `sampling="source"`: "size", "uniform" or {source: weight}.
        sampling: "source": with several sources every batch comes from one source (paper 000's
            source-specific sampling); "class": c classes drawn from all sources' classes, so a
            batch may mix sources. A single source gets class-balanced batches either way.
        seed: sampling seed.

    Returns:
        A `ClassBalancedSampler` or `SourceAwareSampler`.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}. Received: sampling={sampling!r}")
    if sampling == "source" and len(examples.source_names) > 1:
        return SourceAwareSampler(examples.labels, examples.sources,
                                  num_classes_per_batch=num_classes_per_batch,
                                  num_per_class=num_per_class, source_weights=source_weights,
                                  seed=seed)
    return ClassBalancedSampler(examples.labels, num_classes_per_batch=num_classes_per_batch,
                                num_per_class=num_per_class, seed=seed)


def read_log(path: os.PathLike) -> dict:
    """Reads a Keras CSVLogger file into {column: [float, ...]} ("epoch" included)."""
    history: dict = {}
    if not os.path.exists(path):
        return history
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                history.setdefault(key, []).append(float(value) if value not in ("", "NA", None) else np.nan)
    return history


def _backed_up_epoch(backup_dir: pathlib.Path) -> int:
    """The epoch a `BackupAndRestore` backup will resume from (0 when there is none)."""
    metadata = backup_dir / "training_metadata.json"
    if not metadata.exists():
        return 0
    return int(json.loads(metadata.read_text())["epoch"])


def _sharded(dataset: tf.data.Dataset) -> tf.data.Dataset:
    # Sampler batches come from a generator: shard whole batches across workers, not files.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


@dataclasses.dataclass(frozen=True)
class _Schedule:
    """A preset with the caller's overrides applied."""

    model_config: dict
    resize_size: int
    epochs: int
    steps_per_epoch: int
    learning_rate: float
    num_classes_per_batch: int
    num_per_class: int


def _resolve_schedule(preset: str, model_overrides: dict | None, *, epochs, steps_per_epoch,
                      learning_rate, num_classes_per_batch, num_per_class) -> _Schedule:
    settings = get_preset(preset)
    model_config = {**settings["model"], **(model_overrides or {})}
    schedule = settings["training"]
    resize_size = settings["data"]["resize_size"]
    if model_config["image_size"] != settings["model"]["image_size"]:
        resize_size = int(round(model_config["image_size"] * resize_size
                                / settings["model"]["image_size"]))
    return _Schedule(
        model_config=model_config, resize_size=resize_size,
        epochs=epochs or schedule["epochs"],
        steps_per_epoch=steps_per_epoch or schedule["steps_per_epoch"],
        learning_rate=learning_rate or schedule["learning_rate"],
        num_classes_per_batch=num_classes_per_batch or schedule["num_classes_per_batch"],
        num_per_class=num_per_class or schedule["num_per_class"])


def _check_splits(train: Examples, val: Examples | None) -> None:
    if len(train) == 0:
        raise ValueError("the training split is empty; expected at least one labelled image.")
    if val is not None and len(val) == 0:
        raise ValueError("the validation split is empty; pass val=None to train without it.")


def _prepare_workdir(workdir: os.PathLike, config: dict) -> tuple[pathlib.Path, int]:
    """Creates `workdir`, writes its config.json; returns it and the epoch a backup resumes from."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return workdir, _backed_up_epoch(workdir / BACKUP_DIR)


class _SavedModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """`ModelCheckpoint` that writes `saved_model` (e.g. the student a distiller trains)."""

    def __init__(self, saved_model: keras.Model, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._saved_model = saved_model

    def set_model(self, model):
        super().set_model(self._saved_model)


def _fit(model: keras.Model, dataset: tf.data.Dataset, *, saved_model: keras.Model,
         workdir: pathlib.Path, val: Examples | None, schedule: _Schedule, initial_epoch: int,
         eval_ks, verbose: int, callbacks) -> tuple[pathlib.Path | None, pathlib.Path]:
    """Fits `model` with tfmir's callbacks; `saved_model` goes to best.keras and final.keras.

    Every epoch: Recall@K on `val`, the best `saved_model` by validation Recall@1, a backup of
    `model` and its optimizer (resumed from when `initial_epoch` > 0), a CSV and TensorBoard row.

    Returns:
        (best_path or None without `val`, final_path).
    """
    resuming = initial_epoch > 0
    previous = read_log(workdir / LOG_FILE) if resuming else {}
    all_callbacks = []
    best_path = None
    if val is not None:
        all_callbacks.append(RetrievalEvaluation(val, resize_size=schedule.resize_size, ks=eval_ks))
        best_path = workdir / BEST_MODEL
        best_so_far = max(previous.get(MONITOR, [-np.inf]))
        all_callbacks.append(_SavedModelCheckpoint(
            saved_model, str(best_path), monitor=MONITOR, mode="max", save_best_only=True,
            initial_value_threshold=None if not np.isfinite(best_so_far) else best_so_far))
    all_callbacks += [
        keras.callbacks.BackupAndRestore(str(workdir / BACKUP_DIR), double_checkpoint=True),
        keras.callbacks.CSVLogger(str(workdir / LOG_FILE), append=resuming),
        keras.callbacks.TensorBoard(str(workdir / "tensorboard"), write_graph=False),
        *callbacks,
    ]
    model.fit(dataset, epochs=schedule.epochs, steps_per_epoch=schedule.steps_per_epoch,
              callbacks=all_callbacks, verbose=verbose, shuffle=False)
    final_path = workdir / FINAL_MODEL
    saved_model.save(str(final_path))
    return best_path, final_path


def train_embedder(train: Examples, val: Examples | None, *, workdir: os.PathLike,
                   preset: str = "cpu", epochs: int | None = None,
                   steps_per_epoch: int | None = None, learning_rate: float | None = None,
                   num_classes_per_batch: int | None = None, num_per_class: int | None = None,
                   source_weights="size", sampling: str = "source", strategy: str = "auto",
                   mixed_precision: bool = False,
                   seed: int = 0, model_overrides: dict | None = None, eval_ks=(1, 2, 4, 8),
                   verbose: int = 1, callbacks=()) -> TrainingResult:
    """Trains an `Embedder` with the Multi-Similarity loss (paper 000's specialist).

    Every epoch ends with Recall@K on `val` (per source when there are several), a backup of the
    model and optimizer state in `workdir/backup` (an interrupted run started again with the same
    `workdir` resumes from it), the best model by validation Recall@1 in `workdir/best.keras`, and
    a row in `workdir/log.csv` and TensorBoard (`workdir/tensorboard`).

    Args:
        train: training split (one or several sources).
        val: validation split, or None to skip evaluation and best-model tracking.
        workdir: output folder.
        preset: "tiny", "cpu" or "paper" (`tfmir.models.PRESETS`); the other arguments override it.
        epochs: number of epochs.
        steps_per_epoch: batches per epoch (sampler batches are endless).
        learning_rate: Adam learning rate.
        num_classes_per_batch: c, classes per batch.
        num_per_class: k, images per class in a batch.
        source_weights: how a source is chosen per batch with several sources: "size",
            "uniform" or {source: weight}.
        sampling: "source" (one source per batch) or "class" (batches may mix sources); see
            `make_sampler`.
        strategy: a `tfmir.training.strategy.STRATEGIES` name.
        mixed_precision: train under the "mixed_bfloat16" policy.
        seed: seeds weights, sampling and augmentation.
        model_overrides: `Embedder` arguments replacing the preset's.
        eval_ks: the K values reported each epoch.
        verbose: Keras verbosity (1 shows a progress bar).
        callbacks: extra Keras callbacks, run after tfmir's own.

    Returns:
        A `TrainingResult`.
    """
    schedule = _resolve_schedule(preset, model_overrides, epochs=epochs,
                                 steps_per_epoch=steps_per_epoch, learning_rate=learning_rate,
                                 num_classes_per_batch=num_classes_per_batch,
                                 num_per_class=num_per_class)
    _check_splits(train, val)
    workdir, initial_epoch = _prepare_workdir(workdir, {
        "preset": preset, "model": schedule.model_config, "resize_size": schedule.resize_size,
        "epochs": schedule.epochs, "steps_per_epoch": schedule.steps_per_epoch,
        "learning_rate": schedule.learning_rate,
        "num_classes_per_batch": schedule.num_classes_per_batch,
        "num_per_class": schedule.num_per_class, "source_weights": source_weights,
        "sampling": sampling, "strategy": strategy, "mixed_precision": mixed_precision,
        "seed": seed,
    })

    # First, before any TensorFlow op runs: multi-worker collectives are configured at startup.
    distribution = make_strategy(strategy)
    keras.utils.set_random_seed(seed)
    previous_policy = keras.mixed_precision.global_policy()
    if mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        # A resumed run draws new batches rather than replaying the epochs it already saw.
        sampler = make_sampler(train, num_classes_per_batch=schedule.num_classes_per_batch,
                               num_per_class=schedule.num_per_class, source_weights=source_weights,
                               sampling=sampling, seed=seed + initial_epoch)
        dataset = _sharded(make_dataset(train, training=True, sampler=sampler,
                                        image_size=schedule.model_config["image_size"],
                                        resize_size=schedule.resize_size, seed=seed))
        with distribution.scope():
            model = Embedder(**schedule.model_config)
            model.compile(optimizer=keras.optimizers.Adam(schedule.learning_rate),
                          loss=MultiSimilarity())
        best_path, final_path = _fit(model, dataset, saved_model=model, workdir=workdir, val=val,
                                     schedule=schedule, initial_epoch=initial_epoch,
                                     eval_ks=eval_ks, verbose=verbose, callbacks=callbacks)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return TrainingResult(model=model, history=read_log(workdir / LOG_FILE),
                          initial_epoch=initial_epoch, best_path=best_path, final_path=final_path,
                          resize_size=schedule.resize_size)
