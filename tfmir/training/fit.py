"""The one training entry point: any task, any config, one device or many workers.

Every run takes the same path: a `tf.distribute` strategy (the default one, mirrored devices or
`MultiWorkerMirroredStrategy` from `TF_CONFIG`), the task built and compiled in its scope, input
pipelines made per replica by `distribute_datasets_from_function`, and a loop whose compiled step
is `strategy.run(task.train_step)`: Keras' own train step, so the gradient step, loss tracking,
loss scaling and replica scaling are Keras'. Keras' callbacks (progress bar, `BackupAndRestore`,
`CSVLogger`, `TensorBoard`, `ModelCheckpoint`) run around it as they do in `fit()`.

Why not `keras.Model.fit()`: under `MultiWorkerMirroredStrategy` it fails in Keras 3 (its symbolic
build reduces the whole first distributed batch, and it reduces scalar logs along axis 0;
https://github.com/keras-team/keras/issues/20585). Patching those private functions would break
on upgrade; this loop uses only public `tf.distribute` and Keras APIs, and single-machine runs go
through it too, so the multi-worker path cannot rot unnoticed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Mapping

import keras
import numpy as np
import tensorflow as tf

from tfmir.configs import Config
from tfmir.data import (
    ClassBalancedSampler,
    Examples,
    ReplicaShard,
    ShuffledSampler,
    SourceAwareSampler,
    make_dataset,
)
from tfmir.tasks import SAMPLERS, TASKS, build_task
from tfmir.tasks.task import MODES
from tfmir.training.evaluators import Evaluation, check_monitor, make_evaluator
from tfmir.training.strategy import STRATEGIES, make_strategy
from tfmir.files import exclusive_lock, write_atomic

BEST_MODEL = "best.keras"
FINAL_MODEL = "final.keras"
LOG_FILE = "log.csv"
BACKUP_DIR = "backup"
RUN_FILE = "run.json"


@dataclasses.dataclass
class TrainingResult:
    """What `fit` produced.

    Attributes:
        model: the deployable model after the last epoch (embedder, student, ...).
        task: the trained task.
        history: per-epoch logs of the whole run (across resumes), read back from the CSV log.
        initial_epoch: the epoch training started from (> 0 when it resumed from a backup).
        best_path: the best checkpoint by the config's monitor (None without a validation split).
        final_path: the deployable model after the last epoch.
        resize_size: the resize side used before cropping (evaluate with the same).
    """

    model: keras.Model
    task: keras.Model
    history: dict
    initial_epoch: int
    best_path: pathlib.Path | None
    final_path: pathlib.Path
    resize_size: int


def read_log(path: os.PathLike) -> dict:
    """Reads a Keras CSVLogger file into {column: [float, ...]} ("epoch" included)."""
    history: dict = {}
    if not os.path.exists(path):
        return history
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                history.setdefault(key, []).append(
                    float(value) if value not in ("", "NA", None) else np.nan)
    return history


def make_sampler(examples: Examples, config, *, allowed=SAMPLERS, seed: int = 0):
    """The training sampler of a `tfmir.configs.SamplerConfig`.

    "source_aware" on a split with one source is "class_balanced" (the batches are the same).

    Raises:
        ValueError: a sampler the task does not train on, or one that cannot fill a batch.
    """
    if config.name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}. Received: sampler={config.name!r}")
    if config.name not in allowed:
        raise ValueError(f"this task trains on {list(allowed)} batches. "
                         f"Received: sampler={config.name!r}")
    if config.name == "shuffled":
        return ShuffledSampler(len(examples), batch_size=config.batch_size, seed=seed)
    if config.name == "source_aware" and len(examples.source_names) > 1:
        return SourceAwareSampler(examples.labels, examples.sources,
                                  num_classes_per_batch=config.num_classes_per_batch,
                                  num_per_class=config.num_per_class,
                                  source_weights=config.source_weights, seed=seed,
                                  class_names=examples.class_names)
    return ClassBalancedSampler(examples.labels, num_classes_per_batch=config.num_classes_per_batch,
                                num_per_class=config.num_per_class, seed=seed,
                                class_names=examples.class_names)


def make_optimizer(config, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimizer of a `tfmir.configs.OptimizerConfig` (Keras' own, by name)."""
    learning_rate = config.learning_rate
    if config.decay_every_epochs:
        learning_rate = keras.optimizers.schedules.ExponentialDecay(
            config.learning_rate, decay_steps=config.decay_every_epochs * steps_per_epoch,
            decay_rate=config.decay_factor, staircase=True)
    try:
        return keras.optimizers.get({"class_name": config.name,
                                     "config": {"learning_rate": learning_rate, **config.args}})
    except (ValueError, TypeError) as error:
        raise ValueError(f"optimizer {config.name!r} with arguments {config.args} could not be "
                         f"built: {error}") from error


