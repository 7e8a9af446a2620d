"""Class-level circle loss against a loop over Sun et al.'s eq. 6 and Keras' circle (values),
against the gradient with constant weights a_p, a_n (Sun et al.'s reference code), and its
reduction."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmir.losses import ClassCircle
from tfmir.losses import class_circle


def oracle_class_circle(labels, cosines, scale=32.0, margin=0.25, weights_from=None):
    """Eq. 6 of Sun et al. with one within-class cosine per item, in float64 loops.

    loss = log(1 + sum_j exp(scale a_n^j (s_n^j - D_n)) * exp(-scale a_p (s_p - D_p))),
    a_p = [O_p - s_p]_+, a_n = [s_n - O_n]_+, O_p = 1 + m, O_n = -m, D_p = 1 - m, D_n = m.
    The weights a_p, a_n come from `weights_from` when given, from `cosines` otherwise.
    """
    optimum_positive, optimum_negative = 1 + margin, -margin
    delta_positive, delta_negative = 1 - margin, margin
    weights_from = cosines if weights_from is None else weights_from
    losses = []
    for label, row, weight_row in zip(np.ravel(labels), cosines, weights_from):
        positive_sum, negative_sum = 0.0, 0.0
        for j, (similarity, weight_similarity) in enumerate(zip(row, weight_row)):
            similarity, weight_similarity = float(similarity), float(weight_similarity)
            if j == int(label):
                weight = max(optimum_positive - weight_similarity, 0.0)
                positive_sum += math.exp(-scale * weight * (similarity - delta_positive))
            else:
                weight = max(weight_similarity - optimum_negative, 0.0)
                negative_sum += math.exp(scale * weight * (similarity - delta_negative))
        losses.append(math.log1p(negative_sum * positive_sum))
    return np.array(losses)


def random_cosines(seed, num_items, num_classes, dim=8):
    """Cosines of random unit descriptors to random unit class vectors, and random labels."""
    rng = np.random.default_rng(seed)
    descriptors = rng.normal(size=(num_items, dim))
    class_vectors = rng.normal(size=(num_classes, dim))
    descriptors /= np.linalg.norm(descriptors, axis=1, keepdims=True)
    class_vectors /= np.linalg.norm(class_vectors, axis=1, keepdims=True)
    cosines = np.clip(descriptors @ class_vectors.T, -1.0, 1.0).astype("float32")
    return rng.integers(0, num_classes, size=num_items), cosines


def keras_class_circle(labels, cosines, scale=32.0, margin=0.25):
    """`keras.losses.circle` on the cosines, against the classes as reference embeddings."""
    num_classes = cosines.shape[-1]
    return keras.losses.circle(
        labels,
        cosines,
        ref_labels=np.arange(num_classes),
        ref_embeddings=np.eye(num_classes, dtype="float32"),
        remove_diagonal=False,
        gamma=scale,
        margin=margin,
    )


def gradients(function, labels, cosines, **kwargs):
    """d sum(function(labels, cosines)) / d cosines, in float32."""
    variable = tf.Variable(cosines)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(function(labels, variable, **kwargs))
    return tape.gradient(loss, variable).numpy()


def test_hand_computed_value():
    """s_p = 1, s_n = 0, scale 32, margin 0.25: a_p = a_n = 0.25 and both logits are
    -32 * 0.25 * 0.25 = -2, so loss = log(1 + e^-2 e^-2) = log(1 + e^-4) = 0.018149.
    At s_n = -margin, a_n = 0 and the negative's term is exp(0) = 1: log(1 + e^-2)."""
    losses = class_circle([0, 1], [[1.0, 0.0], [-0.25, 1.0]]).numpy()
    np.testing.assert_allclose(losses, [math.log1p(math.exp(-4)), math.log1p(math.exp(-2))],
                               rtol=1e-6)


@pytest.mark.parametrize(
    "num_items, num_classes, seed",
    [(1, 2, 0), (6, 2, 1), (7, 3, 2), (16, 3, 3), (12, 5, 4), (9, 10, 5)],
)
def test_matches_loop_oracle(num_items, num_classes, seed):
    labels, cosines = random_cosines(seed, num_items, num_classes)
    np.testing.assert_allclose(
        class_circle(labels, cosines), oracle_class_circle(labels, cosines), rtol=1e-5
    )


