"""One experiment-config shape for every task: task, data, sampler, optimizer, schedule, evaluators.

A config is data (big_vision's `get_config()` shape): nested dataclasses whose leaves are plain
values, written to `config.json` in a run's work folder and overridable key by key
(`--config.optimizer.learning_rate=1e-4` on the command line, `override(config, {...})` in code).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import os
from typing import Any, Mapping


@dataclasses.dataclass
class TaskConfig:
    """Which task trains, and its constructor arguments.

    Attributes:
        name: a `tfmir.tasks.TASKS` name ("metric_learning", "distillation").
        model: arguments of the deployable model (for an `Embedder`: backbone, embedding_dim,
            image_size, weights, backbone_widths).
        args: the task's other arguments (its loss settings, the distiller's specialists).
    """

    name: str = "metric_learning"
    model: dict = dataclasses.field(default_factory=dict)
    args: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DataConfig:
    """The input pipeline.

    Attributes:
        resize_size: images are resized to this side, then cropped to the model's side.
        augmentations: training augmentations after the crop and flip, names among
            `tfmir.data.AUGMENTATIONS` (paper 003: all seven); empty: none.
    """

    resize_size: int = 256
    augmentations: tuple = ()

    def __post_init__(self):
        # One spelling, so a config equals itself read back from JSON (which has no tuples).
        if isinstance(self.augmentations, list):
            self.augmentations = tuple(self.augmentations)


@dataclasses.dataclass
class SamplerConfig:
    """How training batches are drawn.

    Attributes:
        name: "class_balanced" (c classes x k images), "source_aware" (one source per batch, c x k
            inside; a single-source split falls back to class_balanced) or "shuffled" (plain
            random batches of `batch_size`). A task lists the names it accepts.
        num_classes_per_batch: c.
        num_per_class: k.
        batch_size: the batch size of "shuffled" (class-balanced batches are c x k).
        source_weights: with "source_aware": "size", "uniform" or {source: weight}.
    """

    name: str = "class_balanced"
    num_classes_per_batch: int = 8
    num_per_class: int = 5
    batch_size: int = 64
    source_weights: Any = "size"


@dataclasses.dataclass
class OptimizerConfig:
    """The optimizer (`keras.optimizers.get(name)`) and its learning-rate schedule.

    Attributes:
        name: a Keras optimizer name ("adam", "sgd", "adamw", ...).
        learning_rate: the initial learning rate.
        decay_every_epochs: multiply the learning rate by `decay_factor` every this many epochs
            (paper 001: halved every 20); None keeps it constant.
        decay_factor: the step-decay factor.
        args: other optimizer arguments (e.g. {"momentum": 0.9} for SGD).
    """

    name: str = "adam"
    learning_rate: float = 1e-3
    decay_every_epochs: int | None = None
    decay_factor: float = 0.5
    args: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Config:
    """A training run: what trains on what, how, how it is judged, and where it runs.

    Attributes:
        task: the task and its arguments.
        data: pipeline sizes.
        sampler: batch sampling.
        optimizer: optimizer and schedule.
        epochs: number of epochs.
        steps_per_epoch: batches per epoch (sampler batches are endless).
        evaluators: `tfmir.training.evaluators` specs run on the validation split each epoch
            (names or {"name": ..., **arguments}); None: the task's.
        monitor: the logged metric that picks `best.keras` (e.g. "val_recall@1"); None: the
            task's.
        mode: "max" or "min" for `monitor`; None: the task's.
        seed: seeds weights, sampling and augmentation.
        strategy: a `tfmir.training.STRATEGIES` name.
        mixed_precision: train under the "mixed_bfloat16" policy.
    """

    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    epochs: int = 10
    steps_per_epoch: int = 100
    evaluators: list | None = None
    monitor: str | None = None
    mode: str | None = None
    seed: int = 0
    strategy: str = "auto"
    mixed_precision: bool = False

    def to_dict(self) -> dict:
        """A JSON-friendly deep copy (in-memory models in task arguments become their names)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: Mapping) -> "Config":
        """The inverse of `to_dict`; unknown keys are an error."""
        return override(cls(), _flatten(values))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    name = getattr(value, "name", None)
    return f"<{type(value).__name__} {name!r}>" if name else repr(value)


def _flatten(values: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and not _is_free_dict(path):
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


# Dict-valued fields whose keys are free (arguments, per-source weights): overridden as a whole
# or key by key, never checked against a fixed set of names.
_FREE_DICTS = ("task.model", "task.args", "optimizer.args", "sampler.source_weights")


def _is_free_dict(path: str) -> bool:
    return path in _FREE_DICTS


def parse_value(text: str):
    """A command-line value: a Python literal (1e-4, True, None, [1, 2], {"a": 1}) or a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered == "none":
            return None
        return text


def override(config: Config, values: Mapping[str, Any]) -> Config:
    """A copy of `config` with dotted keys replaced: {"optimizer.learning_rate": 1e-4, ...}.

    Keys name fields of the config ("epochs", "sampler.num_per_class") or keys inside its free
    argument dicts ("task.model.image_size", "task.args.delta"). A value is converted to the
    field's type where that is lossless (an int for a float field, a string from the command
    line for a number); anything else is refused.

    Raises:
        ValueError: an unknown key (the message lists the valid ones) or a value of another type.
    """
    config = copy.deepcopy(config)
    for key, value in values.items():
        _set(config, str(key), value)
    return config


def _set(config: Config, key: str, value) -> None:
    parts = key.split(".")
    target: Any = config
    for depth, part in enumerate(parts):
        path = ".".join(parts[:depth + 1])
        last = depth == len(parts) - 1
        if isinstance(target, dict):
            if last:
                target[part] = value
                return
            target = target.setdefault(part, {})
            continue
        if not dataclasses.is_dataclass(target):
            raise ValueError(f"config key {key!r}: {'.'.join(parts[:depth])!r} holds a value, "
                             "not a group of keys")
        names = [field.name for field in dataclasses.fields(target)]
        if part not in names:
            prefix = ".".join(parts[:depth])
            valid = [f"{prefix}.{name}" if prefix else name for name in names]
            raise ValueError(f"unknown config key {key!r}; valid keys here are {valid}")
        if last:
            setattr(target, part, _convert(path, getattr(target, part), value))
            return
        target = getattr(target, part)


def _convert(path: str, current, value):
    if dataclasses.is_dataclass(current):
        if not isinstance(value, Mapping):
            raise ValueError(f"config key {path!r} is a group of keys; set its keys one by one "
                             f"({path}.<key>=...). Received: {value!r}")
        for key, item in value.items():
            _set_in(current, path, key, item)
        return current
    if current is None or value is None or _is_free_dict(path):
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, str):
        if isinstance(value, str):
            return value
    elif isinstance(current, (list, tuple, dict)):
        if isinstance(value, type(current)):
            return value
        # JSON (config.json, to_dict) has no tuples: a list read back fills a tuple field.
        if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
            return type(current)(value)
    if isinstance(value, str):
        parsed = parse_value(value)
        if not isinstance(parsed, str):
            return _convert(path, current, parsed)
    raise ValueError(f"config key {path!r} takes a {type(current).__name__} "
                     f"(default {current!r}). Received: {value!r}")


def _set_in(group, path: str, key: str, value) -> None:
    names = [field.name for field in dataclasses.fields(group)]
    if key not in names:
        raise ValueError(f"unknown config key {path + '.' + key!r}; valid keys here are "
                         f"{[f'{path}.{name}' for name in names]}")
    setattr(group, key, _convert(f"{path}.{key}", getattr(group, key), value))
