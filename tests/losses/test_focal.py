"""Binary focal loss against a loop over Lin et al.'s formula and its gradient (appendix B),
against Keras' `binary_focal_crossentropy` where they agree, and where they do not."""

import itertools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmir.losses import BinaryFocalLoss
from tfmir.losses import binary_focal_loss


def sigmoid(x):
    """1 / (1 + e^-x) in float64 without overflow for |x| up to 700."""
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def oracle_focal(labels, predictions, alpha=0.25, gamma=2.0, from_logits=False):
    """Lin et al.'s FL = -alpha_t (1 - p_t)^gamma log(p_t), one sample at a time, float64.

    From a logit x, p_t = sigmoid(s x) with s = +1 for y = 1, -1 for y = 0, so 1 - p_t =
    sigmoid(-s x) and log p_t = -log(1 + e^(-s x)); both are written so they do not round
    to 0 in float64 for the logits used here.
    """
    losses = []
    for label, prediction in zip(np.ravel(labels), np.ravel(predictions)):
        label, prediction = int(label), float(prediction)
        alpha_t = alpha if label == 1 else 1.0 - alpha
        if from_logits:
            signed = prediction if label == 1 else -prediction
            one_minus_p_t = sigmoid(-signed)
            log_p_t = -(math.log1p(math.exp(-signed)) if signed > -30 else -signed)
        else:
            p_t = prediction if label == 1 else 1.0 - prediction
            one_minus_p_t, log_p_t = 1.0 - p_t, math.log(p_t)
        losses.append(-alpha_t * one_minus_p_t**gamma * log_p_t)
    return np.array(losses)


def oracle_focal_slope(labels, logits, alpha=0.25, gamma=2.0):
    """d FL / d x from Lin et al.'s appendix B, with alpha_t and float64:

    d FL / d x = s alpha_t (1 - p_t)^gamma (gamma p_t log p_t + p_t - 1), s = 2 y - 1,
    p_t = sigmoid(s x).
    """
    slopes = []
    for label, logit in zip(np.ravel(labels), np.ravel(logits)):
        sign = 1.0 if int(label) == 1 else -1.0
        alpha_t = alpha if int(label) == 1 else 1.0 - alpha
        signed = sign * float(logit)
        p_t, one_minus_p_t = sigmoid(signed), sigmoid(-signed)
        log_p_t = -(math.log1p(math.exp(-signed)) if signed > -30 else -signed)
        slopes.append(
            sign * alpha_t * one_minus_p_t**gamma * (gamma * p_t * log_p_t - one_minus_p_t)
        )
    return np.array(slopes)


def slopes(function, labels, predictions, **kwargs):
    """d sum(function(labels, predictions)) / d predictions, in float32."""
    variable = tf.Variable(predictions)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(function(labels, variable, **kwargs))
    return tape.gradient(loss, variable).numpy()


def keras_focal(labels, predictions, **kwargs):
    return keras.losses.binary_focal_crossentropy(
        labels, predictions, apply_class_balancing=True, **kwargs
    )


# Every label with every probability of the brief; logits are the float32 logits of the
# probabilities, and the oracle reads back the float32 values, not the decimals.
GRID_LABELS, GRID_PROBABILITIES = (
    np.array(column, "float32")
    for column in zip(*itertools.product([0.0, 1.0], [0.1, 0.5, 0.9, 0.999]))
)
GRID_LOGITS = np.log(GRID_PROBABILITIES / (1.0 - GRID_PROBABILITIES)).astype("float32")


def test_hand_computed_values():
    """alpha 0.25, gamma 2. y = 1, p = 0.5: 0.25 * 0.5^2 * ln 2 = 0.0433217.
    y = 0, p = 0.9: p_t = 0.1, 0.75 * 0.9^2 * -ln 0.1 = 0.75 * 0.81 * 2.3025851 = 1.3988204.
    y = 1, logit 0: p = 0.5 again. y = 0, logit ln 9 (p = 0.9): 1.3988204 again."""
    np.testing.assert_allclose(
        binary_focal_loss([1.0, 0.0], [0.5, 0.9]), [0.0433217, 1.3988204], rtol=1e-6
    )
    np.testing.assert_allclose(
        binary_focal_loss([1.0, 0.0], [0.0, math.log(9.0)], from_logits=True),
        [0.0433217, 1.3988204],
        rtol=1e-6,
    )