@pytest.mark.parametrize("scale, margin", [(32.0, 0.25), (80.0, 0.4), (1.0, 0.0), (16.0, 0.9)])
def test_other_scales_and_margins_match_loop_oracle(scale, margin):
    rng = np.random.default_rng(6)
    cosines = rng.uniform(-1.0, 1.0, size=(10, 4)).astype("float32")
    labels = rng.integers(0, 4, size=10)
    np.testing.assert_allclose(
        class_circle(labels, cosines, scale=scale, margin=margin),
        oracle_class_circle(labels, cosines, scale=scale, margin=margin),
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "num_items, num_classes, seed, scale, margin",
    [(6, 2, 15, 32.0, 0.25), (16, 3, 16, 32.0, 0.25), (9, 10, 17, 32.0, 0.25),
     (12, 5, 18, 80.0, 0.4), (10, 4, 19, 1.0, 0.0)],
)
def test_values_match_keras_circle(num_items, num_classes, seed, scale, margin):
    """Keras' circle, against the identity as reference embeddings, is an independent
    implementation of eq. 6: the values agree (the gradients do not, see below)."""
    labels, cosines = random_cosines(seed, num_items, num_classes)
    np.testing.assert_allclose(
        class_circle(labels, cosines, scale=scale, margin=margin),
        keras_class_circle(labels, cosines, scale=scale, margin=margin),
        rtol=1e-5,
    )


def test_ties_and_boundaries_match_loop_oracle():
    cosines = np.array(
        [
            [0.3, 0.3, 0.3],  # within- and between-class cosines all equal
            [0.0, 0.0, 0.0],
            [1.0, 1.0, -1.0],  # a negative as good as the positive
            [-1.0, -1.0, -1.0],
            [0.75, 0.25, -0.25],  # exactly D_p, D_n and O_n
            [0.3, 0.3, 0.3],  # a duplicate row with another label
        ],
        "float32",
    )
    labels = np.array([0, 2, 1, 1, 0, 1])
    losses = class_circle(labels, cosines).numpy()
    np.testing.assert_allclose(losses, oracle_class_circle(labels, cosines), rtol=1e-5)
    assert losses[0] == losses[5]


@pytest.mark.parametrize("label_shape", [(-1,), (-1, 1)])
@pytest.mark.parametrize("label_dtype", ["int32", "int64", "uint8", "float32"])
def test_label_shapes_and_dtypes(label_shape, label_dtype):
    labels, cosines = random_cosines(7, 8, 3)
    losses = class_circle(labels.astype(label_dtype).reshape(label_shape), cosines)
    assert tuple(losses.shape) == (8,)
    np.testing.assert_allclose(losses, oracle_class_circle(labels, cosines), rtol=1e-5)


def test_loss_class_is_the_mean_over_the_batch():
    labels, cosines = random_cosines(8, 10, 4)
    loss = ClassCircle()
    assert (loss.name, loss.reduction) == ("class_circle", "sum_over_batch_size")
    expected = oracle_class_circle(labels, cosines)
    np.testing.assert_allclose(float(loss(labels, cosines)), expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        float(loss(labels[:, None].astype("float32"), cosines)), expected.mean(), rtol=1e-5
    )
    np.testing.assert_allclose(
        ClassCircle(reduction=None)(labels, cosines), expected, rtol=1e-5
    )
    np.testing.assert_allclose(
        float(ClassCircle(reduction="sum")(labels, cosines)), expected.sum(), rtol=1e-5
    )


# Scale 256, margin 0.5, C = 2. Item 0 (s_p = 1, s_n = 0): both logits are -256 * 0.5 * 0.5
# = -64, loss = log(1 + e^-128), 0 in float32. Item 1 (s_p = 0, s_n = 1): both logits are
# 256 * 1.5 * 0.5 = 192, loss = log(1 + e^384) = 384. The mean over the batch is 192.
ZERO_ITEM_LABELS = np.array([0, 0])
ZERO_ITEM_COSINES = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")


