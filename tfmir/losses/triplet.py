"""Batch-hard triplet loss (Hermans et al., 2017), and the pair search it shares with deep kNN."""

import keras
from keras import ops

# L_p distances whose p-th power is at or below this count as zero: the root has an infinite
# slope at 0, and a pair of identical embeddings must give a zero distance with a zero (not
# NaN) gradient.
_TINY_POWERED_DISTANCE = 1e-12


def batch_hard_triplet(
    labels,
    embeddings,
    ref_labels=None,
    ref_embeddings=None,
    *,
    margin=0.2,
    p=2,
):
    """Per-anchor batch-hard triplet loss (Hermans et al., 2017), shape (N,).

    Every row of `embeddings` is an anchor a_i. Against the reference set (the batch, or
    `ref_embeddings`) it takes its *furthest* same-label item y and its *nearest*
    other-label item z under the L_p distance d, and pays the hinge

        loss_i = [d(a_i, y) + margin - d(a_i, z)]_+ .

    This is the "traditional triplet loss" that deep kNN (Zhuang et al., MICCAI 2020,
    Sec. 2.3) compares against: "traditionally, triplets are formed by the furthest
    within-class pairs and the nearest cross-class pairs", which asks every pair of a class
    to be closer than any cross-class pair. Batch-hard is the form of that rule that needs
    only the batch's embeddings, so both losses train on the same stratified batches and
    differ only in which triplets they form (`knn_triplet` takes the *nearest* positives).

    The furthest positive and nearest negative are selected on distances without gradient;
    the selected pairs' distances carry the gradient. Among equal distances the lower
    reference index is selected. An anchor without a positive or without a negative has
    loss 0 (and, like every anchor, counts in the mean of `BatchHardTriplet`).

    Args:
        labels: Integer class labels of the anchors, shape (N,) or (N, 1).
        embeddings: Anchor embeddings, shape (N, D), any float dtype. Used as given (tfmir
            embedders output unit vectors, whose Euclidean distances lie in [0, 2]).
        ref_labels: Labels of the reference set, shape (M,) or (M, 1). `None` (together
            with `ref_embeddings=None`) uses the batch as its own reference and excludes
            each anchor from its own positives by index; an exact duplicate of the anchor
            remains a positive.
        ref_embeddings: Reference embeddings, shape (M, D), e.g. a memory bank. Every pair
            counts, no self-pair is removed.
        margin: The hinge margin. The default 0.2 equals `knn_triplet`'s, so that a
            comparison of the two changes only the triplets.
        p: Order of the L_p distance, at least 1 (Hermans et al. use p = 2).

    Returns:
        float32 tensor of shape (N,), the loss of every anchor, computed in float32 even
        when `embeddings` are float16 or bfloat16.

    Example:

    >>> labels = [0, 0, 1]
    >>> embeddings = [[0.0, 0.0], [0.5, 0.0], [0.0, 0.25]]
    >>> batch_hard_triplet(labels, embeddings, margin=0.25).numpy().round(4)
    array([0.5  , 0.191, 0.   ], dtype=float32)

    Reference:
        Hermans et al., "In Defense of the Triplet Loss for Person Re-Identification",
        https://arxiv.org/abs/1703.07737 (ref. [16] of Zhuang et al., "Deep kNN for Medical
        Image Classification", MICCAI 2020, LNCS 12261, pp. 127-136)
    """
    check_triplet_arguments(margin=margin, p=p)
    distances, positive_mask, negative_mask = labelled_distances(
        labels, embeddings, ref_labels, ref_embeddings, p=p
    )
    furthest_positive, has_positive = select_neighbours(
        distances, positive_mask, 1, furthest=True
    )
    nearest_negative, has_negative = select_neighbours(distances, negative_mask, 1)
    losses = ops.relu(furthest_positive + margin - nearest_negative)
    losses = ops.where(ops.logical_and(has_positive, has_negative), losses, 0.0)
    return losses[:, 0]


def check_triplet_arguments(*, margin, p, **counts):
    """Raises ValueError for a p below 1, a negative margin or a count below 1."""
    if not p >= 1:
        raise ValueError(f"p must be at least 1 (an L_p norm). Received: p={p!r}")
    if not margin >= 0:
        raise ValueError(f"margin must be non-negative. Received: margin={margin!r}")
    for name, count in counts.items():
        if not (isinstance(count, int) and count >= 1):
            raise ValueError(f"{name} must be a positive int. Received: {name}={count!r}")