@pytest.mark.parametrize("from_logits", [False, True], ids=["probabilities", "logits"])
@pytest.mark.parametrize("alpha", [0.25, 0.5])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_matches_loop_oracle(gamma, alpha, from_logits):
    predictions = GRID_LOGITS if from_logits else GRID_PROBABILITIES
    expected = oracle_focal(GRID_LABELS, predictions, alpha, gamma, from_logits)
    for labels, inputs in [
        (GRID_LABELS, predictions),  # (B,): one output per sample
        (GRID_LABELS[:, None], predictions[:, None]),  # (B, 1)
        (GRID_LABELS, predictions[:, None]),  # (B,) labels for (B, 1) outputs
    ]:
        losses = binary_focal_loss(
            labels, inputs, alpha=alpha, gamma=gamma, from_logits=from_logits
        )
        assert tuple(losses.shape) == (8,) and losses.dtype == tf.float32
        np.testing.assert_allclose(losses, expected, rtol=1e-5)


@pytest.mark.parametrize("from_logits", [False, True], ids=["probabilities", "logits"])
def test_gamma_zero_alpha_half_is_half_the_cross_entropy(from_logits):
    """gamma = 0 drops the focal factor, alpha_t = 0.5 for both classes: FL = -0.5 log p_t."""
    predictions = GRID_LOGITS if from_logits else GRID_PROBABILITIES
    losses = binary_focal_loss(
        GRID_LABELS, predictions, alpha=0.5, gamma=0.0, from_logits=from_logits
    )
    p = GRID_PROBABILITIES.astype("float64")
    if from_logits:
        p = 1.0 / (1.0 + np.exp(-GRID_LOGITS.astype("float64")))
    cross_entropy = -np.where(GRID_LABELS == 1, np.log(p), np.log(1.0 - p))
    np.testing.assert_allclose(losses, 0.5 * cross_entropy, rtol=1e-5)
    keras_cross_entropy = keras.losses.binary_crossentropy(
        GRID_LABELS[:, None], predictions[:, None], from_logits=from_logits
    )
    np.testing.assert_allclose(losses, 0.5 * keras_cross_entropy, rtol=1e-5)


@pytest.mark.parametrize("from_logits", [False, True], ids=["probabilities", "logits"])
@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (0.5, 2.0), (0.25, 0.0), (0.9, 3.0)])
def test_values_match_keras_with_class_balancing(alpha, gamma, from_logits):
    """Keras' function with apply_class_balancing=True is Lin et al.'s FL on the grid."""
    predictions = GRID_LOGITS if from_logits else GRID_PROBABILITIES
    expected = binary_focal_loss(
        GRID_LABELS, predictions, alpha=alpha, gamma=gamma, from_logits=from_logits
    )
    keras_values = keras_focal(
        GRID_LABELS[:, None], predictions[:, None], alpha=alpha, gamma=gamma,
        from_logits=from_logits,
    )
    np.testing.assert_allclose(keras_values, expected, rtol=1e-5)


def test_keras_loses_relative_precision_on_confident_correct_logits():
    """Keras' 1 - sigmoid(x) keeps only the float32 spacing below 1 (6e-8): at x = 16,
    1 - p = 1.1e-7, so its loss, 3.6e-22, is off by more than 5%; ours is not."""
    labels, logits = np.ones(3, "float32"), np.array([10.0, 14.0, 16.0], "float32")
    expected = oracle_focal(labels, logits, from_logits=True)
    np.testing.assert_allclose(binary_focal_loss(labels, logits, from_logits=True), expected,
                               rtol=1e-5)
    keras_values = keras_focal(labels[:, None], logits[:, None], from_logits=True).numpy()
    assert abs(keras_values[2] / expected[2] - 1) > 0.05


def test_keras_default_drops_alpha():
    """Keras' default apply_class_balancing=False is FL with alpha_t = 1: our value divided
    by alpha_t, 0.25 for the positives and 0.75 for the negatives."""
    keras_values = keras.losses.binary_focal_crossentropy(
        GRID_LABELS[:, None], GRID_PROBABILITIES[:, None], alpha=0.25, gamma=2.0
    )
    alpha_t = np.where(GRID_LABELS == 1, 0.25, 0.75)
    np.testing.assert_allclose(
        keras_values, binary_focal_loss(GRID_LABELS, GRID_PROBABILITIES) / alpha_t, rtol=1e-5
    )


