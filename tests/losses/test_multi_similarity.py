"""Multi-Similarity loss against an explicit double-loop oracle and inside Keras training."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmir.losses import MultiSimilarity
from tfmir.losses import multi_similarity


def oracle_multi_similarity(
    labels,
    embeddings,
    ref_labels=None,
    ref_embeddings=None,
    alpha=2.0,
    beta=50.0,
    base=0.5,
    epsilon=0.1,
    mining=True,
):
    """The paper's formula as plain Python loops over pairs (math module, no vectorisation)."""
    labels = [int(v) for v in np.ravel(labels)]
    embeddings = [[float(x) for x in row] for row in embeddings]
    self_reference = ref_embeddings is None
    if self_reference:
        ref_labels, ref_embeddings = labels, embeddings
    else:
        ref_labels = [int(v) for v in np.ravel(ref_labels)]
        ref_embeddings = [[float(x) for x in row] for row in ref_embeddings]

    def unit(vector):
        norm = math.sqrt(sum(x * x for x in vector))
        return [x / norm for x in vector]

    anchors = [unit(v) for v in embeddings]
    references = [unit(v) for v in ref_embeddings]
    losses = []
    for i, anchor in enumerate(anchors):
        positives, negatives = [], []
        for j, reference in enumerate(references):
            if self_reference and i == j:
                continue
            similarity = sum(a * b for a, b in zip(anchor, reference))
            if ref_labels[j] == labels[i]:
                positives.append(similarity)
            else:
                negatives.append(similarity)
        if mining:
            hardest_positive = min(positives) if positives else math.inf
            hardest_negative = max(negatives) if negatives else -math.inf
            kept_negatives = [s for s in negatives if s + epsilon > hardest_positive]
            kept_positives = [s for s in positives if s - epsilon < hardest_negative]
        else:
            kept_positives, kept_negatives = positives, negatives
        positive_sum = sum(math.exp(-alpha * (s - base)) for s in kept_positives)
        negative_sum = sum(math.exp(beta * (s - base)) for s in kept_negatives)
        losses.append(math.log(1 + positive_sum) / alpha + math.log(1 + negative_sum) / beta)
    return losses


def random_batch(seed, num_items=12, num_classes=3, dim=5):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), num_items // num_classes)
    rng.shuffle(labels)
    # Class centres plus noise give a mix of easy and hard pairs, so mining matters.
    centres = rng.normal(size=(num_classes, dim))
    embeddings = centres[labels] + 0.9 * rng.normal(size=(num_items, dim))
    return labels, embeddings.astype("float32")