def data_digest(examples: Examples | None) -> str | None:
    """A digest of a split's ids, labels and sources: a resumed run must see the same data."""
    if examples is None:
        return None
    digest = hashlib.sha256()
    for values in (examples.ids, examples.labels, examples.sources):
        for value in values:
            digest.update(str(value).encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()


def _resolve_config(config: Config, val: Examples | None):
    """Checks `config`; returns it with the task's evaluators, monitor and mode filled in, and
    the evaluators."""
    if config.task.name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}. "
                         f"Received: task={config.task.name!r}")
    task_class = TASKS[config.task.name]
    config = dataclasses.replace(
        config,
        evaluators=list(task_class.evaluators) if config.evaluators is None else config.evaluators,
        monitor=task_class.monitor if config.monitor is None else config.monitor,
        mode=task_class.mode if config.mode is None else config.mode)
    if config.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}. "
                         f"Received: strategy={config.strategy!r}")
    if config.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}. Received: mode={config.mode!r}")
    for name in ("epochs", "steps_per_epoch"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")
    evaluators = [make_evaluator(spec) for spec in config.evaluators]
    if val is not None:
        check_monitor(config.monitor, evaluators, val)
    return config, evaluators


def _check_splits(train: Examples, val: Examples | None) -> None:
    if len(train) == 0:
        raise ValueError("the training split is empty; expected at least one labelled image.")
    if val is not None and len(val) == 0:
        raise ValueError("the validation split is empty; pass val=None to train without it.")


def _prepare_workdir(workdir: pathlib.Path, record: dict, *, resuming: bool,
                     chief: bool) -> None:
    """Checks a resumed run against `record`, then (on the chief) writes it."""
    run_file = workdir / RUN_FILE
    if resuming and run_file.exists():
        previous = json.loads(run_file.read_text())
        differences = sorted(_differences(previous, record))
        if differences:
            raise ValueError(
                f"{workdir} holds an interrupted run with another config or other data "
                f"(differs in {differences}); resume it with the same command, or pass another "
                "--workdir")
    if chief:
        workdir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_file, json.dumps(record, indent=2, default=str) + "\n")
        # config.json: what tfmir index / export read (resize_size, model), for every task.
        write_atomic(workdir / "config.json", json.dumps({
            **record["config"], "resize_size": record["config"]["data"]["resize_size"],
            "model": record["config"]["task"]["model"]}, indent=2, default=str) + "\n")


def _differences(previous, current, prefix=""):
    if isinstance(previous, dict) and isinstance(current, dict):
        for key in set(previous) | set(current):
            yield from _differences(previous.get(key), current.get(key), f"{prefix}{key}.")
    elif previous != current:
        yield prefix.rstrip(".")


def _backed_up_epoch(backup_dir: pathlib.Path) -> int:
    """The epoch a `BackupAndRestore` backup will resume from (0 when there is none)."""
    metadata = backup_dir / "training_metadata.json"
    if not metadata.exists():
        return 0
    return int(json.loads(metadata.read_text())["epoch"])