def test_keras_function_averages_rank_one_inputs_into_one_scalar():
    """Keras averages over the last axis, so (B,) inputs are one sample; ours are B."""
    keras_value = keras_focal(GRID_LABELS, GRID_PROBABILITIES)
    assert tuple(keras_value.shape) == ()
    ours = binary_focal_loss(GRID_LABELS, GRID_PROBABILITIES)
    assert tuple(ours.shape) == (8,)
    np.testing.assert_allclose(float(keras_value), float(np.mean(ours)), rtol=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
def test_logit_gradient_is_finite_and_matches_lins_appendix(gamma):
    """Down to saturated logits (from about 17 on, p or 1 - p rounds to 1 in float32; 100
    and 200 are far beyond), for positives and negatives, right and wrong."""
    logits = np.array(
        [-200.0, -100.0, -30.0, -17.0, -5.0, -0.5, 0.0, 0.5, 5.0, 17.0, 30.0, 100.0, 200.0],
        "float32",
    )
    for label in (0.0, 1.0):
        labels = np.full_like(logits, label)
        values = binary_focal_loss(labels, logits, gamma=gamma, from_logits=True).numpy()
        gradient = slopes(binary_focal_loss, labels, logits, gamma=gamma, from_logits=True)
        assert np.all(np.isfinite(values)) and np.all(np.isfinite(gradient))
        np.testing.assert_allclose(
            values, oracle_focal(labels, logits, 0.25, gamma, True), rtol=1e-5, atol=1e-30
        )
        np.testing.assert_allclose(
            gradient, oracle_focal_slope(labels, logits, 0.25, gamma), rtol=1e-4, atol=1e-30
        )
    # A wrong prediction keeps its full slope: -alpha for a positive at -100 (appendix B,
    # p_t -> 0), 1 - alpha for a negative at +100.
    np.testing.assert_allclose(
        slopes(binary_focal_loss, [1.0, 0.0], np.array([-100.0, 100.0], "float32"),
               gamma=gamma, from_logits=True),
        [-0.25, 0.75],
        rtol=1e-6,
    )


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_keras_gradient_is_nan_for_a_confident_correct_logit_when_gamma_below_one(gamma):
    """Keras rounds 1 - p_t to 0 (sigmoid(20) = 1 and 1 - sigmoid(-20) = 1 in float32) and
    differentiates 0^gamma there: 0 * inf = NaN."""
    labels, logits = np.array([1.0, 0.0], "float32"), np.array([20.0, -20.0], "float32")
    keras_gradient = slopes(keras_focal, labels[:, None], logits[:, None], gamma=gamma,
                            from_logits=True)
    assert np.all(np.isnan(keras_gradient))
    ours = slopes(binary_focal_loss, labels, logits, gamma=gamma, from_logits=True)
    np.testing.assert_allclose(ours, oracle_focal_slope(labels, logits, 0.25, gamma),
                               rtol=1e-4)


def test_probabilities_are_clipped_like_keras():
    """p = 0 for a positive and p = 1 for a negative cost alpha_t * -log(1e-7) (with
    1 - (1 - 1e-7) = 1.1920929e-7 in float32 for the negative), not infinity; p = 1 for a
    positive costs 0.25 * (1.19e-7)^2 * 1.19e-7, 0 in float32. Gradients stay finite."""
    labels = np.array([1.0, 0.0, 1.0, 0.0], "float32")
    probabilities = np.array([0.0, 1.0, 1.0, 0.0], "float32")
    losses = binary_focal_loss(labels, probabilities).numpy()
    np.testing.assert_allclose(
        losses[:2], [0.25 * -math.log(1e-7), 0.75 * -math.log(1.1920929e-7)], rtol=1e-5
    )
    np.testing.assert_allclose(losses[2:], 0.0, atol=1e-20)
    np.testing.assert_allclose(losses, keras_focal(labels[:, None], probabilities[:, None]),
                               rtol=1e-5, atol=1e-20)
    for gamma in (0.0, 2.0):
        assert np.all(np.isfinite(slopes(binary_focal_loss, labels, probabilities,
                                         gamma=gamma)))


def test_soft_labels_are_the_expected_loss():
    """y = 0.3: 0.3 FL(y = 1) + 0.7 FL(y = 0)."""
    probabilities = np.array([0.2, 0.6, 0.95], "float32")
    expected = (0.3 * oracle_focal(np.ones(3), probabilities)
                + 0.7 * oracle_focal(np.zeros(3), probabilities))
    np.testing.assert_allclose(binary_focal_loss(np.full(3, 0.3), probabilities), expected,
                               rtol=1e-5)


def test_several_outputs_per_sample_are_averaged():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(4, 2, 3, 1)).astype("float32")
    logits = rng.normal(scale=3.0, size=(4, 2, 3, 1)).astype("float32")
    losses = binary_focal_loss(labels, logits, from_logits=True)
    expected = oracle_focal(labels, logits, from_logits=True).reshape(4, 6).mean(axis=1)
    assert tuple(losses.shape) == (4,)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)


