"""One contract for every training task (keras-hub's `run_task_test` way).

Each task's test supplies a factory for the task and for its `tiny` config; the harness checks
what `tfmir.training.fit` relies on: the task builds and declares its fields and samplers, one
train step lowers the loss on a fixed batch, its config round-trips, its deployable model
survives `.keras` save and load, and the same config trained twice gives identical weights.
"""

from __future__ import annotations

import keras
import numpy as np

from tfmir.data import make_dataset
from tfmir.tasks import FIELDS, SAMPLERS
from tfmir.training import fit, make_sampler


def fixed_batch(task, examples, config):
    """One training batch of `examples` with the task's fields, as the core would feed it."""
    sampler = make_sampler(examples, config.sampler, allowed=task.samplers, seed=0)
    dataset = make_dataset(examples, training=True, sampler=sampler, fields=task.fields,
                           image_size=task.image_size, resize_size=config.data.resize_size)
    return next(iter(dataset))


def assert_same_outputs(actual, expected, atol=1e-6):
    """Equal model outputs: one tensor, or a dict of them (a Y-Net's {"code", "mask"})."""
    if isinstance(expected, dict):
        assert set(actual) == set(expected)
        for key in expected:
            np.testing.assert_allclose(actual[key], expected[key], atol=atol, err_msg=key)
    else:
        np.testing.assert_allclose(actual, expected, atol=atol)


def training_loss(task, x, y):
    return float(task.compute_loss(x, y, task(x, training=True), training=True))


def run_task_test(make_task, config, examples, tmp_path):
    """Builds the task with `make_task()` and checks the contract on `examples`."""
    keras.utils.set_random_seed(0)
    task = make_task()
    assert task.fields[0] == "image" and set(task.fields) <= set(FIELDS)
    assert task.samplers and set(task.samplers) <= set(SAMPLERS)
    task.check_fields(examples)
    deployable = task.deployable_model
    assert isinstance(deployable, keras.Model)

    # One step of Keras' own train_step lowers the loss of the batch it took.
    x, y = fixed_batch(task, examples, config)
    task.compile(optimizer=keras.optimizers.Adam(1e-3))
    before = training_loss(task, x, y)
    logs = task.train_on_batch(x, y, return_dict=True)
    after = training_loss(task, x, y)
    assert np.isfinite(logs["loss"]) and after < before, (before, after)

    # Config round trip: the rebuilt task has the same structure and computes the same outputs.
    rebuilt = type(task).from_config(task.get_config())
    rebuilt.set_weights(task.get_weights())
    images = x["image"][:4]
    assert_same_outputs(rebuilt.deployable_model(images, training=False),
                        deployable(images, training=False))

    # The deployable model is what best.keras, export and index hold.
    path = tmp_path / "deployable.keras"
    deployable.save(path)
    restored = keras.saving.load_model(path)
    assert_same_outputs(restored(images, training=False), deployable(images, training=False))
    return task


def run_determinism_test(config, splits, tmp_path):
    """The same config and seed trained twice through `fit`: identical weights and logs."""
    results = [fit(config, splits, tmp_path / f"run{attempt}", verbose=0) for attempt in range(2)]
    first, second = results
    np.testing.assert_equal(first.history, second.history)  # NaN (no batch of a kind) too
    for weights, again in zip(first.model.get_weights(), second.model.get_weights()):
        np.testing.assert_array_equal(weights, again)
    return first