def test_item_with_zero_loss_counts_in_the_mean():
    per_item = class_circle(ZERO_ITEM_LABELS, ZERO_ITEM_COSINES, scale=256.0, margin=0.5)
    np.testing.assert_array_equal(per_item, [0.0, 384.0])
    loss = ClassCircle(scale=256.0, margin=0.5)
    assert float(loss(ZERO_ITEM_LABELS, ZERO_ITEM_COSINES)) == 192.0

    # The same inside Keras' compiled evaluation loop.
    model = keras.Sequential([keras.Input((2,)), keras.layers.Identity()])
    model.compile(loss=loss)
    evaluated = model.evaluate(ZERO_ITEM_COSINES, ZERO_ITEM_LABELS, batch_size=2, verbose=0)
    assert evaluated == 192.0


class KerasCircleAsIs(keras.losses.Loss):
    """`keras.losses.circle` in a Loss, its result (and `_keras_mask`) returned as is."""

    def call(self, y_true, y_pred):
        return keras.losses.circle(
            y_true,
            y_pred,
            ref_labels=np.arange(2),
            ref_embeddings=np.eye(2, dtype="float32"),
            remove_diagonal=False,
            gamma=256.0,
            margin=0.5,
        )


def test_keras_circle_alone_would_average_over_nonzero_items():
    """Why `class_circle` drops the mask: as is, the mean skips item 0 and gives 384."""
    assert float(KerasCircleAsIs()(ZERO_ITEM_LABELS, ZERO_ITEM_COSINES)) == 384.0


def finite_differences(labels, cosines, constant_weights, h=1e-6, **kwargs):
    """Central differences of the summed oracle loss, in float64.

    With `constant_weights`, a_p and a_n stay at their values for the unmoved cosines, so
    the differences are the gradient Sun et al. define (their code detaches a_p, a_n);
    without, they also pick up d a / d s, the gradient Keras' circle computes.
    """
    cosines = cosines.astype("float64")
    weights_from = cosines if constant_weights else None
    gradient = np.zeros_like(cosines)
    for index in np.ndindex(cosines.shape):
        moved = cosines.copy()
        moved[index] += h
        plus = oracle_class_circle(labels, moved, weights_from=weights_from, **kwargs).sum()
        moved[index] -= 2 * h
        minus = oracle_class_circle(labels, moved, weights_from=weights_from, **kwargs).sum()
        gradient[index] = (plus - minus) / (2 * h)
    return gradient


# Finite differences of the loss value include d a / d s, which Sun et al.'s gradient leaves
# out, and the two do not agree in general (see the two-class example below). So the
# gradient is checked against finite differences of eq. 6 with a_p, a_n frozen at the
# point, which is the detached gradient by definition, and against its closed form.
@pytest.mark.parametrize(
    "num_items, num_classes, seed, scale, margin",
    [(6, 2, 9, 32.0, 0.25), (8, 3, 10, 32.0, 0.25), (5, 6, 11, 32.0, 0.25),
     (7, 4, 20, 80.0, 0.4), (6, 3, 21, 1.0, 0.0)],
)
def test_gradient_matches_finite_differences_with_constant_weights(
    num_items, num_classes, seed, scale, margin
):
    labels, cosines = random_cosines(seed, num_items, num_classes)
    np.testing.assert_allclose(
        gradients(class_circle, labels, cosines, scale=scale, margin=margin),
        finite_differences(labels, cosines, True, scale=scale, margin=margin),
        rtol=1e-3,
        atol=1e-4,
    )


@pytest.mark.parametrize("num_items, num_classes, seed", [(6, 2, 9), (8, 3, 10), (5, 6, 11)])
def test_keras_gradient_differentiates_through_the_weights(num_items, num_classes, seed):
    """Keras' gradient is the finite differences of the value, a_p and a_n included;
    ours is not."""
    labels, cosines = random_cosines(seed, num_items, num_classes)
    full = finite_differences(labels, cosines, False)
    np.testing.assert_allclose(
        gradients(keras_class_circle, labels, cosines), full, rtol=1e-3, atol=1e-4
    )
    assert np.max(np.abs(gradients(class_circle, labels, cosines) - full)) > 1.0


