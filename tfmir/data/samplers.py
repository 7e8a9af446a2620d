"""Index samplers: shuffled, class-balanced and source-specific mini-batches, and replica shards.

A sampler is an infinite iterable of int64 index batches of constant size `batch_size`, drawn
from `num_items` items; each new iterator restarts the same seeded sequence.
`tfmir.data.make_dataset(examples, sampler=...)` turns the index batches into image batches, and
`ReplicaShard` hands each replica of a distributed run its part of every global batch.

Example:

```python
sampler = SourceAwareSampler(train.labels, train.sources, num_classes_per_batch=8)
first_batch = next(iter(sampler))  # 8 classes x 5 images, all from one source
replica_batch = next(iter(ReplicaShard(sampler, num_replicas=2, replica_index=1)))  # 4 x 5
```
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np

SOURCE_WEIGHTS = ("size", "uniform")


class _ClassDraw:
    """Draws one class-balanced batch (c classes x k images) from a group of items.

    When the group has fewer than c classes, all its classes are used and the c*k slots are
    shared equally between them (shares differ by at most one).
    """

    def __init__(self, indices: np.ndarray, labels: np.ndarray, num_classes_per_batch: int,
                 num_per_class: int, where: str, class_names: Sequence[str] | None = None):
        classes, inverse = np.unique(labels, return_inverse=True)
        inverse = inverse.reshape(-1)
        self.members = [indices[inverse == position] for position in range(len(classes))]
        self.num_classes_per_batch = num_classes_per_batch
        self.num_per_class = num_per_class
        self.batch_size = num_classes_per_batch * num_per_class
        self.fill = len(classes) < num_classes_per_batch
        counts = [len(members) for members in self.members]

        def describe(label):
            return f"{class_names[label]!r} (label {label})" if class_names else str(label)

        for label, count in zip(classes, counts):
            if count < num_per_class:
                raise ValueError(
                    f"class {describe(label)}{where} has {count} images, fewer than num_per_class="
                    f"{num_per_class} needed per class in a batch; drop the class or lower "
                    "num_per_class"
                )
        if self.fill:
            largest_share = -(-self.batch_size // len(classes))
            for label, count in zip(classes, counts):
                if count < largest_share:
                    raise ValueError(
                        f"class {describe(label)}{where} has {count} images, but with only "
                        f"{len(classes)} classes (fewer than num_classes_per_batch="
                        f"{num_classes_per_batch}) each class must fill up to {largest_share} "
                        f"of the {self.batch_size} slots of a batch"
                    )

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        num_classes = len(self.members)
        if self.fill:
            chosen = rng.permutation(num_classes)
            shares = np.full(num_classes, self.batch_size // num_classes)
            shares[: self.batch_size % num_classes] += 1
        else:
            chosen = rng.choice(num_classes, size=self.num_classes_per_batch, replace=False)
            shares = np.full(self.num_classes_per_batch, self.num_per_class)
        return np.concatenate([
            rng.choice(self.members[position], size=share, replace=False)
            for position, share in zip(chosen, shares)
        ]).astype(np.int64)


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")


def _check_counts(num_classes_per_batch: int, num_per_class: int) -> None:
    _check_positive("num_classes_per_batch", num_classes_per_batch)
    _check_positive("num_per_class", num_per_class)


def _as_labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array. Received shape {labels.shape}")
    return labels


class ClassBalancedSampler:
    """Infinite iterator of index batches: c classes drawn uniformly at random x k images of each.

    Images of a class are drawn without replacement within a batch. When there are fewer than c
    classes, every class is used and the c*k slots are shared equally (±1) between them, so the
    batch size never changes.

    Args:
        labels: class label per item, shape (N,).
        num_classes_per_batch: c, the classes per batch.
        num_per_class: k, the images per class (5 in the paper).
        seed: the random seed; every new iterator restarts the same sequence.
        class_names: label -> name, to name a class that cannot fill its share of a batch.

    Example:

    ```python
    sampler = ClassBalancedSampler(labels, num_classes_per_batch=9, num_per_class=10)
    batch = next(iter(sampler))  # int64 (90,)
    ```

    Reference:
        Feng et al., "Universal Model for Multi-Domain Medical Image Retrieval",
        https://arxiv.org/abs/2007.08628, Sec. III: mini-batches of c classes x k=5 images.
    """

    def __init__(self, labels: np.ndarray | Sequence[int], *, num_classes_per_batch: int,
                 num_per_class: int = 5, seed: int = 0,
                 class_names: Sequence[str] | None = None):
        _check_counts(num_classes_per_batch, num_per_class)
        labels = _as_labels(labels)
        self.num_classes_per_batch = int(num_classes_per_batch)
        self.num_per_class = int(num_per_class)
        self.seed = seed
        self.num_items = len(labels)
        self._draw = _ClassDraw(np.arange(len(labels), dtype=np.int64), labels,
                                self.num_classes_per_batch, self.num_per_class, where="",
                                class_names=class_names)

    @property
    def batch_size(self) -> int:
        """c x k, the constant number of indices per batch."""
        return self.num_classes_per_batch * self.num_per_class

    def __iter__(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        while True:
            yield self._draw.draw(rng)


class SourceAwareSampler:
    """Source-specific batches: every batch comes from one source, class-balanced inside.

    The source of each batch is chosen with probability proportional to its size ("size"),
    uniformly ("uniform"), or by a {source: weight} dict (weights are normalised). Inside the
    source, c classes x k images are drawn as in `ClassBalancedSampler`.

    Args:
        labels: class label per item, shape (N,).
        sources: source name per item, shape (N,).
        num_classes_per_batch: c, the classes per batch.
        num_per_class: k, the images per class (5 in the paper).
        source_weights: "size", "uniform" or {source: positive weight} naming every source.
        seed: the random seed; every new iterator restarts the same sequence.
        class_names: label -> name, to name a class that cannot fill its share of a batch.

    Example:

    ```python
    sampler = SourceAwareSampler(labels, sources, num_classes_per_batch=4,
                                 source_weights={"retina": 1.0, "xray": 3.0})
    sampler.source_probabilities  # {"retina": 0.25, "xray": 0.75}
    ```

    Reference:
        Feng et al., "Universal Model for Multi-Domain Medical Image Retrieval",
        https://arxiv.org/abs/2007.08628, Sec. III "source-specific sampling": one source per
        mini-batch, chosen in proportion to its number of images.
    """

    def __init__(self, labels: np.ndarray | Sequence[int], sources: np.ndarray | Sequence[str], *,
                 num_classes_per_batch: int, num_per_class: int = 5,
                 source_weights: str | Mapping[str, float] = "size", seed: int = 0,
                 class_names: Sequence[str] | None = None):
        _check_counts(num_classes_per_batch, num_per_class)
        labels = _as_labels(labels)
        sources = np.asarray(sources).astype(str)
        if sources.shape != labels.shape:
            raise ValueError(f"sources must have one entry per label ({len(labels)}). "
                             f"Received shape {sources.shape}")
        self.num_classes_per_batch = int(num_classes_per_batch)
        self.num_per_class = int(num_per_class)
        self.seed = seed
        self.num_items = len(labels)
        self.source_names = tuple(str(name) for name in np.unique(sources))
        self._draws = []
        for name in self.source_names:
            members = np.flatnonzero(sources == name).astype(np.int64)
            self._draws.append(_ClassDraw(members, labels[members], self.num_classes_per_batch,
                                          self.num_per_class, where=f" of source {name!r}",
                                          class_names=class_names))
        sizes = np.array([np.sum(sources == name) for name in self.source_names], dtype=np.float64)
        if isinstance(source_weights, str):
            if source_weights not in SOURCE_WEIGHTS:
                raise ValueError(f"source_weights must be one of {SOURCE_WEIGHTS} or a "
                                 "{source: weight} dict. "
                                 f"Received: source_weights={source_weights!r}")
            weights = sizes if source_weights == "size" else np.ones_like(sizes)
        elif isinstance(source_weights, Mapping):
            unknown = sorted(set(map(str, source_weights)) - set(self.source_names))
            missing = sorted(set(self.source_names) - set(map(str, source_weights)))
            if unknown or missing:
                raise ValueError(
                    f"source_weights must name exactly the sources {self.source_names}. "
                    f"Received unknown sources {unknown} and no weight for {missing}"
                )
            weights = np.array([float(source_weights[name]) for name in self.source_names])
            bad = {name: source_weights[name] for name, weight in zip(self.source_names, weights)
                   if not np.isfinite(weight) or weight <= 0}
            if bad:
                raise ValueError(f"source weights must be positive. Received {bad}")
        else:
            raise ValueError(f"source_weights must be one of {SOURCE_WEIGHTS} or a "
                             "{source: weight} dict. "
                             f"Received: source_weights={source_weights!r}")
        self._probabilities = weights / weights.sum()

    @property
    def batch_size(self) -> int:
        """c x k, the constant number of indices per batch."""
        return self.num_classes_per_batch * self.num_per_class

    @property
    def source_probabilities(self) -> dict[str, float]:
        """source -> probability that a batch comes from it (sums to 1)."""
        return {name: float(probability)
                for name, probability in zip(self.source_names, self._probabilities)}

    def __iter__(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        while True:
            source = rng.choice(len(self._draws), p=self._probabilities)
            yield self._draws[source].draw(rng)


class ShuffledSampler:
    """Infinite iterator of index batches: a fresh seeded permutation of the items per epoch.

    Each permutation is cut into `num_items // batch_size` full batches; its last partial batch is
    dropped, so every item appears at most once per epoch and the batch size never changes.

    Args:
        num_items: N, the number of items drawn from (indices 0..N-1).
        batch_size: the indices per batch (at most N).
        seed: the random seed; every new iterator restarts the same sequence.

    Example:

    ```python
    sampler = ShuffledSampler(10, batch_size=4)
    batches = itertools.islice(iter(sampler), 2)  # 8 distinct indices of 0..9
    ```
    """

    def __init__(self, num_items: int, *, batch_size: int, seed: int = 0):
        _check_positive("num_items", num_items)
        _check_positive("batch_size", batch_size)
        if batch_size > num_items:
            raise ValueError(f"batch_size={batch_size} exceeds num_items={num_items}: no full "
                             "batch can be drawn")
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.seed = seed

    def __iter__(self) -> Iterator[np.ndarray]:
        rng = np.random.default_rng(self.seed)
        num_batches = self.num_items // self.batch_size
        while True:
            order = rng.permutation(self.num_items)
            for batch in range(num_batches):
                yield order[batch * self.batch_size:(batch + 1) * self.batch_size].astype(np.int64)


def _draws_short_of_classes(sampler) -> list[str]:
    """Where `sampler` shares its slots among fewer classes than num_classes_per_batch."""
    if isinstance(sampler, ClassBalancedSampler):
        return ["the labels"] if sampler._draw.fill else []
    if isinstance(sampler, SourceAwareSampler):
        return [f"source {name!r}" for name, draw in zip(sampler.source_names, sampler._draws)
                if draw.fill]
    return []


class ReplicaShard:
    """One replica's part of every global batch of a sampler, for data-parallel training.

    Replica r of R gets the contiguous slice r of each global batch (global batch size / R
    indices). Class-balanced samplers put a class's images next to each other, so with
    num_classes_per_batch divisible by R every replica gets whole classes
    (num_classes_per_batch / R classes x num_per_class images), and a `SourceAwareSampler`'s
    slices all come from the batch's one source. All replicas must wrap samplers with the same
    seed, so that they slice the same global batches.

    Args:
        sampler: the global sampler, with `batch_size` and `num_items`.
        num_replicas: R, the number of replicas sharing each global batch.
        replica_index: r in [0, R), this replica.

    Example:

    ```python
    sampler = ClassBalancedSampler(labels, num_classes_per_batch=8, num_per_class=5)
    shard = ReplicaShard(sampler, num_replicas=4, replica_index=input_context.input_pipeline_id)
    shard.batch_size  # 10: 2 classes x 5 images
    ```
    """

    def __init__(self, sampler, *, num_replicas: int, replica_index: int):
        _check_positive("num_replicas", num_replicas)
        if isinstance(replica_index, bool) or int(replica_index) != replica_index or not (
                0 <= replica_index < num_replicas):
            raise ValueError(f"replica_index must be in [0, num_replicas={num_replicas}). "
                             f"Received: replica_index={replica_index!r}")
        global_batch_size = int(sampler.batch_size)
        if global_batch_size % num_replicas:
            raise ValueError(
                f"the sampler's batch_size={global_batch_size} is not divisible by "
                f"num_replicas={num_replicas}. Received: num_replicas={num_replicas}")
        num_classes_per_batch = getattr(sampler, "num_classes_per_batch", None)
        if num_classes_per_batch is not None and num_replicas > 1:
            if num_classes_per_batch % num_replicas:
                raise ValueError(
                    f"the sampler's num_classes_per_batch={num_classes_per_batch} is not "
                    f"divisible by num_replicas={num_replicas}: each replica must get whole "
                    f"classes. Received: num_replicas={num_replicas}")
            short = _draws_short_of_classes(sampler)
            if short:
                # Such batches split their slots unevenly (±1) among the classes there are, so a
                # fixed slice would cut a class in two.
                raise ValueError(
                    f"{short[0]} has fewer than num_classes_per_batch={num_classes_per_batch} "
                    "classes, so its batches cannot be cut into whole classes per replica. "
                    f"Received: num_replicas={num_replicas}")
        self.sampler = sampler
        self.num_replicas = int(num_replicas)
        self.replica_index = int(replica_index)
        self.num_items = int(sampler.num_items)
        self.batch_size = global_batch_size // self.num_replicas

    def __iter__(self) -> Iterator[np.ndarray]:
        start = self.replica_index * self.batch_size
        for batch in self.sampler:
            yield batch[start:start + self.batch_size]
