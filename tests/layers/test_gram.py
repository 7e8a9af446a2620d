"""Gram matrices against an explicit loop over positions, their algebra (symmetric, PSD, scale
with the number of positions), graph and tf.data use, saving, and float32 under mixed precision."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmir.layers import GramMatrix
from tfmir.layers import gram_matrix

FEATURES = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype("float32")


def oracle_gram(features, normalize="positions"):
    """G[b, i, j] = sum over positions (h, w) of F[b, h, w, i] F[b, h, w, j], in float64
    loops; divided by H W for "positions"."""
    batch, height, width, channels = features.shape
    gram = np.zeros((batch, channels, channels))
    for b in range(batch):
        for i in range(channels):
            for j in range(channels):
                total = 0.0
                for h in range(height):
                    for w in range(width):
                        total += float(features[b, h, w, i]) * float(features[b, h, w, j])
                gram[b, i, j] = total
    return gram / (height * width) if normalize == "positions" else gram


def test_hand_computed_value():
    """One 1 x 2 map, channels (1, 2) and (3, 4): F^T F = [[1 + 9, 2 + 12], [2 + 12, 4 + 16]]
    = [[10, 14], [14, 20]], and over the 2 positions [[5, 7], [7, 10]]."""
    features = np.array([[[[1.0, 2.0], [3.0, 4.0]]]], "float32")
    np.testing.assert_array_equal(gram_matrix(features, normalize="none"),
                                  [[[10.0, 14.0], [14.0, 20.0]]])
    np.testing.assert_array_equal(gram_matrix(features), [[[5.0, 7.0], [7.0, 10.0]]])


@pytest.mark.parametrize("normalize", ["positions", "none"])
def test_matches_loop_oracle(normalize):
    expected = oracle_gram(FEATURES, normalize)
    np.testing.assert_allclose(gram_matrix(FEATURES, normalize=normalize), expected,
                               rtol=1e-5, atol=1e-6)
    layer_output = GramMatrix(normalize=normalize)(FEATURES)
    assert tuple(layer_output.shape) == (2, 5, 5) and layer_output.dtype == tf.float32
    np.testing.assert_allclose(layer_output, expected, rtol=1e-5, atol=1e-6)


def test_default_is_positions_and_none_is_paper_003s_product():
    """The two options differ by the 12 positions exactly; "none" is F^T F of the (H W, C)
    flattened map, as paper 003 words it."""
    flattened = FEATURES.reshape(2, 12, 5).astype("float64")
    np.testing.assert_allclose(gram_matrix(FEATURES, normalize="none"),
                               np.transpose(flattened, (0, 2, 1)) @ flattened, rtol=1e-5)
    np.testing.assert_allclose(GramMatrix()(FEATURES) * 12.0,
                               GramMatrix(normalize="none")(FEATURES), rtol=1e-6)


def test_positions_normalisation_does_not_grow_with_the_image():
    """Tiling a map 2 x 2 repeats every position 4 times: F^T F grows 4 times, the
    position-normalised Gram matrix stays the same."""
    tiled = np.tile(FEATURES, (1, 2, 2, 1))
    np.testing.assert_allclose(gram_matrix(tiled), gram_matrix(FEATURES), rtol=1e-5)
    np.testing.assert_allclose(gram_matrix(tiled, normalize="none"),
                               4.0 * gram_matrix(FEATURES, normalize="none"), rtol=1e-5)


@pytest.mark.parametrize("normalize", ["positions", "none"])
def test_symmetric_and_positive_semidefinite(normalize):
    features = np.random.default_rng(1).normal(size=(3, 4, 4, 24)).astype("float32")
    # 16 positions, 24 channels: rank at most 16, so 8 eigenvalues are 0 up to rounding.
    gram = gram_matrix(features, normalize=normalize).numpy()
    np.testing.assert_allclose(gram, np.transpose(gram, (0, 2, 1)), atol=1e-6)
    eigenvalues = np.linalg.eigvalsh(gram.astype("float64"))
    assert eigenvalues.min() >= -1e-5
    assert np.sum(eigenvalues > 1e-4, axis=1).tolist() == [16, 16, 16]


def test_eagerly_in_tf_function_and_with_unknown_shapes():
    expected = oracle_gram(FEATURES)
    layer = GramMatrix()
    np.testing.assert_allclose(tf.function(layer)(tf.constant(FEATURES)), expected,
                               rtol=1e-5, atol=1e-6)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 5], tf.float32)])
    def dynamic(features):
        return gram_matrix(features)

    np.testing.assert_allclose(dynamic(FEATURES), expected, rtol=1e-5, atol=1e-6)
    other_size = FEATURES[:, :2, :3]
    np.testing.assert_allclose(dynamic(other_size), oracle_gram(other_size), rtol=1e-5,
                               atol=1e-6)


def test_in_a_tf_data_map():
    dataset = tf.data.Dataset.from_tensor_slices(FEATURES).batch(2)
    np.testing.assert_allclose(next(iter(dataset.map(GramMatrix()))), oracle_gram(FEATURES),
                               rtol=1e-5, atol=1e-6)
    # One map per element, before batching: (H, W, C) -> (C, C).
    per_image = tf.data.Dataset.from_tensor_slices(FEATURES).map(
        lambda features: gram_matrix(features[None])[0]
    )
    np.testing.assert_allclose(np.stack(list(per_image)), oracle_gram(FEATURES), rtol=1e-5,
                               atol=1e-6)


def test_config_round_trip():
    layer = GramMatrix(normalize="none", name="gram")
    config = layer.get_config()
    assert config["normalize"] == "none" and config["name"] == "gram"
    rebuilt = GramMatrix.from_config(config)
    assert rebuilt.get_config() == config
    np.testing.assert_array_equal(rebuilt(FEATURES), layer(FEATURES))
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, GramMatrix) and restored.normalize == "none"


@pytest.mark.parametrize("normalize", ["positions", "none"])
def test_keras_save_and_load(normalize, tmp_path):
    inputs = keras.Input((3, 4, 5))
    features = keras.layers.Conv2D(6, 1, name="conv")(inputs)
    model = keras.Model(inputs, GramMatrix(normalize=normalize)(features))
    assert tuple(model.output_shape) == (None, 6, 6)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert restored.layers[-1].normalize == normalize
    np.testing.assert_allclose(restored(FEATURES), model(FEATURES), atol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_policy_gives_float32(policy):
    """Inputs are taken in float32, not rounded to the compute dtype (bfloat16 keeps 3
    significant digits, which moves these Gram entries by about 0.03): a float32 map goes
    through unchanged, and activations of 1e5, past float16's 65504 and 99840 in bfloat16,
    give 1e10 * 1024 positions."""
    layer = GramMatrix(dtype=policy)
    assert layer.compute_dtype == policy.split("_")[1]
    np.testing.assert_allclose(layer(FEATURES), oracle_gram(FEATURES), rtol=1e-5, atol=1e-6)
    large = np.full((1, 32, 32, 2), 1e5, "float32")
    output = GramMatrix(normalize="none", dtype=policy)(large)
    assert output.dtype == tf.float32
    np.testing.assert_allclose(output, np.full((1, 2, 2), 1e10 * 1024), rtol=1e-6)

    # A model built under the global policy: the convolution runs in the compute dtype,
    # the Gram matrices come out float32.
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        inputs = keras.Input((3, 4, 5))
        features = keras.layers.Conv2D(6, 1)(inputs)
        gram_layer = GramMatrix()
        model = keras.Model(inputs, gram_layer(features))
    finally:
        keras.config.set_dtype_policy(previous)
    assert gram_layer.dtype_policy.name == policy
    assert model.outputs[0].dtype == "float32"
    output = model(FEATURES)
    assert output.dtype == tf.float32
    conv_output = tf.cast(model.layers[1](FEATURES), tf.float64).numpy()
    np.testing.assert_allclose(output, oracle_gram(conv_output), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_function_casts_any_float_to_float32(dtype):
    features = tf.cast(FEATURES, dtype)
    output = gram_matrix(features)
    assert output.dtype == tf.float32
    rounded = tf.cast(features, tf.float64).numpy()
    np.testing.assert_allclose(output, oracle_gram(rounded), rtol=1e-5, atol=1e-6)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"normalize must be one of \('positions', 'none'\). "
                                         r"Received: normalize='channels'"):
        GramMatrix(normalize="channels")
    with pytest.raises(ValueError, match=r"normalize must be one of"):
        gram_matrix(FEATURES, normalize=None)
    with pytest.raises(ValueError, match=r"features must have rank 4 \(batch, height, width, "
                                         r"channels\). Received: features.shape=\(3, 4, 5\)"):
        gram_matrix(FEATURES[0])