def labelled_distances(labels, embeddings, ref_labels, ref_embeddings, *, p):
    """L_p distances anchor x reference (N, M) in float32, and the positive / negative masks.

    Without a reference set the batch is its own, and an anchor is removed from its own
    positives by index, not by distance.
    """
    if (ref_labels is None) != (ref_embeddings is None):
        raise ValueError(
            "ref_labels and ref_embeddings must be given together or both be None. "
            f"Received: ref_labels is None={ref_labels is None}, "
            f"ref_embeddings is None={ref_embeddings is None}"
        )
    self_reference = ref_embeddings is None

    embeddings = ops.cast(embeddings, "float32")
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    if self_reference:
        ref_embeddings, ref_labels = embeddings, labels
    else:
        ref_embeddings = ops.cast(ref_embeddings, "float32")
        ref_labels = ops.reshape(ops.cast(ref_labels, "int32"), (-1,))

    distances = pair_distances(embeddings, ref_embeddings, p=p)
    same_label = ops.equal(labels[:, None], ref_labels[None, :])
    positive_mask = same_label
    negative_mask = ops.logical_not(same_label)
    if self_reference:
        not_self = ops.logical_not(ops.eye(ops.shape(distances)[0], dtype="bool"))
        positive_mask = ops.logical_and(positive_mask, not_self)
    return distances, positive_mask, negative_mask


def pair_distances(embeddings, ref_embeddings, *, p=2):
    """(N, M) L_p distances, exactly 0 with a zero gradient for identical rows."""
    # Differences rather than the |a|^2 + |b|^2 - 2ab expansion: no cancellation near zero,
    # so duplicates are at distance exactly 0 and equal distances tie exactly. The cost is an
    # (N, M, D) intermediate.
    differences = embeddings[:, None, :] - ref_embeddings[None, :, :]
    if p == 1:
        return ops.sum(ops.abs(differences), axis=-1)
    if p == 2:
        powered = ops.sum(ops.square(differences), axis=-1)
    else:
        powered = ops.sum(ops.power(ops.abs(differences), p), axis=-1)
    nonzero = powered > _TINY_POWERED_DISTANCE
    # The inner where keeps the root's gradient finite where the outer one discards it.
    safe = ops.where(nonzero, powered, 1.0)
    root = ops.sqrt(safe) if p == 2 else ops.power(safe, 1.0 / p)
    return ops.where(nonzero, root, 0.0)


def select_neighbours(distances, mask, k, *, furthest=False):
    """Per row, the k nearest (or furthest) masked entries: their distances and validity.

    Returns two (N, k) tensors: the selected distances, which keep their gradient, and
    whether each selection is a real masked entry (a row with fewer than k masked entries
    fills the rest with invalid ones). The search reads distances without gradient; among
    equal distances the lower column index comes first, as in `top_k`.
    """
    detached = ops.stop_gradient(distances)
    # Higher score = selected first; the scores carry no gradient, so infinities are safe.
    scores = detached if furthest else -detached
    scores = ops.where(mask, scores, float("-inf"))
    # k padding columns: top_k needs k <= width even when the reference set is smaller.
    padding = [[0, 0], [0, k]]
    scores = ops.pad(scores, padding, constant_values=float("-inf"))
    _, indices = ops.top_k(scores, k)
    selected = ops.take_along_axis(ops.pad(distances, padding), indices, axis=1)
    valid = ops.take_along_axis(ops.pad(ops.cast(mask, "float32"), padding), indices, axis=1)
    valid = valid > 0.5
    return ops.where(valid, selected, 0.0), valid


@keras.saving.register_keras_serializable(package="tfmir")
class BatchHardTriplet(keras.losses.Loss):
    """Batch-hard triplet loss between integer labels and embeddings.

    `y_true` holds the labels (N,) or (N, 1) and `y_pred` the embeddings (N, D); the batch
    is its own reference set. The default reduction `"sum_over_batch_size"` averages over
    all N anchors, those without a positive or negative included with loss 0. See
    `batch_hard_triplet` for the formula.

    Args:
        margin: The hinge margin.
        p: Order of the L_p distance, at least 1.
        reduction: Keras loss reduction.
        name: Name of the loss.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8)])
    >>> model.compile(optimizer="adam", loss=BatchHardTriplet())

    Reference:
        Hermans et al., "In Defense of the Triplet Loss for Person Re-Identification",
        https://arxiv.org/abs/1703.07737
    """

    def __init__(
        self,
        margin=0.2,
        p=2,
        reduction="sum_over_batch_size",
        name="batch_hard_triplet",
    ):
        check_triplet_arguments(margin=margin, p=p)
        # float32 on purpose: Keras casts y_true to the loss dtype, and labels
        # must stay exact under a mixed-precision policy.
        super().__init__(name=name, reduction=reduction, dtype="float32")
        self.margin = margin
        self.p = p

    def call(self, y_true, y_pred):
        return batch_hard_triplet(y_true, y_pred, margin=self.margin, p=self.p)

    def get_config(self):
        config = super().get_config()
        config.update(margin=self.margin, p=self.p)
        return config