def test_hand_computed_three_points():
    """Three unit vectors in 2-D, alpha=2, beta=50, lambda=0.5, epsilon=0.1.

    e0 = (1, 0), e1 = (0.6, 0.8), e2 = (0, 1); labels 0, 0, 1.
    Similarities: S01 = 0.6, S02 = 0, S12 = 0.8.

    Without mining:
      anchor 0: P={S01=0.6}, N={S02=0}
        (1/2) log(1 + e^{-2(0.1)}) = 0.5 log(1.818730753) = 0.299069434
        (1/50) log(1 + e^{50(-0.5)}) = (1/50) log(1 + e^{-25}) = 2.78e-13
      anchor 1: P={S01=0.6}, N={S12=0.8}
        0.299069434 + (1/50) log(1 + e^{15}) = 0.299069434 + 0.300000006 = 0.599069440
      anchor 2: no positives -> 0; N={0, 0.8}:
        (1/50) log(1 + e^{-25} + e^{15}) = 0.300000006
    With mining:
      anchor 0: min P = 0.6; negative 0 kept iff 0 + 0.1 > 0.6: no.
                max N = 0; positive 0.6 kept iff 0.6 - 0.1 < 0: no.  -> 0
      anchor 1: min P = 0.6, 0.8 + 0.1 > 0.6 kept; max N = 0.8, 0.5 < 0.8 kept -> 0.599069440
      anchor 2: no positives, min P = +inf, no negative kept -> 0
    """
    labels = [0, 0, 1]
    embeddings = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
    np.testing.assert_allclose(
        multi_similarity(labels, embeddings, mining=False),
        [0.299069434, 0.599069440, 0.300000006],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        multi_similarity(labels, embeddings), [0.0, 0.599069440, 0.0], rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("mining", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_oracle(seed, mining):
    labels, embeddings = random_batch(seed)
    np.testing.assert_allclose(
        multi_similarity(labels, embeddings, mining=mining),
        oracle_multi_similarity(labels, embeddings, mining=mining),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize("mining", [True, False])
def test_matches_loop_oracle_with_other_hyperparameters(mining):
    labels, embeddings = random_batch(3, num_items=10, num_classes=2)
    kwargs = dict(alpha=1.0, beta=20.0, base=0.3, epsilon=0.3, mining=mining)
    np.testing.assert_allclose(
        multi_similarity(labels, embeddings, **kwargs),
        oracle_multi_similarity(labels, embeddings, **kwargs),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize("mining", [True, False])
def test_reference_embeddings_keep_every_pair(mining):
    labels, embeddings = random_batch(4, num_items=6)
    ref_labels, ref_embeddings = random_batch(5, num_items=9)
    # The first reference is a copy of anchor 0: with a memory bank it is a real pair.
    ref_labels[0], ref_embeddings[0] = labels[0], embeddings[0]
    np.testing.assert_allclose(
        multi_similarity(labels, embeddings, ref_labels, ref_embeddings, mining=mining),
        oracle_multi_similarity(labels, embeddings, ref_labels, ref_embeddings, mining=mining),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize("mining", [True, False])
def test_anchor_without_positives(mining):
    labels, embeddings = random_batch(6, num_items=9)
    labels[4] = 7  # a class with one member: anchor 4 has no positive
    losses = multi_similarity(labels, embeddings, mining=mining).numpy()
    expected = oracle_multi_similarity(labels, embeddings, mining=mining)
    np.testing.assert_allclose(losses, expected, rtol=1e-4, atol=1e-6)
    if mining:
        assert losses[4] == 0.0
    else:
        assert losses[4] > 0.0


def test_single_class_batch_has_no_negative_term():
    labels = np.zeros(5, dtype="int64")
    embeddings = np.random.default_rng(7).normal(size=(5, 4)).astype("float32")
    np.testing.assert_allclose(
        multi_similarity(labels, embeddings, mining=False),
        oracle_multi_similarity(labels, embeddings, mining=False),
        rtol=1e-5,
    )
    np.testing.assert_array_equal(multi_similarity(labels, embeddings), np.zeros(5))


@pytest.mark.parametrize("label_shape", [(-1,), (-1, 1)])
@pytest.mark.parametrize("label_dtype", ["int32", "int64", "uint8"])
def test_label_shapes_and_dtypes(label_shape, label_dtype):
    labels, embeddings = random_batch(8)
    expected = oracle_multi_similarity(labels, embeddings)
    losses = multi_similarity(labels.astype(label_dtype).reshape(label_shape), embeddings)
    assert tuple(losses.shape) == (12,)
    np.testing.assert_allclose(losses, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mining", [True, False])
def test_gradient_is_finite_and_non_zero(mining):
    labels, embeddings = random_batch(9)
    labels[0] = 11  # an anchor whose positive term is fully masked
    embeddings = tf.Variable(embeddings)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(multi_similarity(labels, embeddings, mining=mining))
    gradient = tape.gradient(loss, embeddings).numpy()
    assert np.all(np.isfinite(gradient))
    assert np.abs(gradient).max() > 1e-4


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_inputs_compute_in_float32(dtype):
    labels, embeddings = random_batch(10)
    low_precision = tf.cast(embeddings, dtype)
    losses = multi_similarity(labels, low_precision)
    assert losses.dtype == tf.float32
    # The oracle sees exactly the values the function received.
    rounded = tf.cast(low_precision, tf.float64).numpy()
    expected = oracle_multi_similarity(labels, rounded)
    np.testing.assert_allclose(losses, expected, rtol=1e-4, atol=1e-6)

    variable = tf.Variable(low_precision)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(multi_similarity(labels, variable))
    gradient = tape.gradient(loss, variable)
    assert gradient.dtype == tf.as_dtype(dtype)
    assert np.all(np.isfinite(tf.cast(gradient, tf.float32).numpy()))


def test_inside_tf_function_with_unknown_batch_size():
    labels, embeddings = random_batch(11)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, None], tf.float32),
        ]
    )
    def per_anchor_loss(labels, embeddings):
        return multi_similarity(labels, embeddings)

    expected = oracle_multi_similarity(labels, embeddings)
    np.testing.assert_allclose(
        per_anchor_loss(labels.astype("int32"), embeddings), expected, rtol=1e-4, atol=1e-6
    )
    compiled = tf.function(lambda y, x: multi_similarity(y, x), jit_compile=True)
    np.testing.assert_allclose(compiled(labels, embeddings), expected, rtol=1e-4, atol=1e-6)


def test_loss_class_mean_over_anchors():
    labels, embeddings = random_batch(12)
    loss = MultiSimilarity()
    assert loss.name == "multi_similarity"
    assert loss.reduction == "sum_over_batch_size"
    expected = np.mean(oracle_multi_similarity(labels, embeddings))
    np.testing.assert_allclose(float(loss(labels, embeddings)), expected, rtol=1e-4)
    np.testing.assert_allclose(
        float(loss(labels[:, None].astype("float32"), embeddings)), expected, rtol=1e-4
    )
    unreduced = MultiSimilarity(reduction=None, mining=False)(labels, embeddings)
    np.testing.assert_allclose(
        unreduced, oracle_multi_similarity(labels, embeddings, mining=False), rtol=1e-4, atol=1e-6
    )


def test_config_round_trip():
    loss = MultiSimilarity(alpha=3.0, beta=40.0, base=0.4, epsilon=0.2, mining=False, name="ms")
    config = loss.get_config()
    assert config == {
        "name": "ms",
        "reduction": "sum_over_batch_size",
        "alpha": 3.0,
        "beta": 40.0,
        "base": 0.4,
        "epsilon": 0.2,
        "mining": False,
    }
    assert MultiSimilarity.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, MultiSimilarity)
    assert restored.get_config() == config


def test_mismatched_reference_arguments():
    with pytest.raises(ValueError, match="ref_labels and ref_embeddings"):
        multi_similarity([0, 1], [[1.0, 0.0], [0.0, 1.0]], ref_labels=[0, 1])


def make_clusters(seed=0, num_classes=4, per_class=16, dim=8):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    centres = rng.normal(size=(num_classes, dim))
    inputs = centres[labels] + 0.8 * rng.normal(size=(labels.size, dim))
    order = rng.permutation(labels.size)
    return inputs[order].astype("float32"), labels[order]


def test_fit_decreases_loss_and_model_saves(tmp_path):
    keras.utils.set_random_seed(0)
    inputs, labels = make_clusters()
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16)])
    model.compile(
        optimizer=keras.optimizers.Adam(0.05), loss=MultiSimilarity(), jit_compile=False
    )
    history = model.fit(inputs, labels, batch_size=64, epochs=6, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]

    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.loss, MultiSimilarity)
    assert restored.loss.get_config() == model.loss.get_config()
    np.testing.assert_allclose(
        restored.predict(inputs, verbose=0), model.predict(inputs, verbose=0)
    )