class _DeployableCheckpoint(keras.callbacks.ModelCheckpoint):
    """`ModelCheckpoint` that writes the task's deployable model, not the task."""

    def __init__(self, deployable: keras.Model, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._deployable = deployable

    def set_model(self, model):
        super().set_model(self._deployable)


def _replica_datasets(strategy, train: Examples, sampler, task, config: Config):
    """Per-replica pipelines: replica r gets slice r of every global sampler batch.

    Augmentation is seeded by the replica's index and its step, so a replica sees the same
    images whether it runs in this process or on another worker.
    """
    num_replicas = strategy.num_replicas_in_sync

    def dataset_fn(context: tf.distribute.InputContext):
        replica_sampler = sampler
        if num_replicas > 1:
            if context.num_input_pipelines != num_replicas:
                raise ValueError(
                    f"{num_replicas} replicas are fed by {context.num_input_pipelines} input "
                    "pipelines; tfmir feeds one pipeline per replica (one device per worker "
                    "under multi_worker)")
            replica_sampler = ReplicaShard(sampler, num_replicas=num_replicas,
                                           replica_index=context.input_pipeline_id)
        seed = config.seed + 1_000_003 * context.input_pipeline_id
        return make_dataset(train, training=True, sampler=replica_sampler, fields=task.fields,
                            image_size=task.image_size, resize_size=config.data.resize_size,
                            seed=seed, augmentations=config.data.augmentations)

    mode = (tf.distribute.InputReplicationMode.PER_REPLICA
            if isinstance(strategy, tf.distribute.MirroredStrategy)
            else tf.distribute.InputReplicationMode.PER_WORKER)
    options = tf.distribute.InputOptions(experimental_replication_mode=mode)
    return strategy.distribute_datasets_from_function(dataset_fn, options)


def _train_function(strategy, task):
    @tf.function
    def train_function(iterator):
        strategy.run(task.train_step, args=(next(iterator),))
        # Read in cross-replica context: Keras metrics sum their state over all replicas
        # (all workers), so every worker logs the same global means.
        return {metric.name: metric.result() for metric in task.metrics}

    return train_function


def fit(config: Config, splits: Mapping[str, Examples | None], workdir: os.PathLike, *,
        callbacks=(), verbose: int = 1) -> TrainingResult:
    """Trains the task of `config` on `splits["train"]`, evaluated on `splits["val"]` per epoch.

    Every epoch ends with the config's evaluators on the validation split (their metrics logged
    as `val_<name>`), the best deployable model by `config.monitor` in `workdir/best.keras`, a
    backup of the task and its optimizer in `workdir/backup` (the same command after an
    interruption resumes from it; other data or another config is refused), and a row in
    `workdir/log.csv` and TensorBoard (`workdir/tensorboard`). Under `multi_worker` only the
    chief writes checkpoints, logs and summaries; every worker keeps its own backup.

    Args:
        config: a `tfmir.configs.Config` (e.g. `get_config("specialist:cpu")`).
        splits: {"train": Examples, "val": Examples or None} (other keys are ignored).
        workdir: output folder.
        callbacks: extra Keras callbacks, run after tfmir's own (`self.model` is the task).
        verbose: 0 silent, 1 progress bar, 2 one line per epoch.

    Returns:
        A `TrainingResult`.

    Raises:
        ValueError: before anything is written, for an unknown task, sampler, optimizer,
            evaluator or monitor, a split the task cannot train on, or a resume with other data;
            `tfmir.files.LockedError` (a ValueError) while another run writes the workdir.

    Example:

    ```python
    from tfmir.configs import get_config, override
    config = override(get_config("specialist:tiny"), {"epochs": 3})
    result = fit(config, {"train": train, "val": val}, "runs/retina")
    ```
    """
    train, val = splits["train"], splits.get("val")
    _check_splits(train, val)
    config, evaluators = _resolve_config(config, val)
    workdir = pathlib.Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"workdir {workdir} is a file; expected a folder (or a path to create)")

    # First, before any TensorFlow op runs: multi-worker collectives are configured at startup.
    strategy = make_strategy(config.strategy)
    chief = strategy.extended.should_checkpoint
    keras.utils.set_random_seed(config.seed)
    previous_policy = keras.mixed_precision.global_policy()
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        with strategy.scope():
            task = build_task(config.task, {"train": train, "val": val})
            task.check_fields(train, "training")
            if val is not None:
                task.check_fields(val, "validation")
            task.compile(optimizer=make_optimizer(config.optimizer, config.steps_per_epoch))
            # Before the step is traced: variables cannot be created inside a replica step.
            task.optimizer.build(task.trainable_variables)
        deployable = task.deployable_model
        worker = strategy.cluster_resolver.task_id if not chief and getattr(
            strategy, "cluster_resolver", None) else None
        backup_dir = workdir / (BACKUP_DIR if worker is None else f"{BACKUP_DIR}_worker{worker}")
        initial_epoch = _backed_up_epoch(backup_dir)
        # A resumed run draws new batches rather than replaying the epochs it already saw. The
        # sampler refuses a split that cannot fill a batch, before anything is written.
        sampler = make_sampler(train, config.sampler, allowed=task.samplers,
                               seed=config.seed + initial_epoch)
        record = {"config": config.to_dict(), "num_replicas": strategy.num_replicas_in_sync,
                  "data": {"train": data_digest(train), "val": data_digest(val)}}
        # One writer per workdir: a second run on it is refused before it writes anything.
        with (exclusive_lock(workdir / "run", "training run") if chief
              else contextlib.nullcontext()):
            _prepare_workdir(workdir, record, resuming=initial_epoch > 0, chief=chief)
            if initial_epoch > 0 and chief:
                print(f"Resuming the run in {workdir} from its backup: epoch {initial_epoch + 1} "
                      f"of {config.epochs}.", flush=True)
            dataset = _replica_datasets(strategy, train, sampler, task, config)
            best_path = _run(task, deployable, dataset, strategy, config, evaluators, train, val,
                             workdir, backup_dir, initial_epoch, chief=chief,
                             callbacks=callbacks, verbose=verbose)
            final_path = workdir / FINAL_MODEL
            if chief:
                deployable.save(str(final_path))
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    return TrainingResult(model=deployable, task=task, history=read_log(workdir / LOG_FILE),
                          initial_epoch=initial_epoch, best_path=best_path,
                          final_path=final_path, resize_size=config.data.resize_size)