def two_class_gradient(s_p, s_n, scale=32.0, margin=0.25):
    """d loss / d (s_p, s_n) for one item and C = 2, a_p and a_n held constant.

    The loss is softplus(z) with z = scale a_n (s_n - m) - scale a_p (s_p - 1 + m), so
    d loss / d s_p = sigmoid(z) (-scale a_p) and d loss / d s_n = sigmoid(z) scale a_n.
    """
    weight_p, weight_n = max(1 + margin - s_p, 0.0), max(s_n + margin, 0.0)
    z = scale * weight_n * (s_n - margin) - scale * weight_p * (s_p - 1 + margin)
    sigmoid = 1 / (1 + math.exp(-z))
    return [sigmoid * -scale * weight_p, sigmoid * scale * weight_n]


def test_two_class_gradient_by_hand_and_keras_differs():
    """s_p = 0, s_n = -0.1, scale 32, margin 0.25: a_p = 1.25, a_n = 0.15, z_p =
    -32 * 1.25 * (0 - 0.75) = 30, z_n = 32 * 0.15 * (-0.1 - 0.25) = -1.68, loss =
    softplus(28.32), whose slope sigmoid(28.32) is 1 in float32. So d loss / d s_p =
    -32 * 1.25 = -40 and d loss / d s_n = 32 * 0.15 = 4.8: s_n goes down, toward -margin.

    Keras differentiates a_p and a_n too: z_p = -32 (1.25 - s_p)(s_p - 0.75) has slope
    -32 (2 - 2 s_p) = -64 and z_n = 32 (s_n + 0.25)(s_n - 0.25) = 32 (s_n^2 - 0.0625)
    has slope 32 * 2 s_n = -6.4, which pulls s_n up, toward 0.
    """
    cosines = np.array([[0.0, -0.1]], "float32")
    np.testing.assert_allclose(class_circle([0], cosines), [28.32], rtol=1e-6)
    np.testing.assert_allclose(gradients(class_circle, [0], cosines), [[-40.0, 4.8]], rtol=1e-6)
    np.testing.assert_allclose(two_class_gradient(0.0, -0.1), [-40.0, 4.8], rtol=1e-6)
    np.testing.assert_allclose(
        gradients(keras_class_circle, [0], cosines), [[-64.0, -6.4]], rtol=1e-6
    )


@pytest.mark.parametrize("scale, margin", [(32.0, 0.25), (80.0, 0.4), (1.0, 0.0)])
def test_two_class_gradient_matches_closed_form(scale, margin):
    rng = np.random.default_rng(22)
    cosines = rng.uniform(-1.0, 1.0, size=(8, 2)).astype("float32")
    cosines[0] = [0.3, -0.1]  # s_n in (-margin, 0) at margin 0.25 and 0.4
    labels = rng.integers(0, 2, size=8)
    expected = []
    for label, row in zip(labels, cosines.astype("float64")):
        slope_p, slope_n = two_class_gradient(row[label], row[1 - label], scale, margin)
        expected.append([slope_p, slope_n] if label == 0 else [slope_n, slope_p])
    np.testing.assert_allclose(
        gradients(class_circle, labels, cosines, scale=scale, margin=margin),
        expected,
        rtol=1e-5,
        atol=1e-6,
    )


