"""CosineClassifier against a loop oracle, with a trainable kernel that survives save and load."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmir.layers import CosineClassifier

DESCRIPTORS = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")


def oracle_cosines(descriptors, kernel):
    out = np.zeros((descriptors.shape[0], kernel.shape[1]))
    for i, descriptor in enumerate(descriptors):
        for c in range(kernel.shape[1]):
            centre = kernel[:, c]
            out[i, c] = descriptor @ centre / (np.linalg.norm(descriptor) * np.linalg.norm(centre))
    return out


def test_matches_oracle_and_stays_in_range():
    layer = CosineClassifier(3)
    cosines = layer(DESCRIPTORS)
    assert cosines.shape == (4, 3)
    expected = oracle_cosines(DESCRIPTORS, layer.kernel.numpy())
    np.testing.assert_allclose(cosines, expected, atol=1e-6)
    np.testing.assert_allclose(tf.function(layer)(tf.constant(DESCRIPTORS)), expected, atol=1e-6)
    # A descriptor equal to a class centre scores exactly 1 with it; its negation -1.
    centres = np.transpose(layer.kernel.numpy())
    scores = layer(np.concatenate([3 * centres, -centres]))
    assert np.all(np.abs(scores) <= 1 + 1e-6)
    np.testing.assert_allclose(np.diag(scores[:3]), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.diag(scores[3:]), -1.0, atol=1e-6)


def test_gradient_reaches_the_kernel():
    layer = CosineClassifier(3)
    layer.build(DESCRIPTORS.shape)
    assert layer.trainable_weights == [layer.kernel]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(DESCRIPTORS)[:, 0])
    gradient = tape.gradient(loss, layer.kernel).numpy()
    assert np.isfinite(gradient).all() and np.abs(gradient[:, 0]).sum() > 0
    np.testing.assert_array_equal(gradient[:, 1:], 0.0)


def test_config_round_trip():
    layer = CosineClassifier(3, name="classifier")
    layer(DESCRIPTORS)
    rebuilt = CosineClassifier.from_config(layer.get_config())
    assert rebuilt.get_config() == layer.get_config()
    rebuilt(DESCRIPTORS)
    rebuilt.set_weights(layer.get_weights())
    np.testing.assert_allclose(rebuilt(DESCRIPTORS), layer(DESCRIPTORS), atol=1e-6)


def test_keras_save_and_load(tmp_path):
    inputs = keras.Input((6,))
    model = keras.Model(inputs, CosineClassifier(3)(keras.layers.Dense(6)(inputs)))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_allclose(restored(DESCRIPTORS), model(DESCRIPTORS), atol=1e-6)


@pytest.mark.parametrize("num_classes", [0, -2, 2.0, True])
def test_rejects_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="Received: num_classes="):
        CosineClassifier(num_classes)
