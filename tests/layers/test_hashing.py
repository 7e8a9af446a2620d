"""HashProjection: its shape rule, a loop-convolution oracle, and a kernel that never trains."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmir.layers import HashProjection
from tfmir.layers import hash_shape


@pytest.mark.parametrize("height, width, num_bits, expected", [
    (8, 8, 36, (6, 6, 1, (3, 3))),    # 64 does not divide 36; 6^2 = 36 does
    (8, 8, 64, (8, 8, 1, (1, 1))),    # the paper's 1 x 8 x 8
    (8, 8, 128, (8, 8, 2, (1, 1))),
    (8, 8, 256, (8, 8, 4, (1, 1))),
    (4, 4, 36, (3, 3, 4, (2, 2))),    # 16 does not divide 36; 4^2 neither; 3^2 does
    (8, 8, 7, (1, 1, 7, (8, 8))),     # only 1^2 divides 7: a kernel over the whole map
    (8, 12, 36, (6, 6, 1, (3, 7))),   # non-square map: non-square kernel, square output
    (8, 12, 192, (8, 12, 2, (1, 1))),
])
def test_hash_shape(height, width, num_bits, expected):
    assert hash_shape(height, width, num_bits) == expected
    h, w, c, (kernel_height, kernel_width) = expected
    assert h * w * c == num_bits
    assert (height - kernel_height + 1, width - kernel_width + 1) == (h, w)


def oracle_codes(features, kernel):
    """Valid convolution as loops, flattened row-major over (row, column, output channel)."""
    batch, height, width, channels = features.shape
    kernel_height, kernel_width, _, out_channels = kernel.shape
    out_height, out_width = height - kernel_height + 1, width - kernel_width + 1
    codes = np.zeros((batch, out_height * out_width * out_channels))
    for b in range(batch):
        index = 0
        for i in range(out_height):
            for j in range(out_width):
                for k in range(out_channels):
                    total = 0.0
                    for di in range(kernel_height):
                        for dj in range(kernel_width):
                            for c in range(channels):
                                total += features[b, i + di, j + dj, c] * kernel[di, dj, c, k]
                    codes[b, index] = np.tanh(total)
                    index += 1
    return codes


@pytest.mark.parametrize("shape, num_bits", [
    ((2, 8, 8, 5), 36), ((2, 8, 8, 5), 64), ((2, 8, 8, 5), 128), ((2, 8, 8, 5), 256),
    ((2, 4, 4, 3), 36), ((2, 8, 12, 5), 36),
])
def test_matches_convolution_oracle(shape, num_bits):
    features = np.random.default_rng(0).normal(size=shape).astype("float32")
    layer = HashProjection(num_bits, seed=3)
    codes = layer(features)
    assert codes.shape == (shape[0], num_bits)
    h, w, c, kernel_size = hash_shape(shape[1], shape[2], num_bits)
    kernel = layer.kernel.numpy()
    assert kernel.shape == (*kernel_size, shape[3], c)
    expected = oracle_codes(features, kernel)
    np.testing.assert_allclose(codes, expected, atol=1e-5)
    np.testing.assert_allclose(tf.function(layer)(tf.constant(features)), expected, atol=1e-5)
    dataset = tf.data.Dataset.from_tensor_slices(features).batch(2).map(layer)
    np.testing.assert_allclose(next(iter(dataset)), expected, atol=1e-5)


def test_kernel_is_seeded_gaussian_independent_of_keras_seed():
    def kernel(seed, keras_seed):
        keras.utils.set_random_seed(keras_seed)
        layer = HashProjection(36, seed=seed)
        layer.build((None, 8, 8, 5))
        return layer.kernel.numpy()

    np.testing.assert_array_equal(kernel(7, keras_seed=0), kernel(7, keras_seed=1))
    assert not np.allclose(kernel(7, keras_seed=0), kernel(8, keras_seed=0))
    fan_in = 3 * 3 * 5
    expected = np.random.default_rng(7).normal(0.0, np.sqrt(1 / fan_in), size=(3, 3, 5, 1))
    np.testing.assert_allclose(kernel(7, keras_seed=0), expected, rtol=1e-6)


def test_kernel_is_not_trained():
    inputs = keras.Input((8, 8, 5))
    features = keras.layers.Conv2D(5, 1, name="conv")(inputs)
    hashing = HashProjection(64, name="hash")
    model = keras.Model(inputs, hashing(features))
    assert hashing.trainable_weights == [] and len(hashing.non_trainable_weights) == 1
    assert all(weight is not hashing.kernel for weight in model.trainable_weights)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8, 8, 5)).astype("float32")
    y = rng.uniform(-1, 1, size=(4, 64)).astype("float32")
    kernel_before = hashing.kernel.numpy()
    conv_before = model.get_layer("conv").kernel.numpy()
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    model.train_on_batch(x, y)
    np.testing.assert_array_equal(hashing.kernel.numpy(), kernel_before)
    assert not np.allclose(model.get_layer("conv").kernel.numpy(), conv_before)


def test_config_round_trip():
    layer = HashProjection(36, seed=5, name="hash")
    config = layer.get_config()
    assert config["num_bits"] == 36 and config["seed"] == 5
    rebuilt = HashProjection.from_config(config)
    features = np.random.default_rng(0).normal(size=(2, 8, 8, 5)).astype("float32")
    # The same seed rebuilds the same kernel without copying weights.
    np.testing.assert_allclose(rebuilt(features), layer(features), atol=1e-6)


def test_numpy_integer_arguments_give_a_json_config():
    config = HashProjection(np.int64(64), seed=np.int32(2)).get_config()
    assert json.loads(json.dumps(config))["num_bits"] == 64


def test_keras_save_and_load(tmp_path):
    inputs = keras.Input((8, 8, 5))
    features = keras.layers.Conv2D(5, 1, name="conv")(inputs)
    model = keras.Model(inputs, HashProjection(128, seed=1)(features))
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 5)).astype("float32")
    np.testing.assert_allclose(restored(x), model(x), atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_bits": 0}, "num_bits"),
    ({"num_bits": 2.5}, "num_bits"),
    ({"num_bits": True}, "num_bits"),
    ({"num_bits": 64, "seed": -1}, "seed"),
])
def test_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=f"Received: {match}="):
        HashProjection(**kwargs)


def test_needs_a_static_map_size():
    with pytest.raises(ValueError, match="known height, width"):
        HashProjection(64)(keras.Input((None, None, 5)))
    with pytest.raises(ValueError, match="Received: num_bits="):
        hash_shape(8, 8, 0)
