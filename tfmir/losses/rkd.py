"""Relational knowledge distillation, distance-wise (Park et al., CVPR 2019)."""

import keras
from keras import ops

# Squared distances at or below this count as zero: sqrt has an infinite slope at 0, and a pair
# of identical embeddings must give a zero distance with a zero (not NaN) gradient.
_TINY_SQUARED_DISTANCE = 1e-12


def rkd_distance(teacher_embeddings, student_embeddings, *, delta=1.0):
    """Per-sample RKD distance loss (Park et al., CVPR 2019, arXiv:1904.05068), shape (N,).

    Both sides measure all pairwise Euclidean distances in the batch, d_ij = ||e_i - e_j||_2,
    and divide them by their own mean over the pairs i != j (the "mean non-zero distance"
    of paper 000, eq. 3), so the two embedding spaces may differ in size and scale. The loss
    of sample i is the mean over its pairs j != i of the Huber loss (eq. 2)

        l_delta(x) = 0.5 x^2                 for |x| <= delta
                     delta (|x| - 0.5 delta)  otherwise,   x = d'^s_ij - d'^t_ij,

    so the mean of the returned values is the mean over all off-diagonal pairs. The
    teacher side carries no gradient.

    (The authors' RKD code averages the strictly positive distances instead; the two agree
    unless a batch holds duplicate embeddings.)

    A batch whose embeddings on one side are all equal has mean distance 0; that side's
    normalised distances are then 0 (no division by zero). A batch of one sample has no
    pairs and gets loss 0.

    Args:
        teacher_embeddings: Teacher embeddings, shape (N, D_t), any float dtype.
        student_embeddings: Student embeddings, shape (N, D_s); D_s may differ from D_t.
        delta: Where the Huber loss turns from quadratic to linear (1 in paper 000).

    Returns:
        float32 tensor of shape (N,), the loss of every sample.

    Example:

    >>> teacher = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]
    >>> student = [[0.0, 0.0], [6.0, 0.0], [0.0, 8.0]]  # the teacher, scaled
    >>> rkd_distance(teacher, student).numpy()
    array([0., 0., 0.], dtype=float32)

    Reference:
        Park et al., "Relational Knowledge Distillation", CVPR 2019,
        https://arxiv.org/abs/1904.05068; as used by Feng et al., "Universal Model for
        Multi-Domain Medical Image Retrieval", https://arxiv.org/abs/2007.08628, eq. 1-3.
    """
    teacher = ops.stop_gradient(ops.cast(teacher_embeddings, "float32"))
    student = ops.cast(student_embeddings, "float32")
    num_samples = ops.shape(student)[0]
    off_diagonal = ops.logical_not(ops.eye(num_samples, dtype="bool"))
    teacher_distances = _normalized_distances(teacher, off_diagonal)
    student_distances = _normalized_distances(student, off_diagonal)
    # keras.losses.huber averages over the last axis; a trailing axis of 1 keeps every pair.
    pair_losses = keras.losses.huber(
        teacher_distances[..., None], student_distances[..., None], delta=delta
    )
    pair_losses = ops.where(off_diagonal, pair_losses, 0.0)
    num_pairs = ops.cast(ops.maximum(num_samples - 1, 1), "float32")
    return ops.sum(pair_losses, axis=1) / num_pairs


def _normalized_distances(embeddings, off_diagonal):
    """(N, N) Euclidean distances divided by their mean over i != j (0 on the diagonal)."""
    # Differences rather than the |a|^2 + |b|^2 - 2ab expansion: no cancellation near zero.
    differences = embeddings[:, None, :] - embeddings[None, :, :]
    squared = ops.sum(ops.square(differences), axis=-1)
    nonzero = ops.logical_and(off_diagonal, squared > _TINY_SQUARED_DISTANCE)
    # The inner where keeps sqrt's gradient finite where the outer one discards it.
    distances = ops.where(nonzero, ops.sqrt(ops.where(nonzero, squared, 1.0)), 0.0)
    num_pairs = ops.sum(ops.cast(off_diagonal, "float32"))
    mean_distance = ops.sum(distances) / ops.maximum(num_pairs, 1.0)
    return distances / ops.where(mean_distance > 0.0, mean_distance, 1.0)


@keras.saving.register_keras_serializable(package="tfmir")
class RKDDistance(keras.losses.Loss):
    """RKD distance loss between teacher embeddings (`y_true`) and student embeddings (`y_pred`).

    `y_true` holds the teacher's embeddings (N, D_t) of a batch and `y_pred` the student's
    (N, D_s) of the same images in the same order. The default reduction
    `"sum_over_batch_size"` gives the mean over all pairs i != j. See `rkd_distance` for the
    normalisation and the Huber loss.

    Args:
        delta: Where the Huber loss turns from quadratic to linear.
        reduction: Keras loss reduction.
        name: Name of the loss.

    Example:

    >>> teacher = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]
    >>> student = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    >>> float(RKDDistance()(teacher, student))  # mean over the 6 ordered pairs i != j
    0.00522...

    Reference:
        Park et al., "Relational Knowledge Distillation", CVPR 2019,
        https://arxiv.org/abs/1904.05068; Feng et al., "Universal Model for Multi-Domain
        Medical Image Retrieval", https://arxiv.org/abs/2007.08628, eq. 1-3.
    """

    def __init__(self, delta=1.0, reduction="sum_over_batch_size", name="rkd_distance"):
        # float32 like MultiSimilarity: distances of bfloat16 embeddings lose too many digits.
        super().__init__(name=name, reduction=reduction, dtype="float32")
        self.delta = delta

    def call(self, y_true, y_pred):
        return rkd_distance(y_true, y_pred, delta=self.delta)

    def get_config(self):
        config = super().get_config()
        config.update(delta=self.delta)
        return config
