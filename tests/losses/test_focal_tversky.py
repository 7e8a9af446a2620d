"""Focal Tversky loss against a loop over Abraham & Khan's formula, its α/β roles and limits, and
what Keras 3's own `keras.losses.tversky` computes."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmir.losses import FocalTversky
from tfmir.losses import focal_tversky


def oracle_focal_tversky(y_true, y_pred, alpha=0.7, beta=0.3, gamma=0.75, smooth=1.0):
    """Abraham & Khan's Tversky index and focal Tversky loss per image, in float64 loops.

    TI = (sum p g + s) / (sum p g + alpha sum (1 - p) g + beta sum p (1 - g) + s),
    loss = (1 - TI)^gamma.
    """
    losses = []
    for truth, prediction in zip(y_true, y_pred):
        true_positives = false_negatives = false_positives = 0.0
        for g, p in zip(np.ravel(truth), np.ravel(prediction)):
            g, p = float(g), float(p)
            true_positives += p * g
            false_negatives += (1.0 - p) * g
            false_positives += p * (1.0 - g)
        index = (true_positives + smooth) / (
            true_positives + alpha * false_negatives + beta * false_positives + smooth)
        losses.append((1.0 - index) ** gamma)
    return np.array(losses)


def random_masks(seed, shape=(3, 6, 5, 1)):
    rng = np.random.default_rng(seed)
    truth = (rng.random(shape) < 0.3).astype("float32")
    prediction = rng.random(shape).astype("float32")
    return truth, prediction


def test_hand_computed_value():
    """Truth (1, 1, 0), prediction (1, 0, 0): TP = 1, FN = 1, FP = 0, so
    TI = (1 + 1) / (1 + 0.7 + 1) = 2 / 2.7 and loss = (0.7 / 2.7)^0.75 = 0.36333."""
    loss = focal_tversky([[1.0, 1.0, 0.0]], [[1.0, 0.0, 0.0]]).numpy()
    np.testing.assert_allclose(loss, [(0.7 / 2.7) ** 0.75], rtol=1e-6)
    assert round(float(loss[0]), 4) == 0.3633


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alpha, beta, gamma, smooth", [
    (0.7, 0.3, 0.75, 1.0), (0.5, 0.5, 1.0, 1.0), (0.3, 0.7, 2.0, 0.5)])
def test_matches_loop_oracle(seed, alpha, beta, gamma, smooth):
    truth, prediction = random_masks(seed)
    expected = oracle_focal_tversky(truth, prediction, alpha, beta, gamma, smooth)
    actual = focal_tversky(truth, prediction, alpha=alpha, beta=beta, gamma=gamma,
                           smooth=smooth).numpy()
    assert actual.shape == (3,)
    np.testing.assert_allclose(actual, expected, rtol=1e-5)


def test_alpha_weights_false_negatives_and_beta_false_positives():
    """Four foreground pixels out of eight. Missing two of them (FN = 2, FP = 0) costs
    1 - (2 + 1) / (2 + 0.7 * 2 + 1) = 1.4 / 4.4; adding two false ones (FN = 0, FP = 2) costs
    1 - (4 + 1) / (4 + 0.3 * 2 + 1) = 0.6 / 5.6. With alpha > beta the misses cost more."""
    truth = np.array([[1, 1, 1, 1, 0, 0, 0, 0]], "float32")
    only_misses = np.array([[1, 1, 0, 0, 0, 0, 0, 0]], "float32")
    only_false_alarms = np.array([[1, 1, 1, 1, 1, 1, 0, 0]], "float32")
    misses = float(focal_tversky(truth, only_misses, gamma=1.0)[0])
    false_alarms = float(focal_tversky(truth, only_false_alarms, gamma=1.0)[0])
    assert misses == pytest.approx(1.4 / 4.4, rel=1e-6)
    assert false_alarms == pytest.approx(0.6 / 5.6, rel=1e-6)
    assert misses > false_alarms
    # Exchanging alpha and beta exchanges the two costs' roles.
    swapped = float(focal_tversky(truth, only_false_alarms, alpha=0.3, beta=0.7, gamma=1.0)[0])
    assert swapped == pytest.approx(1 - 5 / (4 + 0.7 * 2 + 1), rel=1e-6)


def test_gamma_one_is_the_plain_tversky_loss_and_gamma_scales_it():
    truth, prediction = random_masks(3)
    plain = focal_tversky(truth, prediction, gamma=1.0).numpy()
    focal = focal_tversky(truth, prediction).numpy()
    np.testing.assert_allclose(focal, plain ** 0.75, rtol=1e-5)
    # (alpha, beta) = (0.5, 0.5) without smoothing is the Dice loss 1 - 2 TP / (2 TP + FN + FP).
    dice = focal_tversky(truth, prediction, alpha=0.5, beta=0.5, gamma=1.0, smooth=1e-9).numpy()
    axes = (1, 2, 3)
    tp = (truth * prediction).sum(axes)
    expected = 1 - 2 * tp / (truth.sum(axes) + prediction.sum(axes))
    np.testing.assert_allclose(dice, expected, rtol=1e-5)


def test_perfect_and_empty_predictions_give_zero():
    """Perfect: FN = FP = 0 so TI = 1. Empty truth and empty prediction: TI = (0 + 1) / (0 + 1)
    = 1 thanks to the smoothing, also 0 (Keras' own tversky gives 1 there, see below)."""
    truth = np.zeros((2, 4, 4, 1), "float32")
    truth[0, 1:3, 1:3] = 1.0
    np.testing.assert_array_equal(focal_tversky(truth, truth).numpy(), [0.0, 0.0])
    empty_prediction = np.zeros_like(truth)
    loss = focal_tversky(truth, empty_prediction).numpy()
    assert loss[1] == 0.0
    assert loss[0] == pytest.approx((1 - 1 / (0.7 * 4 + 1)) ** 0.75, rel=1e-6)


def test_gradient_is_finite_everywhere():
    """Including at TI = 1, where d/dx x^0.75 is infinite at x = 0."""
    truth = np.zeros((3, 4, 4, 1), "float32")
    truth[0, :2] = 1.0
    truth[2, :2] = 1.0
    prediction = np.full_like(truth, 0.5)
    prediction[1] = 0.0  # empty on empty: loss 0
    prediction[2] = truth[2]  # perfect: loss 0
    variable = tf.Variable(prediction)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(focal_tversky(truth, variable))
    gradient = tape.gradient(loss, variable).numpy()
    assert np.isfinite(gradient).all()
    assert np.abs(gradient[0]).sum() > 0
    # The gradient pushes true pixels up and background pixels down.
    assert (gradient[0][truth[0] == 1] < 0).all() and (gradient[0][truth[0] == 0] > 0).all()


def test_low_precision_inputs_give_float32():
    truth, prediction = random_masks(4)
    loss = focal_tversky(truth.astype("float16"), tf.cast(prediction, "bfloat16"))
    assert loss.dtype == tf.float32
    np.testing.assert_allclose(loss.numpy(), oracle_focal_tversky(truth, prediction), rtol=2e-2)


def test_keras_tversky_weights_false_negatives_with_alpha():
    """What Keras 3's `keras.losses.tversky(y_true, y_pred, alpha, beta)` computes.

    Its docstring says alpha controls the false positives and beta the false negatives, but it
    computes sum((1 - y_pred) y_true) * alpha + sum(y_pred (1 - y_true)) * beta: alpha multiplies
    the false negatives, the role Abraham & Khan's alpha has. So
    keras tversky(alpha=0.7, beta=0.3) equals 1 - TI with our alpha = 0.7, beta = 0.3 (up to
    its epsilon 1e-7 in the denominator only, our smooth -> 0), not with them exchanged.
    """
    truth, prediction = random_masks(5)
    keras_loss = keras.losses.tversky(truth, prediction, alpha=0.7, beta=0.3,
                                      axis=(1, 2, 3)).numpy()
    ours = focal_tversky(truth, prediction, alpha=0.7, beta=0.3, gamma=1.0, smooth=1e-9).numpy()
    exchanged = focal_tversky(truth, prediction, alpha=0.3, beta=0.7, gamma=1.0,
                              smooth=1e-9).numpy()
    np.testing.assert_allclose(keras_loss, ours, rtol=1e-5)
    assert np.abs(keras_loss - exchanged).max() > 1e-2

    # Only false negatives: Keras' loss grows with alpha, not with beta.
    truth = np.array([[1.0, 1.0, 0.0, 0.0]])
    misses = np.array([[1.0, 0.0, 0.0, 0.0]])
    assert float(keras.losses.tversky(truth, misses, alpha=0.7, beta=0.3)) == pytest.approx(
        1 - 1 / (1 + 0.7), rel=1e-5)
    # Empty on empty: 0 / epsilon = 0, loss 1, where the smoothed index gives 0.
    empty = np.zeros((1, 4))
    assert float(keras.losses.tversky(empty, empty)) == pytest.approx(1.0)
    assert float(focal_tversky(empty, empty)[0]) == 0.0


def test_loss_class_reduction_and_config_round_trip():
    truth, prediction = random_masks(6)
    loss = FocalTversky(alpha=0.6, beta=0.4, gamma=0.8, smooth=0.5)
    expected = oracle_focal_tversky(truth, prediction, 0.6, 0.4, 0.8, 0.5).mean()
    assert float(loss(truth, prediction)) == pytest.approx(expected, rel=1e-5)
    rebuilt = FocalTversky.from_config(loss.get_config())
    assert (rebuilt.alpha, rebuilt.beta, rebuilt.gamma, rebuilt.smooth) == (0.6, 0.4, 0.8, 0.5)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(again, FocalTversky)
    assert float(again(truth, prediction)) == pytest.approx(expected, rel=1e-5)
    assert FocalTversky().get_config()["alpha"] == 0.7


def test_inside_tf_function():
    truth, prediction = random_masks(7)
    compiled = tf.function(lambda y_true, y_pred: focal_tversky(y_true, y_pred))
    np.testing.assert_allclose(compiled(truth, prediction).numpy(),
                               oracle_focal_tversky(truth, prediction), rtol=1e-5)


def test_trains_a_model():
    """One compiled model step with the loss lowers it (the sigmoid output is probabilities)."""
    keras.utils.set_random_seed(0)
    truth, _ = random_masks(8, shape=(4, 8, 8, 1))
    images = np.concatenate([truth, 1 - truth, np.zeros_like(truth)], axis=-1)
    model = keras.Sequential([keras.Input((8, 8, 3)),
                              keras.layers.Conv2D(1, 1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss=FocalTversky())
    before = model.evaluate(images, truth, verbose=0)
    model.fit(images, truth, epochs=5, verbose=0)
    assert model.evaluate(images, truth, verbose=0) < before


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match=r"y_true and y_pred must have the same shape, "
                                         r"\(B, \.\.\.\). Received: y_true.shape=\(2, 4, 4\), "
                                         r"y_pred.shape=\(2, 4, 4, 1\)"):
        focal_tversky(np.zeros((2, 4, 4)), np.zeros((2, 4, 4, 1)))
    # The Loss class takes (B, H, W) masks for (B, H, W, 1) probabilities.
    truth, prediction = random_masks(9)
    assert float(FocalTversky()(truth[..., 0], prediction)) == pytest.approx(
        oracle_focal_tversky(truth, prediction).mean(), rel=1e-5)


@pytest.mark.parametrize("arguments, message", [
    ({"alpha": -0.1}, r"alpha must be non-negative. Received: alpha=-0.1"),
    ({"beta": -1}, r"beta must be non-negative. Received: beta=-1"),
    ({"gamma": 0}, r"gamma must be positive. Received: gamma=0"),
    ({"smooth": 0.0}, r"smooth must be positive. Received: smooth=0.0"),
])
def test_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        FocalTversky(**arguments)
    with pytest.raises(ValueError, match=message):
        focal_tversky([[1.0]], [[1.0]], **arguments)
