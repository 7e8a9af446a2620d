"""Deep-kNN triplet loss: every anchor against its K nearest positives and M nearest negatives."""

import keras
from keras import ops

from tfmir.losses.triplet import check_triplet_arguments
from tfmir.losses.triplet import labelled_distances
from tfmir.losses.triplet import select_neighbours


def knn_triplet(
    labels,
    embeddings,
    ref_labels=None,
    ref_embeddings=None,
    *,
    num_positives=5,
    num_negatives=5,
    margin=0.2,
    p=2,
):
    """Per-anchor deep-kNN loss (Zhuang et al., MICCAI 2020, eq. 1-3), shape (N,).

    Every row of `embeddings` is an anchor a_i. In the reference set (the batch, or
    `ref_embeddings`) it finds, under the current embedding and the L_p distance d, its
    K = `num_positives` nearest same-label items y_1..y_K and its M = `num_negatives`
    nearest other-label items z_1..z_M, and averages the hinge of eq. 2 over the K * M pairs:

        loss_i = 1/(K M) sum_k sum_m [d(a_i, y_k) + margin - d(a_i, z_m)]_+ .

    The mean of these over the N anchors is eq. 3. Unlike the batch-hard triplet loss
    (`batch_hard_triplet`, the *furthest* positive) the positives are the *nearest* ones:
    the loss asks that an anchor's K nearest neighbours share its class, not that its
    class be compact.

    Details the paper leaves open:

    - Search. The neighbours are searched on distances without gradient (the paper's
      search is a non-differentiable step between iterations); the selected pairs'
      distances carry the gradient. The anchor is excluded by index, so an exact
      duplicate of it (distance 0) is still a valid positive.
    - Small classes. An anchor with only K' < K positives (or M' < M negatives) in the
      reference set uses those it has and averages over the K' * M' pairs that exist.
      An anchor with no positive or no negative has loss 0; `KNNTriplet` still counts it
      in its mean over all N anchors (eq. 3's 1/N), as `MultiSimilarity` does.
    - Ties. Among equal distances the lower reference index is selected first (`top_k`'s
      order). Tied items give the same loss value; only which one receives the gradient
      depends on the order.
    - Margin. The paper does not give alpha. The default 0.2 is in the units of tfmir's
      embedders, which output unit vectors: their Euclidean distances lie in [0, 2]
      (about 1.41 for orthogonal vectors), so 0.2 demands a gap of a tenth of that range.
      FaceNet (the paper's ref. [17]) uses the same number for unit embeddings, there on
      squared distances.
    - Distances. The embeddings are used as given (not normalised here). d is computed
      from the differences, so duplicates are at distance exactly 0, with a zero
      gradient rather than the root's infinite slope.

    Args:
        labels: Integer class labels of the anchors, shape (N,) or (N, 1).
        embeddings: Anchor embeddings, shape (N, D), any float dtype.
        ref_labels: Labels of the reference set, shape (M,) or (M, 1). `None` (together
            with `ref_embeddings=None`) uses the batch as its own reference.
        ref_embeddings: Reference embeddings, shape (M, D), e.g. a memory bank. Every pair
            counts, no self-pair is removed.
        num_positives: K, the nearest same-label neighbours per anchor (5 in the paper).
        num_negatives: M, the nearest other-label neighbours per anchor (5 in the paper).
        margin: alpha of eq. 1-2.
        p: Order of the L_p distance, at least 1 (2 in the paper).

    Returns:
        float32 tensor of shape (N,), the loss of every anchor, computed in float32 even
        when `embeddings` are float16 or bfloat16.

    Example:

    >>> labels = [0, 0, 0, 1]
    >>> embeddings = [[0.0, 0.0], [0.5, 0.0], [1.0, 0.0], [0.0, 0.75]]
    >>> # Anchor 0, K=1: nearest positive at 0.5, only negative at 0.75: [0.5 + 0.5 - 0.75]_+
    >>> float(knn_triplet(labels, embeddings, num_positives=1, margin=0.5)[0])
    0.25

    Reference:
        Zhuang et al., "Deep kNN for Medical Image Classification", MICCAI 2020,
        LNCS 12261, pp. 127-136, eq. 1-3 and Sec. 2.2-2.3.
    """
    check_triplet_arguments(
        margin=margin, p=p, num_positives=num_positives, num_negatives=num_negatives
    )
    distances, positive_mask, negative_mask = labelled_distances(
        labels, embeddings, ref_labels, ref_embeddings, p=p
    )
    positive_distances, positive_valid = select_neighbours(
        distances, positive_mask, num_positives
    )
    negative_distances, negative_valid = select_neighbours(
        distances, negative_mask, num_negatives
    )
    hinges = ops.relu(positive_distances[:, :, None] + margin - negative_distances[:, None, :])
    pair_valid = ops.logical_and(positive_valid[:, :, None], negative_valid[:, None, :])
    hinges = ops.where(pair_valid, hinges, 0.0)
    num_pairs = ops.sum(ops.cast(pair_valid, "float32"), axis=(1, 2))
    return ops.sum(hinges, axis=(1, 2)) / ops.maximum(num_pairs, 1.0)


@keras.saving.register_keras_serializable(package="tfmir")
class KNNTriplet(keras.losses.Loss):
    """Deep-kNN loss between integer labels and embeddings.

    `y_true` holds the labels (N,) or (N, 1) and `y_pred` the embeddings (N, D); the batch
    is its own reference set, as in the paper's within-batch search (use stratified
    batches, e.g. 9 classes x 10 images, so every anchor has K positives). The default
    reduction `"sum_over_batch_size"` averages over all N anchors (eq. 3), those without a
    positive or negative included with loss 0. See `knn_triplet` for the formula.

    Args:
        num_positives: K, the nearest same-label neighbours per anchor.
        num_negatives: M, the nearest other-label neighbours per anchor.
        margin: alpha of eq. 1-2.
        p: Order of the L_p distance, at least 1.
        reduction: Keras loss reduction.
        name: Name of the loss.

    Example:

    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8)])
    >>> model.compile(optimizer="adam", loss=KNNTriplet())

    Reference:
        Zhuang et al., "Deep kNN for Medical Image Classification", MICCAI 2020,
        LNCS 12261, pp. 127-136.
    """

    def __init__(
        self,
        num_positives=5,
        num_negatives=5,
        margin=0.2,
        p=2,
        reduction="sum_over_batch_size",
        name="knn_triplet",
    ):
        check_triplet_arguments(
            margin=margin, p=p, num_positives=num_positives, num_negatives=num_negatives
        )
        # float32 on purpose: Keras casts y_true to the loss dtype, and labels
        # must stay exact under a mixed-precision policy.
        super().__init__(name=name, reduction=reduction, dtype="float32")
        self.num_positives = num_positives
        self.num_negatives = num_negatives
        self.margin = margin
        self.p = p

    def call(self, y_true, y_pred):
        return knn_triplet(
            y_true,
            y_pred,
            num_positives=self.num_positives,
            num_negatives=self.num_negatives,
            margin=self.margin,
            p=self.p,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            num_positives=self.num_positives,
            num_negatives=self.num_negatives,
            margin=self.margin,
            p=self.p,
        )
        return config
