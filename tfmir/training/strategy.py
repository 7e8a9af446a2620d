"""Picks the `tf.distribute` strategy that training runs under."""

from __future__ import annotations

import tensorflow as tf

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker")


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Returns a `tf.distribute.Strategy` by name.

    Args:
        name: "auto" (MirroredStrategy when GPUs are visible, else the default strategy),
            "default", "one_device" (the first GPU, else the CPU), "mirrored" (all visible GPUs, or
            the CPU), or "multi_worker" (MultiWorkerMirroredStrategy configured by `TF_CONFIG`).

    Returns:
        The strategy; build and compile the model under `strategy.scope()`. Keras distributes the
        `tf.data` input through it, so the trainer does not change between strategies.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}. Received: strategy={name!r}")
    if name == "multi_worker":
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
    return tf.distribute.MirroredStrategy()
