"""Batch-hard triplet loss against an explicit loop oracle, its gradient, and against deep kNN."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmir.losses import BatchHardTriplet
from tfmir.losses import batch_hard_triplet
from tfmir.losses import knn_triplet
from tfmir.tasks.metric_learning import make_loss


def lp_distance(a, b, p):
    return sum(abs(float(x) - float(y)) ** p for x, y in zip(a, b)) ** (1.0 / p)


def oracle_hardest(labels, embeddings, ref_labels=None, ref_embeddings=None, p=2):
    """Per anchor: (furthest positive index or None, nearest negative index or None).

    Equal distances go lower index first; the anchor itself is skipped by index when the
    batch is its own reference set.
    """
    labels = np.ravel(labels)
    self_reference = ref_embeddings is None
    if self_reference:
        ref_labels, ref_embeddings = labels, embeddings
    ref_labels = np.ravel(ref_labels)
    selection = []
    for i, anchor in enumerate(embeddings):
        furthest, nearest = None, None
        for j, reference in enumerate(ref_embeddings):
            if self_reference and i == j:
                continue
            distance = lp_distance(anchor, reference, p)
            if int(ref_labels[j]) == int(labels[i]):
                if furthest is None or distance > furthest[0]:
                    furthest = (distance, j)
            elif nearest is None or distance < nearest[0]:
                nearest = (distance, j)
        selection.append((
            None if furthest is None else furthest[1],
            None if nearest is None else nearest[1],
        ))
    return selection


def oracle_losses(embeddings, ref_embeddings, selection, margin=0.2, p=2):
    if ref_embeddings is None:
        ref_embeddings = embeddings
    losses = []
    for anchor, (positive, negative) in zip(embeddings, selection):
        if positive is None or negative is None:
            losses.append(0.0)
            continue
        positive_distance = lp_distance(anchor, ref_embeddings[positive], p)
        negative_distance = lp_distance(anchor, ref_embeddings[negative], p)
        losses.append(max(0.0, positive_distance + margin - negative_distance))
    return losses


def oracle_batch_hard_triplet(
    labels, embeddings, ref_labels=None, ref_embeddings=None, margin=0.2, p=2
):
    selection = oracle_hardest(labels, embeddings, ref_labels, ref_embeddings, p)
    return oracle_losses(embeddings, ref_embeddings, selection, margin, p)


def random_batch(seed, num_items=12, num_classes=3, dim=4):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), num_items // num_classes)
    rng.shuffle(labels)
    centres = rng.normal(size=(num_classes, dim))
    embeddings = centres[labels] + 0.9 * rng.normal(size=(num_items, dim))
    return labels, embeddings.astype("float32")


def test_hand_computed_one_dimensional():
    """Points on a line, margin=0.5: x = 0, 1, 3 (class 0) and 2 (class 1).

    anchor 0: furthest positive 3 (d=3), nearest negative d=2: [3 + 0.5 - 2]_+ = 1.5
    anchor 1: furthest positive 3 (d=2), nearest negative d=1: [2 + 0.5 - 1]_+ = 1.5
    anchor 3: furthest positive 0 (d=3), nearest negative d=1: [3 + 0.5 - 1]_+ = 2.5
    anchor 2: no positive: 0
    """
    labels = [0, 0, 1, 0]
    embeddings = [[0.0], [1.0], [2.0], [3.0]]
    np.testing.assert_allclose(
        batch_hard_triplet(labels, embeddings, margin=0.5), [1.5, 1.5, 0.0, 2.5]
    )


def test_differs_from_knn_triplet_where_nearest_and_furthest_positive_differ():
    """Anchor 0 at 0 (class 0), positives at 0.1 and 1.0, a negative at 0.5; margin 0.2.

    Deep kNN (K = M = 1) takes the nearest positive: [0.1 + 0.2 - 0.5]_+ = 0.
    Batch-hard takes the furthest:                   [1.0 + 0.2 - 0.5]_+ = 0.7.
    """
    labels = [0, 0, 0, 1]
    embeddings = np.array([[0.0], [0.1], [1.0], [0.5]], "float32")
    hard = batch_hard_triplet(labels, embeddings).numpy()
    knn = knn_triplet(labels, embeddings, num_positives=1, num_negatives=1).numpy()
    np.testing.assert_allclose(hard[0], 0.7, rtol=1e-6)
    assert knn[0] == 0.0
    np.testing.assert_allclose(hard, oracle_batch_hard_triplet(labels, embeddings), atol=1e-6)


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_oracle(seed, p):
    labels, embeddings = random_batch(seed)
    np.testing.assert_allclose(
        batch_hard_triplet(labels, embeddings, p=p),
        oracle_batch_hard_triplet(labels, embeddings, p=p),
        rtol=1e-4,
        atol=1e-6,
    )


def test_other_margin_matches_loop_oracle():
    labels, embeddings = random_batch(3, num_items=10, num_classes=2)
    np.testing.assert_allclose(
        batch_hard_triplet(labels, embeddings, margin=1.5),
        oracle_batch_hard_triplet(labels, embeddings, margin=1.5),
        rtol=1e-4,
        atol=1e-6,
    )


def test_singleton_class_has_zero_loss():
    _, embeddings = random_batch(4, num_items=9)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 3])  # classes 2 and 3 are singletons
    losses = batch_hard_triplet(labels, embeddings).numpy()
    np.testing.assert_allclose(
        losses, oracle_batch_hard_triplet(labels, embeddings), rtol=1e-4, atol=1e-6
    )
    np.testing.assert_array_equal(losses[7:], 0.0)
    np.testing.assert_array_equal(batch_hard_triplet(np.zeros(9, "int32"), embeddings), 0.0)


def test_duplicate_embeddings_and_ties():
    labels, embeddings = random_batch(5)
    embeddings[3] = embeddings[7]
    embeddings[5] = embeddings[7]
    embeddings[8] = embeddings[0]
    np.testing.assert_allclose(
        batch_hard_triplet(labels, embeddings),
        oracle_batch_hard_triplet(labels, embeddings),
        rtol=1e-4,
        atol=1e-6,
    )


def test_ties_select_the_lower_reference_index():
    """Anchor (0, 0), class 0. References 1 and 2 are one point (2, 0) of class 0, 3 and 4
    another (0, 1) of class 1; reference 0 = (1, 0) is a nearer positive.

    loss = [2 + 0.2 - 1]_+ = 1.2. The gradient goes to the lower index of each tie:
    d loss / d r1 = (1, 0), d loss / d r3 = (0, -1); references 0, 2 and 4 get none.
    """
    anchors = tf.constant([[0.0, 0.0]])
    references = tf.Variable([[1.0, 0.0], [2.0, 0.0], [2.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    with tf.GradientTape() as tape:
        loss = batch_hard_triplet([0], anchors, [0, 0, 0, 1, 1], references)
    np.testing.assert_allclose(loss, [1.2], rtol=1e-6)
    np.testing.assert_allclose(
        tape.gradient(loss, references),
        [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, -1.0], [0.0, 0.0]],
        atol=1e-7,
    )


def test_reference_set_other_than_the_batch():
    labels, embeddings = random_batch(6, num_items=6)
    ref_labels, ref_embeddings = random_batch(7, num_items=9)
    ref_labels[0], ref_embeddings[0] = labels[0], embeddings[0]
    for p in (1, 2):
        np.testing.assert_allclose(
            batch_hard_triplet(labels, embeddings, ref_labels, ref_embeddings, p=p),
            oracle_batch_hard_triplet(labels, embeddings, ref_labels, ref_embeddings, p=p),
            rtol=1e-4,
            atol=1e-6,
        )


def test_gradient_equals_that_of_the_selected_pairs():
    """The tape gradient is the finite-difference gradient with the hardest pairs frozen."""
    labels, embeddings = random_batch(8, num_items=9, num_classes=3, dim=3)
    selection = oracle_hardest(labels, embeddings)
    variable = tf.Variable(embeddings)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(batch_hard_triplet(labels, variable))
    gradient = tape.gradient(loss, variable).numpy()

    h = 1e-6
    expected = np.zeros(embeddings.shape)
    for index in np.ndindex(embeddings.shape):
        plus, minus = embeddings.astype("float64"), embeddings.astype("float64")
        plus[index] += h
        minus[index] -= h
        expected[index] = (
            np.mean(oracle_losses(plus, None, selection))
            - np.mean(oracle_losses(minus, None, selection))
        ) / (2 * h)
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(gradient, expected, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_gradient_is_finite_with_duplicate_embeddings(p):
    labels = np.array([0, 0, 0, 1, 1, 2])
    embeddings = np.array(
        [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], "float32"
    )
    variable = tf.Variable(embeddings)
    with tf.GradientTape() as tape:
        losses = batch_hard_triplet(labels, variable, p=p)
        loss = tf.reduce_mean(losses)
    gradient = tape.gradient(loss, variable).numpy()
    assert float(loss) > 0.0
    assert np.all(np.isfinite(gradient))
    np.testing.assert_allclose(
        losses, oracle_batch_hard_triplet(labels, embeddings, p=p), atol=1e-6
    )


@pytest.mark.parametrize("label_shape", [(-1,), (-1, 1)])
@pytest.mark.parametrize("label_dtype", ["int32", "int64", "uint8"])
def test_label_shapes_and_dtypes(label_shape, label_dtype):
    labels, embeddings = random_batch(11)
    losses = batch_hard_triplet(labels.astype(label_dtype).reshape(label_shape), embeddings)
    assert tuple(losses.shape) == (12,)
    np.testing.assert_allclose(
        losses, oracle_batch_hard_triplet(labels, embeddings), rtol=1e-4, atol=1e-6
    )


def test_low_precision_inputs_compute_in_float32():
    labels, embeddings = random_batch(12)
    low_precision = tf.cast(embeddings, "bfloat16")
    losses = batch_hard_triplet(labels, low_precision)
    assert losses.dtype == tf.float32
    rounded = tf.cast(low_precision, tf.float64).numpy()
    np.testing.assert_allclose(
        losses, oracle_batch_hard_triplet(labels, rounded), rtol=1e-4, atol=1e-6
    )


def test_inside_tf_function_with_unknown_batch_size():
    labels, embeddings = random_batch(13)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, None], tf.float32),
        ]
    )
    def per_anchor_loss(labels, embeddings):
        return batch_hard_triplet(labels, embeddings)

    expected = oracle_batch_hard_triplet(labels, embeddings)
    np.testing.assert_allclose(
        per_anchor_loss(labels.astype("int32"), embeddings), expected, rtol=1e-4, atol=1e-6
    )
    np.testing.assert_allclose(per_anchor_loss([0], embeddings[:1]), [0.0])
    compiled = tf.function(lambda y, x: batch_hard_triplet(y, x), jit_compile=True)
    np.testing.assert_allclose(compiled(labels, embeddings), expected, rtol=1e-4, atol=1e-6)


def test_loss_class_mean_counts_every_anchor():
    labels, embeddings = random_batch(14)
    labels[0] = 9
    loss = BatchHardTriplet()
    assert loss.name == "batch_hard_triplet"
    assert loss.reduction == "sum_over_batch_size"
    per_anchor = oracle_batch_hard_triplet(labels, embeddings)
    expected = sum(per_anchor) / len(per_anchor)
    np.testing.assert_allclose(float(loss(labels, embeddings)), expected, rtol=1e-4)
    np.testing.assert_allclose(
        float(loss(labels[:, None].astype("float32"), embeddings)), expected, rtol=1e-4
    )
    np.testing.assert_allclose(
        BatchHardTriplet(reduction=None)(labels, embeddings), per_anchor, rtol=1e-4, atol=1e-6
    )


def test_config_round_trip():
    loss = BatchHardTriplet(margin=0.3, p=1, name="hard")
    config = loss.get_config()
    assert config == {"name": "hard", "reduction": "sum_over_batch_size", "margin": 0.3, "p": 1}
    assert BatchHardTriplet.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, BatchHardTriplet)
    assert restored.get_config() == config


def test_make_loss_builds_it_from_a_config():
    loss = make_loss({"name": "batch_hard_triplet", "margin": 0.3})
    assert isinstance(loss, BatchHardTriplet)
    assert (loss.margin, loss.p) == (0.3, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(p=0.5), "p must be at least 1"), (dict(margin=-0.1), "margin must be non-negative")],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BatchHardTriplet(**kwargs)
    with pytest.raises(ValueError, match=message):
        batch_hard_triplet([0, 1], [[1.0, 0.0], [0.0, 1.0]], **kwargs)


def test_mismatched_reference_arguments():
    with pytest.raises(ValueError, match="ref_labels and ref_embeddings"):
        batch_hard_triplet([0, 1], [[1.0, 0.0], [0.0, 1.0]], ref_embeddings=[[1.0, 0.0]])


def test_fit_decreases_loss_and_model_saves(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 16)
    inputs = rng.normal(size=(4, 8))[labels] + 0.8 * rng.normal(size=(64, 8))
    order = rng.permutation(64)
    inputs, labels = inputs[order].astype("float32"), labels[order]
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16)])
    model.compile(
        optimizer=keras.optimizers.Adam(0.05), loss=BatchHardTriplet(), jit_compile=False
    )
    history = model.fit(inputs, labels, batch_size=64, epochs=5, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]

    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.loss, BatchHardTriplet)
    assert restored.loss.get_config() == model.loss.get_config()
    np.testing.assert_allclose(
        restored.predict(inputs, verbose=0), model.predict(inputs, verbose=0)
    )
