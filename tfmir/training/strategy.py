"""Picks the `tf.distribute` strategy that training runs under."""

from __future__ import annotations

import json
import os

import tensorflow as tf

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker")


def check_tf_config(text: str | None) -> dict:
    """Parses and checks a `TF_CONFIG` value for `MultiWorkerMirroredStrategy`.

    Args:
        text: the environment variable's value.

    Returns:
        The parsed config.

    Raises:
        ValueError: it is missing, not JSON, has no cluster of workers, or names this process
            (its "task") outside the cluster.
    """
    example = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
               '"task": {"type": "worker", "index": 0}}')
    if not text:
        raise ValueError(f"strategy 'multi_worker' needs TF_CONFIG, e.g. TF_CONFIG='{example}'")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}). Received: {text!r}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    task = config.get("task") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not any(
            isinstance(cluster.get(kind), list) and cluster.get(kind) for kind in ("worker", "chief")):
        raise ValueError(f"TF_CONFIG must hold a cluster with a list of workers, like {example}. "
                         f"Received: {text!r}")
    if not isinstance(task, dict) or task.get("type") not in cluster:
        raise ValueError(f"TF_CONFIG's task must name a job of its cluster {sorted(cluster)}. "
                         f"Received: task={task!r}")
    index = task.get("index", 0)
    members = cluster[task["type"]]
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(members):
        raise ValueError(f"TF_CONFIG's task index must lie in [0, {len(members)}) for the "
                         f"{len(members)} {task['type']}(s) of its cluster. Received: task={task!r}")
    return config


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Returns a `tf.distribute.Strategy` by name.

    Args:
        name: "auto" (MirroredStrategy when GPUs are visible, else the default strategy),
            "default", "one_device" (the first GPU, else the CPU), "mirrored" (all visible GPUs,
            or else every logical CPU device), or "multi_worker" (MultiWorkerMirroredStrategy
            configured by `TF_CONFIG`, checked first).

    Returns:
        The strategy; build and compile the model under `strategy.scope()`.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}. Received: strategy={name!r}")
    if name == "multi_worker":
        check_tf_config(os.environ.get("TF_CONFIG"))
        # Before anything touches the runtime (listing devices does): collectives are
        # configured when the eager context starts.
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        name = "mirrored" if gpus else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")
    devices = gpus or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([device.name for device in devices])
