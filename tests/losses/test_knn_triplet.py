"""Deep-kNN loss against an explicit double-loop oracle, its gradient, and inside Keras training."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfmir.losses import KNNTriplet
from tfmir.losses import knn_triplet
from tfmir.tasks.metric_learning import make_loss


def lp_distance(a, b, p):
    return sum(abs(float(x) - float(y)) ** p for x, y in zip(a, b)) ** (1.0 / p)


def oracle_selection(
    labels, embeddings, ref_labels=None, ref_embeddings=None, num_positives=5, num_negatives=5,
    p=2,
):
    """Per anchor, the reference indices of its K nearest positives and M nearest negatives.

    Candidates are sorted by (distance, index): equal distances go lower index first. The
    anchor itself is skipped by index when the batch is its own reference set.
    """
    self_reference = ref_embeddings is None
    if self_reference:
        ref_labels, ref_embeddings = labels, embeddings
    selection = []
    for i, anchor in enumerate(embeddings):
        positives, negatives = [], []
        for j, reference in enumerate(ref_embeddings):
            if self_reference and i == j:
                continue
            candidate = (lp_distance(anchor, reference, p), j)
            if int(ref_labels[j]) == int(labels[i]):
                positives.append(candidate)
            else:
                negatives.append(candidate)
        selection.append((
            [j for _, j in sorted(positives)[:num_positives]],
            [j for _, j in sorted(negatives)[:num_negatives]],
        ))
    return selection


def oracle_losses(embeddings, ref_embeddings, selection, margin=0.2, p=2):
    """Eq. 2-3 per anchor for a given selection: the mean hinge over the K' x M' pairs, else 0."""
    if ref_embeddings is None:
        ref_embeddings = embeddings
    losses = []
    for anchor, (positives, negatives) in zip(embeddings, selection):
        hinges = []
        for k in positives:
            for m in negatives:
                positive_distance = lp_distance(anchor, ref_embeddings[k], p)
                negative_distance = lp_distance(anchor, ref_embeddings[m], p)
                hinges.append(max(0.0, positive_distance + margin - negative_distance))
        losses.append(sum(hinges) / len(hinges) if hinges else 0.0)
    return losses


def oracle_knn_triplet(
    labels, embeddings, ref_labels=None, ref_embeddings=None, num_positives=5, num_negatives=5,
    margin=0.2, p=2,
):
    labels = np.ravel(labels)
    if ref_labels is not None:
        ref_labels = np.ravel(ref_labels)
    selection = oracle_selection(
        labels, embeddings, ref_labels, ref_embeddings, num_positives, num_negatives, p
    )
    return oracle_losses(embeddings, ref_embeddings, selection, margin, p)


def random_batch(seed, num_items=12, num_classes=3, dim=4):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), num_items // num_classes)
    rng.shuffle(labels)
    # Class centres plus noise: overlapping classes, so many hinges are active.
    centres = rng.normal(size=(num_classes, dim))
    embeddings = centres[labels] + 0.9 * rng.normal(size=(num_items, dim))
    return labels, embeddings.astype("float32")


def test_hand_computed_one_dimensional():
    """Points on a line, K=2, M=1, margin=0.5, p=2 (= |x - y|).

    x = 0, 1, 3 (class 0) and 2 (class 1).
      anchor 0: positives 1 (d=1), 3 (d=3); negative 2 (d=2):
                ([1 + 0.5 - 2]_+ + [3 + 0.5 - 2]_+) / 2 = (0 + 1.5) / 2 = 0.75
      anchor 1: positives 0 (d=1), 3 (d=2); negative d=1: (0.5 + 1.5) / 2 = 1.0
      anchor 3: positives 1 (d=2), 0 (d=3); negative d=1: (1.5 + 2.5) / 2 = 2.0
      anchor 2: no positive: 0
    """
    labels = [0, 0, 1, 0]
    embeddings = [[0.0], [1.0], [2.0], [3.0]]
    np.testing.assert_allclose(
        knn_triplet(labels, embeddings, num_positives=2, num_negatives=1, margin=0.5),
        [0.75, 1.0, 0.0, 2.0],
    )


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("num_positives, num_negatives", [(5, 5), (2, 3), (1, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_oracle(seed, num_positives, num_negatives, p):
    # 4 items per class: with K=5 every anchor has only 3 positives.
    labels, embeddings = random_batch(seed)
    kwargs = dict(num_positives=num_positives, num_negatives=num_negatives, p=p)
    np.testing.assert_allclose(
        knn_triplet(labels, embeddings, **kwargs),
        oracle_knn_triplet(labels, embeddings, **kwargs),
        rtol=1e-4,
        atol=1e-6,
    )


def test_other_margin_matches_loop_oracle():
    labels, embeddings = random_batch(2, num_items=15, num_classes=3)
    kwargs = dict(num_positives=3, num_negatives=4, margin=1.3)
    np.testing.assert_allclose(
        knn_triplet(labels, embeddings, **kwargs),
        oracle_knn_triplet(labels, embeddings, **kwargs),
        rtol=1e-4,
        atol=1e-6,
    )


def test_small_and_singleton_classes_use_the_pairs_that_exist():
    _, embeddings = random_batch(3, num_items=12)
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3])  # class 2: 2 members, 3: singleton
    losses = knn_triplet(labels, embeddings).numpy()
    expected = oracle_knn_triplet(labels, embeddings)
    np.testing.assert_allclose(losses, expected, rtol=1e-4, atol=1e-6)
    assert losses[11] == 0.0  # no positive at all

    # Anchor 9 has one positive (item 10) and 10 negatives, so K' = 1, M' = 5: its loss is
    # the mean of 5 hinges against its 5 nearest negatives.
    distances = np.linalg.norm(embeddings[9] - embeddings, axis=1).astype("float64")
    negatives = np.sort(distances[labels != 2])[:5]
    by_hand = np.mean(np.maximum(distances[10] + 0.2 - negatives, 0.0))
    np.testing.assert_allclose(losses[9], by_hand, rtol=1e-5)


def test_single_class_batch_has_zero_loss():
    embeddings = np.random.default_rng(4).normal(size=(6, 3)).astype("float32")
    np.testing.assert_array_equal(knn_triplet(np.zeros(6, "int32"), embeddings), np.zeros(6))


def test_duplicate_of_the_anchor_is_a_positive_at_distance_zero():
    """Items 0 and 1 are the same point, class 0; item 2 (class 0) at 1, item 3 (class 1) at 0.5.

    K=1, M=1, margin=0.2. Anchor 0 excludes itself by index, not by distance, so its nearest
    positive is its duplicate 1 at distance 0: [0 + 0.2 - 0.5]_+ = 0. Had the duplicate been
    dropped with the anchor, the positive would be item 2: [1 + 0.2 - 0.5]_+ = 0.7.
    """
    labels = [0, 0, 0, 1]
    embeddings = [[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.5]]
    losses = knn_triplet(labels, embeddings, num_positives=1, num_negatives=1).numpy()
    assert losses[0] == 0.0 and losses[1] == 0.0
    np.testing.assert_allclose(
        losses, oracle_knn_triplet(labels, embeddings, num_positives=1, num_negatives=1),
        atol=1e-6,
    )


def test_ties_match_oracle_with_duplicate_embeddings():
    labels, embeddings = random_batch(5, num_items=12)
    embeddings[3] = embeddings[7]  # duplicates inside and across classes make exact ties
    embeddings[5] = embeddings[7]
    embeddings[8] = embeddings[0]
    for kwargs in [dict(num_positives=1, num_negatives=1), dict(num_positives=2, num_negatives=2)]:
        np.testing.assert_allclose(
            knn_triplet(labels, embeddings, **kwargs),
            oracle_knn_triplet(labels, embeddings, **kwargs),
            rtol=1e-4,
            atol=1e-6,
        )


def test_ties_select_the_lower_reference_index():
    """Anchor (0, 0), class 0. References 1 and 2 are one point (1, 0) of class 0, 3 and 4
    another (0, 1) of class 1; reference 0 = (2, 0) is a further positive.

    K = M = 1: loss = [1 + 0.2 - 1]_+ = 0.2 whichever of a tie is taken. The gradient goes
    to the lower index of each tie: d loss / d r1 = (r1 - a) / |r1 - a| = (1, 0) and
    d loss / d r3 = -(r3 - a) / |r3 - a| = (0, -1); references 0, 2 and 4 get none.
    """
    anchors = tf.constant([[0.0, 0.0]])
    references = tf.Variable([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    with tf.GradientTape() as tape:
        loss = knn_triplet(
            [0], anchors, [0, 0, 0, 1, 1], references, num_positives=1, num_negatives=1
        )
    np.testing.assert_allclose(loss, [0.2], rtol=1e-6)
    np.testing.assert_allclose(
        tape.gradient(loss, references),
        [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, -1.0], [0.0, 0.0]],
        atol=1e-7,
    )


def test_reference_set_other_than_the_batch():
    labels, embeddings = random_batch(6, num_items=6)
    ref_labels, ref_embeddings = random_batch(7, num_items=9)
    # A copy of anchor 0 in the bank is a real pair: a positive at distance 0.
    ref_labels[0], ref_embeddings[0] = labels[0], embeddings[0]
    for kwargs in [dict(), dict(num_positives=2, num_negatives=3, p=1)]:
        np.testing.assert_allclose(
            knn_triplet(labels, embeddings, ref_labels, ref_embeddings, **kwargs),
            oracle_knn_triplet(labels, embeddings, ref_labels, ref_embeddings, **kwargs),
            rtol=1e-4,
            atol=1e-6,
        )


def frozen_selection_gradient(selection, embeddings, ref_embeddings=None, h=1e-6):
    """Central differences of the mean oracle loss with the neighbours held fixed.

    Returns one gradient per array: the anchors', and the references' when they are given.
    """
    arrays = [embeddings.astype("float64")]
    if ref_embeddings is not None:
        arrays.append(ref_embeddings.astype("float64"))

    def mean_loss(arrays):
        references = arrays[1] if len(arrays) > 1 else None
        return np.mean(oracle_losses(arrays[0], references, selection))

    gradients = []
    for which, array in enumerate(arrays):
        gradient = np.zeros_like(array)
        for index in np.ndindex(array.shape):
            moved = [a.copy() for a in arrays]
            moved[which][index] += h
            plus = mean_loss(moved)
            moved[which][index] -= 2 * h
            gradient[index] = (plus - mean_loss(moved)) / (2 * h)
        gradients.append(gradient)
    return gradients


def test_gradient_equals_that_of_the_selected_pairs():
    """The tape gradient is the finite-difference gradient with the selection frozen."""
    labels, embeddings = random_batch(8, num_items=9, num_classes=3, dim=3)
    kwargs = dict(num_positives=2, num_negatives=2)
    selection = oracle_selection(labels, embeddings, **kwargs)
    variable = tf.Variable(embeddings)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(knn_triplet(labels, variable, **kwargs))
    (expected,) = frozen_selection_gradient(selection, embeddings)
    gradient = tape.gradient(loss, variable).numpy()
    assert np.abs(expected).max() > 1e-3
    np.testing.assert_allclose(gradient, expected, rtol=1e-3, atol=1e-5)


def test_unselected_references_get_no_gradient():
    """The search reads every distance, but only the selected pairs carry a gradient."""
    labels, embeddings = random_batch(9, num_items=4, num_classes=2, dim=3)
    ref_labels, ref_embeddings = random_batch(10, num_items=12, num_classes=2, dim=3)
    kwargs = dict(num_positives=1, num_negatives=2)
    selection = oracle_selection(labels, embeddings, ref_labels, ref_embeddings, **kwargs)
    anchors, references = tf.Variable(embeddings), tf.Variable(ref_embeddings)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(knn_triplet(labels, anchors, ref_labels, references, **kwargs))
    anchor_gradient, reference_gradient = tape.gradient(loss, [anchors, references])
    expected = frozen_selection_gradient(selection, embeddings, ref_embeddings)
    np.testing.assert_allclose(anchor_gradient, expected[0], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(reference_gradient, expected[1], rtol=1e-3, atol=1e-5)
    selected = {j for positives, negatives in selection for j in positives + negatives}
    unselected = sorted(set(range(len(ref_labels))) - selected)
    assert unselected, "the fixture should leave some references unselected"
    np.testing.assert_array_equal(reference_gradient.numpy()[unselected], 0.0)


@pytest.mark.parametrize("p", [1, 2, 3])
def test_gradient_is_finite_with_duplicate_embeddings(p):
    labels = np.array([0, 0, 0, 1, 1, 2])
    embeddings = np.array(
        [[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], "float32"
    )  # same-class and cross-class duplicates at distance 0
    variable = tf.Variable(embeddings)
    with tf.GradientTape() as tape:
        losses = knn_triplet(labels, variable, num_positives=2, num_negatives=2, p=p)
        loss = tf.reduce_mean(losses)
    gradient = tape.gradient(loss, variable).numpy()
    assert np.all(np.isfinite(losses.numpy())) and float(loss) > 0.0
    assert np.all(np.isfinite(gradient))
    np.testing.assert_allclose(
        losses,
        oracle_knn_triplet(labels, embeddings, num_positives=2, num_negatives=2, p=p),
        atol=1e-6,
    )


@pytest.mark.parametrize("label_shape", [(-1,), (-1, 1)])
@pytest.mark.parametrize("label_dtype", ["int32", "int64", "uint8"])
def test_label_shapes_and_dtypes(label_shape, label_dtype):
    labels, embeddings = random_batch(11)
    losses = knn_triplet(labels.astype(label_dtype).reshape(label_shape), embeddings)
    assert tuple(losses.shape) == (12,)
    np.testing.assert_allclose(
        losses, oracle_knn_triplet(labels, embeddings), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_inputs_compute_in_float32(dtype):
    labels, embeddings = random_batch(12)
    low_precision = tf.cast(embeddings, dtype)
    losses = knn_triplet(labels, low_precision)
    assert losses.dtype == tf.float32
    rounded = tf.cast(low_precision, tf.float64).numpy()
    np.testing.assert_allclose(
        losses, oracle_knn_triplet(labels, rounded), rtol=1e-4, atol=1e-6
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
        return knn_triplet(labels, embeddings)

    expected = oracle_knn_triplet(labels, embeddings)
    np.testing.assert_allclose(
        per_anchor_loss(labels.astype("int32"), embeddings), expected, rtol=1e-4, atol=1e-6
    )
    # A batch smaller than K + 1: top_k must not ask for more columns than exist.
    np.testing.assert_allclose(
        per_anchor_loss(labels[:3].astype("int32"), embeddings[:3]),
        oracle_knn_triplet(labels[:3], embeddings[:3]),
        rtol=1e-4,
        atol=1e-6,
    )
    compiled = tf.function(lambda y, x: knn_triplet(y, x), jit_compile=True)
    np.testing.assert_allclose(compiled(labels, embeddings), expected, rtol=1e-4, atol=1e-6)


def test_loss_class_mean_counts_every_anchor():
    labels, embeddings = random_batch(14)
    labels[0] = 9  # a singleton: loss 0, still in the denominator
    loss = KNNTriplet()
    assert loss.name == "knn_triplet"
    assert loss.reduction == "sum_over_batch_size"
    per_anchor = oracle_knn_triplet(labels, embeddings)
    assert per_anchor[0] == 0.0
    expected = sum(per_anchor) / len(per_anchor)
    np.testing.assert_allclose(float(loss(labels, embeddings)), expected, rtol=1e-4)
    np.testing.assert_allclose(
        float(loss(labels[:, None].astype("float32"), embeddings)), expected, rtol=1e-4
    )
    unreduced = KNNTriplet(num_positives=2, reduction=None)(labels, embeddings)
    np.testing.assert_allclose(
        unreduced, oracle_knn_triplet(labels, embeddings, num_positives=2), rtol=1e-4, atol=1e-6
    )


def test_config_round_trip():
    loss = KNNTriplet(num_positives=3, num_negatives=4, margin=0.5, p=1, name="knn")
    config = loss.get_config()
    assert config == {
        "name": "knn",
        "reduction": "sum_over_batch_size",
        "num_positives": 3,
        "num_negatives": 4,
        "margin": 0.5,
        "p": 1,
    }
    assert KNNTriplet.from_config(config).get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, KNNTriplet)
    assert restored.get_config() == config


def test_make_loss_builds_it_from_a_config():
    loss = make_loss({"name": "knn_triplet", "num_positives": 3, "margin": 0.1})
    assert isinstance(loss, KNNTriplet)
    assert (loss.num_positives, loss.num_negatives, loss.margin) == (3, 5, 0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_positives=0), "num_positives must be a positive int"),
        (dict(num_negatives=2.5), "num_negatives must be a positive int"),
        (dict(p=0.5), "p must be at least 1"),
        (dict(margin=-0.1), "margin must be non-negative"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KNNTriplet(**kwargs)
    with pytest.raises(ValueError, match=message):
        knn_triplet([0, 1], [[1.0, 0.0], [0.0, 1.0]], **kwargs)


def test_mismatched_reference_arguments():
    with pytest.raises(ValueError, match="ref_labels and ref_embeddings"):
        knn_triplet([0, 1], [[1.0, 0.0], [0.0, 1.0]], ref_labels=[0, 1])


def test_fit_decreases_loss_and_model_saves(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 16)
    inputs = rng.normal(size=(4, 8))[labels] + 0.8 * rng.normal(size=(64, 8))
    order = rng.permutation(64)
    inputs, labels = inputs[order].astype("float32"), labels[order]
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16)])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=KNNTriplet(), jit_compile=False)
    history = model.fit(inputs, labels, batch_size=64, epochs=5, shuffle=False, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]

    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.loss, KNNTriplet)
    assert restored.loss.get_config() == model.loss.get_config()
    np.testing.assert_allclose(
        restored.predict(inputs, verbose=0), model.predict(inputs, verbose=0)
    )