def _run(task, deployable, dataset, strategy, config, evaluators, train, val, workdir,
         backup_dir, initial_epoch, *, chief, callbacks, verbose):
    """The epoch loop with Keras' callbacks; returns the best checkpoint's path (or None)."""
    resuming = initial_epoch > 0
    tfmir_callbacks = []
    best_path = None
    if val is not None and chief:
        tfmir_callbacks.append(Evaluation(evaluators, val, model=deployable,
                                          resize_size=config.data.resize_size, train=train))
        best_path = workdir / BEST_MODEL
        previous = read_log(workdir / LOG_FILE).get(config.monitor, []) if resuming else []
        finite = [value for value in previous if np.isfinite(value)]
        best_so_far = (max if config.mode == "max" else min)(finite) if finite else None
        tfmir_callbacks.append(_DeployableCheckpoint(
            deployable, str(best_path), monitor=config.monitor, mode=config.mode,
            save_best_only=True, initial_value_threshold=best_so_far))
    tfmir_callbacks.append(keras.callbacks.BackupAndRestore(str(backup_dir),
                                                            double_checkpoint=True))
    if chief:
        tfmir_callbacks += [
            keras.callbacks.CSVLogger(str(workdir / LOG_FILE), append=resuming),
            keras.callbacks.TensorBoard(str(workdir / "tensorboard"), write_graph=False),
        ]
    callback_list = keras.callbacks.CallbackList(
        [*tfmir_callbacks, *callbacks], add_progbar=bool(verbose) and chief, model=task,
        verbose=verbose, epochs=config.epochs, steps=config.steps_per_epoch)

    train_function = _train_function(strategy, task)
    iterator = iter(dataset)
    task.stop_training = False
    callback_list.on_train_begin()
    logs = {}
    for epoch in range(initial_epoch, config.epochs):
        task.reset_metrics()
        callback_list.on_epoch_begin(epoch)
        for step in range(config.steps_per_epoch):
            callback_list.on_train_batch_begin(step)
            logs = train_function(iterator)
            callback_list.on_train_batch_end(step, logs)
            if task.stop_training:
                break
        logs = {name: float(value) for name, value in logs.items()}
        callback_list.on_epoch_end(epoch, logs)
        if task.stop_training:
            break
    callback_list.on_train_end(logs)
    return best_path
