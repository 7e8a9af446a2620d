"""Multi-Similarity loss with its hard-pair mining (Wang et al., CVPR 2019)."""

import keras
from keras import ops

# Stands in for "no element" in masked reductions. Finite on purpose: an infinity
# multiplied by a zero gradient is NaN, a large finite value is not.
_LARGE = 1e9


def multi_similarity(
    labels,
    embeddings,
    ref_labels=None,
    ref_embeddings=None,
    *,
    alpha=2.0,
    beta=50.0,
    base=0.5,
    epsilon=0.1,
    mining=True,
):
    """Per-anchor Multi-Similarity loss (Wang et al., CVPR 2019, arXiv:1904.06627), shape (N,).

    Every row of `embeddings` is an anchor compared, by cosine similarity S, with
    every row of the reference set. Same-label references are its positives P,
    other-label references its negatives N. The loss of anchor i is

        (1/alpha) log(1 + sum_{j in P_i} exp(-alpha (S_ij - base)))
      + (1/beta)  log(1 + sum_{j in N_i} exp( beta (S_ij - base)))

    With `mining=True` only informative pairs enter the sums: a negative j is kept
    when S_ij + epsilon > min_{k in P_i} S_ik, a positive j when
    S_ij - epsilon < max_{k in N_i} S_ik. An empty sum contributes log(1) = 0.
    Consequently, with mining an anchor that has no positives keeps no negatives
    either (and vice versa), so its loss is 0 — the same anchors the authors'
    code skips. Without mining such an anchor keeps the term of the pairs it has.

    Args:
        labels: Integer class labels of the anchors, shape (N,) or (N, 1).
        embeddings: Anchor embeddings, shape (N, D), any float dtype. They are
            L2-normalised here, so they need not be unit length.
        ref_labels: Labels of the reference set, shape (M,) or (M, 1). `None`
            (together with `ref_embeddings=None`) uses the batch as its own
            reference and excludes each anchor's pair with itself; other items
            with the same label remain positives.
        ref_embeddings: Reference embeddings, shape (M, D), e.g. a memory bank.
            Every pair counts, no self-pair is removed.
        alpha: Scale of the positive term.
        beta: Scale of the negative term.
        base: Similarity margin lambda.
        epsilon: Mining margin.
        mining: Whether to keep only the mined pairs (else all pairs).

    Returns:
        float32 tensor of shape (N,), the loss of every anchor. It is computed in
        float32 even when `embeddings` are float16 or bfloat16.

    Example:

    >>> labels = [0, 0, 1]
    >>> embeddings = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
    >>> multi_similarity(labels, embeddings).shape
    TensorShape([3])

    Reference:
        Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep
        Metric Learning", CVPR 2019, https://arxiv.org/abs/1904.06627
    """
    if (ref_labels is None) != (ref_embeddings is None):
        raise ValueError(
            "ref_labels and ref_embeddings must be given together or both be None. "
            f"Received: ref_labels is None={ref_labels is None}, "
            f"ref_embeddings is None={ref_embeddings is None}"
        )
    self_reference = ref_embeddings is None

    embeddings = ops.normalize(ops.cast(embeddings, "float32"), axis=-1)
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    if self_reference:
        ref_embeddings, ref_labels = embeddings, labels
    else:
        ref_embeddings = ops.normalize(ops.cast(ref_embeddings, "float32"), axis=-1)
        ref_labels = ops.reshape(ops.cast(ref_labels, "int32"), (-1,))

    similarity = ops.matmul(embeddings, ops.transpose(ref_embeddings))
    same_label = ops.equal(labels[:, None], ref_labels[None, :])
    negative_mask = ops.logical_not(same_label)
    positive_mask = same_label
    if self_reference:
        num_anchors = ops.shape(similarity)[0]
        not_self = ops.logical_not(ops.eye(num_anchors, dtype="bool"))
        positive_mask = ops.logical_and(positive_mask, not_self)

    if mining:
        # Thresholds are selections, not part of the objective: stop their gradient.
        detached = ops.stop_gradient(similarity)
        hardest_positive = ops.min(
            ops.where(positive_mask, detached, _LARGE), axis=1, keepdims=True
        )
        hardest_negative = ops.max(
            ops.where(negative_mask, detached, -_LARGE), axis=1, keepdims=True
        )
        negative_mask = ops.logical_and(negative_mask, detached + epsilon > hardest_positive)
        positive_mask = ops.logical_and(positive_mask, detached - epsilon < hardest_negative)

    positive_term = _log1p_sum_exp(-alpha * (similarity - base), positive_mask) / alpha
    negative_term = _log1p_sum_exp(beta * (similarity - base), negative_mask) / beta
    return positive_term + negative_term


def _log1p_sum_exp(logits, mask):
    """Row-wise log(1 + sum_{mask} exp(logits)), stable, 0 for an empty row."""
    logits = ops.where(mask, logits, -_LARGE)
    zeros = ops.zeros_like(logits[:, :1])
    return ops.logsumexp(ops.concatenate([zeros, logits], axis=1), axis=1)


@keras.saving.register_keras_serializable(package="tfmir")
class MultiSimilarity(keras.losses.Loss):
    """Multi-Similarity loss between integer labels and embeddings.

    `y_true` holds the labels (N,) or (N, 1) and `y_pred` the embeddings (N, D);
    the batch is its own reference set. The default reduction
    `"sum_over_batch_size"` averages over anchors, as in the paper. See
    `multi_similarity` for the formula and the mining rule.

    Args:
        alpha: Scale of the positive term.
        beta: Scale of the negative term.
        base: Similarity margin lambda.
        epsilon: Mining margin.
        mining: Whether to keep only the mined pairs.
        reduction: Keras loss reduction.
        name: Name of the loss.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8)])
    >>> model.compile(optimizer="adam", loss=MultiSimilarity())

    Reference:
        Wang et al., "Multi-Similarity Loss with General Pair Weighting for Deep
        Metric Learning", CVPR 2019, https://arxiv.org/abs/1904.06627
    """

    def __init__(
        self,
        alpha=2.0,
        beta=50.0,
        base=0.5,
        epsilon=0.1,
        mining=True,
        reduction="sum_over_batch_size",
        name="multi_similarity",
    ):
        # float32 on purpose: Keras casts y_true to the loss dtype, and labels
        # must stay exact under a mixed-precision policy.
        super().__init__(name=name, reduction=reduction, dtype="float32")
        self.alpha = alpha
        self.beta = beta
        self.base = base
        self.epsilon = epsilon
        self.mining = mining

    def call(self, y_true, y_pred):
        return multi_similarity(
            y_true,
            y_pred,
            alpha=self.alpha,
            beta=self.beta,
            base=self.base,
            epsilon=self.epsilon,
            mining=self.mining,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            alpha=self.alpha,
            beta=self.beta,
            base=self.base,
            epsilon=self.epsilon,
            mining=self.mining,
        )
        return config