@pytest.mark.parametrize("shape", [(6,), (6, 1), (6, 3), (6, 2, 2, 1)])
@pytest.mark.parametrize("from_logits", [False, True], ids=["probabilities", "logits"])
def test_loss_class_reduces_like_keras(shape, from_logits):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=shape).astype("float32")
    logits = rng.normal(scale=2.0, size=shape).astype("float32")
    predictions = logits if from_logits else 1.0 / (1.0 + np.exp(-logits))
    loss = BinaryFocalLoss(from_logits=from_logits)
    assert (loss.name, loss.reduction, loss.alpha, loss.gamma) == (
        "binary_focal_loss", "sum_over_batch_size", 0.25, 2.0)
    expected = oracle_focal(labels, predictions, from_logits=from_logits).mean()
    np.testing.assert_allclose(float(loss(labels, predictions)), expected, rtol=1e-5)
    keras_loss = keras.losses.BinaryFocalCrossentropy(
        apply_class_balancing=True, from_logits=from_logits
    )
    np.testing.assert_allclose(float(loss(labels, predictions)),
                               float(keras_loss(labels, predictions)), rtol=1e-5)
    per_sample = BinaryFocalLoss(from_logits=from_logits, reduction=None)(labels, predictions)
    assert tuple(per_sample.shape) == (6,)
    np.testing.assert_allclose(
        float(BinaryFocalLoss(from_logits=from_logits, reduction="sum")(labels, predictions)),
        6 * expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_predictions_compute_in_float32(dtype):
    logits = tf.Variable(tf.cast(np.array([-20.0, -3.0, 0.5, 4.0, 20.0]), dtype))
    labels = np.array([1.0, 0.0, 1.0, 1.0, 0.0], "float32")
    with tf.GradientTape() as tape:
        losses = binary_focal_loss(labels, logits, from_logits=True)
        loss = BinaryFocalLoss(from_logits=True)(labels, logits)
    gradient = tape.gradient(loss, logits)
    assert losses.dtype == tf.float32 and loss.dtype == tf.float32
    assert gradient.dtype == dtype
    assert np.all(np.isfinite(tf.cast(gradient, tf.float32).numpy()))
    rounded = tf.cast(logits, tf.float64).numpy()
    np.testing.assert_allclose(losses, oracle_focal(labels, rounded, from_logits=True),
                               rtol=1e-5)


def test_inside_tf_function_and_compiled_training():
    expected = oracle_focal(GRID_LABELS, GRID_LOGITS, from_logits=True)

    @tf.function(
        input_signature=[tf.TensorSpec([None], tf.float32), tf.TensorSpec([None], tf.float32)]
    )
    def per_sample_loss(labels, logits):
        return binary_focal_loss(labels, logits, from_logits=True)

    np.testing.assert_allclose(per_sample_loss(GRID_LABELS, GRID_LOGITS), expected, rtol=1e-5)
    compiled = tf.function(lambda y, x: binary_focal_loss(y, x, from_logits=True),
                           jit_compile=True)
    np.testing.assert_allclose(compiled(GRID_LABELS, GRID_LOGITS), expected, rtol=1e-5)

    # Keras' evaluation loop: an identity model returns the logits, the loss is their mean.
    model = keras.Sequential([keras.Input((1,)), keras.layers.Identity()])
    model.compile(loss=BinaryFocalLoss(from_logits=True))
    evaluated = model.evaluate(GRID_LOGITS[:, None], GRID_LABELS, batch_size=8, verbose=0)
    np.testing.assert_allclose(evaluated, expected.mean(), rtol=1e-5)


def test_config_round_trip():
    loss = BinaryFocalLoss(alpha=0.5, gamma=1.0, from_logits=True, name="focal")
    config = loss.get_config()
    assert config == {
        "name": "focal",
        "reduction": "sum_over_batch_size",
        "alpha": 0.5,
        "gamma": 1.0,
        "from_logits": True,
    }
    assert BinaryFocalLoss.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, BinaryFocalLoss)
    assert restored.get_config() == config
    np.testing.assert_allclose(float(restored(GRID_LABELS, GRID_LOGITS)),
                               float(loss(GRID_LABELS, GRID_LOGITS)), rtol=1e-6)


def test_compiled_model_saves_and_loads_with_the_loss(tmp_path):
    model = keras.Sequential([keras.Input((1,)), keras.layers.Identity()])
    model.compile(loss=BinaryFocalLoss(alpha=0.5, gamma=1.0, from_logits=True))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.loss, BinaryFocalLoss)
    assert (restored.loss.alpha, restored.loss.gamma, restored.loss.from_logits) == (
        0.5, 1.0, True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=-0.1), r"alpha must be a number in \[0, 1\]. Received: alpha=-0.1"),
        (dict(alpha=1.5), r"alpha must be a number in \[0, 1\]"),
        (dict(alpha=None), r"alpha must be a number in \[0, 1\]. Received: alpha=None"),
        (dict(gamma=-1.0), r"gamma must be a finite number >= 0. Received: gamma=-1.0"),
        (dict(gamma=float("inf")), r"gamma must be a finite number >= 0"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BinaryFocalLoss(**kwargs)
    with pytest.raises(ValueError, match=message):
        binary_focal_loss([1.0], [0.5], **kwargs)