def test_gradient_signs():
    """Raising s_p lowers the loss; raising an s_n above -margin raises it, below -margin
    (a_n = 0, nothing left to push) leaves it unchanged. Keras' gradient instead lowers
    the loss for s_n in (-margin, 0)."""
    rng = np.random.default_rng(12)
    cosines = rng.uniform(-1.0, 1.0, size=(32, 3)).astype("float32")
    labels = rng.integers(0, 3, size=32)
    gradient = gradients(class_circle, labels, cosines)
    is_positive = np.arange(3)[None, :] == labels[:, None]
    assert np.all(gradient[is_positive] < 0)
    assert np.all(gradient[~is_positive & (cosines > -0.25)] > 0)
    assert np.all(gradient[~is_positive & (cosines < -0.25)] == 0)
    between = ~is_positive & (cosines > -0.25) & (cosines < 0)
    assert between.sum() >= 3
    assert np.all(gradients(keras_class_circle, labels, cosines)[between] < 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_inputs_compute_in_float32(dtype):
    labels, cosines = random_cosines(13, 12, 4)
    cosines[0] = [1.0, -1.0, -1.0, 1.0]  # the largest logits, 30 and 126 at scale 32
    labels[0] = 1
    low_precision = tf.Variable(tf.cast(cosines, dtype))
    with tf.GradientTape() as tape:
        losses = class_circle(labels, low_precision)
        loss = ClassCircle()(labels, low_precision)
    gradient = tape.gradient(loss, low_precision)
    assert losses.dtype == tf.float32 and loss.dtype == tf.float32
    assert gradient.dtype == dtype
    assert np.all(np.isfinite(tf.cast(gradient, tf.float32).numpy()))
    rounded = tf.cast(low_precision, tf.float64).numpy()
    np.testing.assert_allclose(losses, oracle_class_circle(labels, rounded), rtol=1e-5)


def test_inside_tf_function_with_unknown_shapes():
    labels, cosines = random_cosines(14, 9, 3)
    expected = oracle_class_circle(labels, cosines)

    @tf.function(
        input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, None], tf.float32)]
    )
    def per_item_loss(labels, cosines):
        return class_circle(labels, cosines)

    np.testing.assert_allclose(per_item_loss(labels.astype("int32"), cosines), expected,
                               rtol=1e-5)
    compiled = tf.function(lambda y, x: class_circle(y, x), jit_compile=True)
    np.testing.assert_allclose(compiled(labels, cosines), expected, rtol=1e-5)
    # Labels are only checked eagerly: in a graph a label without a class costs nothing,
    # and passes a zero gradient, not NaN.
    np.testing.assert_array_equal(
        per_item_loss(np.array([3, -1], "int32"), cosines[:2]), [0.0, 0.0]
    )
    variable = tf.Variable(cosines[:3])
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(per_item_loss(np.array([3, 0, -1], "int32"), variable))
    gradient = tape.gradient(loss, variable).numpy()
    np.testing.assert_array_equal(gradient[[0, 2]], 0.0)
    np.testing.assert_allclose(gradient[1], gradients(class_circle, [0], cosines[1:2])[0],
                               rtol=1e-6)


def test_config_round_trip():
    loss = ClassCircle(scale=64.0, margin=0.1, name="circle")
    config = loss.get_config()
    assert config == {
        "name": "circle",
        "reduction": "sum_over_batch_size",
        "scale": 64.0,
        "margin": 0.1,
    }
    assert ClassCircle.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, ClassCircle)
    assert restored.get_config() == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(scale=0.0), r"scale must be positive. Received: scale=0.0"),
        (dict(scale=-32.0), r"scale must be positive"),
        (dict(margin=-0.1), r"margin must be in \[0, 1\). Received: margin=-0.1"),
        (dict(margin=1.0), r"margin must be in \[0, 1\)"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassCircle(**kwargs)
    with pytest.raises(ValueError, match=message):
        class_circle([0], [[1.0, 0.0]], **kwargs)


@pytest.mark.parametrize("bad_label", [3, -1])
def test_labels_outside_the_classes_are_refused_eagerly(bad_label):
    with pytest.raises(ValueError, match=rf"labels must be in \[0, 3\).*\[{bad_label}\]"):
        class_circle([0, bad_label], np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match="labels must be in"):
        ClassCircle()([0, bad_label], np.zeros((2, 3), "float32"))


def test_a_single_class_is_refused():
    with pytest.raises(ValueError, match=r"at least 2 classes.*\(2, 1\)"):
        class_circle([0, 0], [[0.5], [1.0]])


def test_fit_decreases_loss_and_model_saves(tmp_path):
    """tanh scores stand in for a cosine classifier: any values in [-1, 1] will do."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=48)
    inputs = (rng.normal(size=(3, 6))[labels] + 0.5 * rng.normal(size=(48, 6))).astype("float32")
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="tanh")])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=ClassCircle())
    history = model.fit(inputs, labels, batch_size=16, epochs=5, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]

    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.loss, ClassCircle)
    assert restored.loss.get_config() == model.loss.get_config()
