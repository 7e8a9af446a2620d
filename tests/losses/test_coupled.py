"""Y-Net's coupled loss: arithmetic by hand, the learnable weight's gradient, saving."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmir.losses import LossWeight
from tfmir.losses import coupled_loss

# A Keras layer takes tensors, not Python numbers, as positional inputs.
TWO, FOUR = tf.constant(2.0), tf.constant(4.0)


def test_coupled_loss_by_hand():
    assert float(coupled_loss(2.0, 4.0, 0.5)) == 3.0  # 0.5 * 2 + 0.5 * 4
    assert float(coupled_loss(2.0, 4.0, 0.25)) == 3.5  # 0.25 * 2 + 0.75 * 4
    assert float(coupled_loss(2.0, 4.0, 1.0)) == 2.0
    np.testing.assert_allclose(
        coupled_loss(np.array([2.0, 1.0]), np.array([4.0, 3.0]), 0.5), [3.0, 2.0]
    )


@pytest.mark.parametrize(
    "mode, initial, expected_loss, expected_weight",
    [
        ("fixed", 0.5, 3.0, 0.5),
        ("fixed", 0.25, 3.5, 0.25),
        ("learnable", 0.5, 3.0, 0.5),
        ("learnable", 0.25, 3.5, 0.25),
        ("sum", 0.5, 6.0, 1.0),  # 2 + 4; `weight` reports 1.0
        ("sum", 0.25, 6.0, 1.0),  # `initial` is not used
    ],
)
def test_loss_weight_by_hand(mode, initial, expected_loss, expected_weight):
    loss_weight = LossWeight(mode=mode, initial=initial)
    np.testing.assert_allclose(float(loss_weight(TWO, FOUR)), expected_loss, rtol=1e-6)
    np.testing.assert_allclose(float(loss_weight.weight), expected_weight, rtol=1e-6)


def test_only_learnable_has_a_trainable_weight():
    assert LossWeight("fixed").trainable_weights == []
    assert LossWeight("sum").trainable_weights == []
    (theta,) = LossWeight("learnable", initial=0.25).trainable_weights
    np.testing.assert_allclose(float(theta), math.log(0.25 / 0.75), rtol=1e-6)


@pytest.mark.parametrize("initial", [0.5, 0.25, 0.9])
def test_learnable_gradient_is_loss_difference_times_sigmoid_slope(initial):
    """d/d theta [w L1 + (1 - w) L2] with w = sigmoid(theta) is (L1 - L2) w (1 - w):
    at w = 0.5, L1 = 2, L2 = 4 that is -2 * 0.25 = -0.5. The losses get w and 1 - w."""
    loss_weight = LossWeight("learnable", initial=initial)
    class_loss, segmentation_loss = tf.Variable(2.0), tf.Variable(4.0)
    with tf.GradientTape() as tape:
        loss = loss_weight(class_loss, segmentation_loss)
    theta_gradient, class_gradient, segmentation_gradient = tape.gradient(
        loss, [loss_weight.theta, class_loss, segmentation_loss]
    )
    np.testing.assert_allclose(float(theta_gradient), (2.0 - 4.0) * initial * (1 - initial),
                               rtol=1e-5)
    np.testing.assert_allclose(float(class_gradient), initial, rtol=1e-5)
    np.testing.assert_allclose(float(segmentation_gradient), 1 - initial, rtol=1e-5)


def test_learnable_weight_stays_in_the_open_interval_and_drifts_to_the_smaller_loss():
    loss_weight = LossWeight("learnable")
    optimizer = keras.optimizers.SGD(learning_rate=1.0)
    weights = []
    for _ in range(200):
        with tf.GradientTape() as tape:
            loss = loss_weight(TWO, FOUR)  # L_class < L_seg: omega grows
        optimizer.apply_gradients(
            zip(tape.gradient(loss, loss_weight.trainable_weights), loss_weight.trainable_weights)
        )
        weights.append(float(loss_weight.weight))
    assert all(0.0 < w < 1.0 for w in weights)
    assert np.all(np.diff(weights) > 0) and weights[-1] > 0.95


def test_losses_are_combined_in_float32_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        loss_weight = LossWeight("learnable")
    finally:
        keras.config.set_dtype_policy(previous)
    loss = loss_weight(tf.constant(2.0, "float16"), tf.constant(4.0, "float16"))
    assert loss.dtype == tf.float32
    assert loss_weight.theta.dtype == "float32"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="auto"), r"mode must be one of \('fixed', 'learnable', 'sum'\). "
                            r"Received: mode='auto'"),
        (dict(initial=0.0), r"initial must be in \(0, 1\). Received: initial=0.0"),
        (dict(initial=1.0), r"Received: initial=1.0"),
        (dict(mode="learnable", initial=1.5), r"Received: initial=1.5"),
        (dict(mode="sum", initial=-0.5), r"Received: initial=-0.5"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossWeight(**kwargs)


def test_coupled_loss_refuses_a_weight_outside_the_unit_interval():
    with pytest.raises(ValueError, match=r"weight must be in \[0, 1\]. Received: weight=1.5"):
        coupled_loss(2.0, 4.0, 1.5)


def test_config_round_trip():
    loss_weight = LossWeight("learnable", initial=0.3, name="omega")
    config = loss_weight.get_config()
    assert (config["mode"], config["initial"], config["name"]) == ("learnable", 0.3, "omega")
    restored = LossWeight.from_config(config)
    assert restored.get_config() == config
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(loss_weight)
    )
    assert isinstance(restored, LossWeight) and restored.get_config() == config


@pytest.mark.parametrize("mode", ["fixed", "learnable", "sum"])
def test_keras_save_and_load(tmp_path, mode):
    class_loss, segmentation_loss = keras.Input((1,)), keras.Input((1,))
    loss_weight = LossWeight(mode, initial=0.25)
    model = keras.Model([class_loss, segmentation_loss], loss_weight(class_loss, segmentation_loss))
    if mode == "learnable":
        loss_weight.theta.assign(1.5)  # a trained omega, not the initial one
    inputs = [np.array([[2.0], [1.0]], "float32"), np.array([[4.0], [3.0]], "float32")]

    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(restored.predict(inputs, verbose=0),
                               model.predict(inputs, verbose=0), rtol=1e-6)
    (restored_weight,) = [layer for layer in restored.layers if isinstance(layer, LossWeight)]
    np.testing.assert_allclose(float(restored_weight.weight), float(loss_weight.weight), rtol=1e-6)
