"""Tests for tfmir.data.samplers: shuffled, class-balanced and source-specific index batches."""

import collections
import itertools

import numpy as np
import pytest

from tfmir.data.samplers import (
    ClassBalancedSampler,
    ReplicaShard,
    ShuffledSampler,
    SourceAwareSampler,
)


def _take(sampler, count):
    return list(itertools.islice(iter(sampler), count))


def _class_counts(labels, batch):
    return sorted(collections.Counter(labels[batch].tolist()).values())


def test_class_balanced_batches_hold_c_classes_times_k():
    labels = np.repeat(np.arange(6), [5, 7, 9, 20, 6, 11])
    sampler = ClassBalancedSampler(labels, num_classes_per_batch=3, num_per_class=5, seed=1)
    assert sampler.batch_size == 15
    seen_classes = set()
    for batch in _take(sampler, 200):
        assert batch.dtype == np.int64 and batch.shape == (15,)
        assert len(set(batch.tolist())) == 15  # no image twice in a batch
        assert _class_counts(labels, batch) == [5, 5, 5]
        seen_classes.update(labels[batch].tolist())
    assert seen_classes == set(range(6))


def test_class_balanced_is_seeded_and_restarts():
    labels = np.repeat(np.arange(5), 8)
    first = _take(ClassBalancedSampler(labels, num_classes_per_batch=2, seed=4), 20)
    sampler = ClassBalancedSampler(labels, num_classes_per_batch=2, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, _take(sampler, 20)))
    assert all(np.array_equal(a, b) for a, b in zip(first, _take(sampler, 20)))  # new iterator
    other = _take(ClassBalancedSampler(labels, num_classes_per_batch=2, seed=5), 20)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_class_with_fewer_than_k_images_is_refused():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 6)
    with pytest.raises(ValueError, match="class 1 has 3 images, fewer than num_per_class=5"):
        ClassBalancedSampler(labels, num_classes_per_batch=2, num_per_class=5)
    with pytest.raises(ValueError, match="num_classes_per_batch must be a positive integer"):
        ClassBalancedSampler(labels, num_classes_per_batch=0)


def test_fewer_classes_than_c_share_the_batch_equally():
    labels = np.array([0] * 9 + [1] * 8)
    sampler = ClassBalancedSampler(labels, num_classes_per_batch=3, num_per_class=5)
    for batch in _take(sampler, 50):
        assert batch.shape == (15,) and len(set(batch.tolist())) == 15
        assert _class_counts(labels, batch) == [7, 8]  # 15 slots over 2 classes: 8 and 7
    with pytest.raises(ValueError, match="class 1 has 7 images.*up to 8"):
        ClassBalancedSampler(np.array([0] * 9 + [1] * 7), num_classes_per_batch=3,
                             num_per_class=5)


def _two_sources():
    labels = np.concatenate([np.repeat([0, 1, 2, 3], 10), np.repeat([4, 5, 6], 20),
                             np.repeat([7, 8], 10)])
    sources = np.array(["derm"] * 40 + ["retina"] * 60 + ["xray"] * 20)
    return labels, sources


def test_source_aware_batches_come_from_one_source():
    labels, sources = _two_sources()
    sampler = SourceAwareSampler(labels, sources, num_classes_per_batch=3, num_per_class=2,
                                 seed=0)
    assert sampler.batch_size == 6
    for batch in _take(sampler, 300):
        assert batch.shape == (6,) and len(set(batch.tolist())) == 6
        batch_sources = set(sources[batch].tolist())
        assert len(batch_sources) == 1
        if batch_sources == {"xray"}:  # 2 classes < c=3: 6 slots split 3 + 3
            assert _class_counts(labels, batch) == [3, 3]
        else:
            assert _class_counts(labels, batch) == [2, 2, 2]


@pytest.mark.parametrize("weights, expected", [
    ("size", {"derm": 40 / 120, "retina": 60 / 120, "xray": 20 / 120}),
    ("uniform", {"derm": 1 / 3, "retina": 1 / 3, "xray": 1 / 3}),
    ({"derm": 1.0, "retina": 2.0, "xray": 5.0}, {"derm": 1 / 8, "retina": 2 / 8, "xray": 5 / 8}),
])
def test_source_frequencies_follow_the_weights(weights, expected):
    labels, sources = _two_sources()
    sampler = SourceAwareSampler(labels, sources, num_classes_per_batch=2, num_per_class=2,
                                 source_weights=weights, seed=11)
    assert sampler.source_probabilities == pytest.approx(expected)
    counts = collections.Counter(sources[batch[0]] for batch in _take(sampler, 4000))
    for source, probability in expected.items():
        assert abs(counts[source] / 4000 - probability) <= 0.03, (source, counts)


def test_source_weights_are_validated():
    labels, sources = _two_sources()
    make = lambda weights: SourceAwareSampler(labels, sources, num_classes_per_batch=2,  # noqa
                                              source_weights=weights)
    with pytest.raises(ValueError, match=r"unknown sources \['ct'\]"):
        make({"derm": 1, "retina": 1, "xray": 1, "ct": 1})
    with pytest.raises(ValueError, match=r"no weight for \['xray'\]"):
        make({"derm": 1, "retina": 1})
    with pytest.raises(ValueError, match="must be positive.*'retina': 0"):
        make({"derm": 1, "retina": 0, "xray": 1})
    with pytest.raises(ValueError, match="source_weights must be one of.*'balanced'"):
        make("balanced")


def test_source_aware_errors_name_class_and_source():
    labels = np.array([0] * 5 + [1] * 5 + [2] * 4)
    sources = np.array(["a"] * 10 + ["b"] * 4)
    with pytest.raises(ValueError, match="class 2 of source 'b' has 4 images.*num_per_class=5"):
        SourceAwareSampler(labels, sources, num_classes_per_batch=2)
    with pytest.raises(ValueError, match="one entry per label"):
        SourceAwareSampler(labels, sources[:3], num_classes_per_batch=2)


def test_shuffled_sampler_permutes_each_epoch_and_drops_the_partial_batch():
    sampler = ShuffledSampler(10, batch_size=3, seed=2)
    assert (sampler.batch_size, sampler.num_items) == (3, 10)
    batches = _take(sampler, 9)  # 10 // 3 = 3 batches per epoch: 3 epochs
    assert all(batch.dtype == np.int64 and batch.shape == (3,) for batch in batches)
    epochs = [np.concatenate(batches[start:start + 3]) for start in (0, 3, 6)]
    for epoch in epochs:
        assert len(set(epoch.tolist())) == 9  # 9 distinct of the 10 items; one left over
    assert len({tuple(epoch.tolist()) for epoch in epochs}) == 3  # a fresh permutation each
    assert all(np.array_equal(a, b) for a, b in zip(batches, _take(sampler, 9)))  # restarts
    other = _take(ShuffledSampler(10, batch_size=3, seed=3), 9)
    assert not all(np.array_equal(a, b) for a, b in zip(batches, other))


def test_shuffled_sampler_is_validated():
    with pytest.raises(ValueError, match="batch_size=11 exceeds num_items=10"):
        ShuffledSampler(10, batch_size=11)
    with pytest.raises(ValueError, match="num_items must be a positive integer. "
                                         "Received: num_items=0"):
        ShuffledSampler(0, batch_size=1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer. "
                                         "Received: batch_size=2.5"):
        ShuffledSampler(10, batch_size=2.5)


def test_replica_slices_of_class_balanced_batches_hold_whole_classes():
    labels = np.repeat(np.arange(8), 6)
    sampler = ClassBalancedSampler(labels, num_classes_per_batch=4, num_per_class=3, seed=7)
    shards = [ReplicaShard(sampler, num_replicas=2, replica_index=index) for index in range(2)]
    assert [(shard.batch_size, shard.num_items) for shard in shards] == [(6, 48), (6, 48)]
    global_batches = _take(sampler, 50)
    slices = [_take(shard, 50) for shard in shards]
    for step, batch in enumerate(global_batches):
        parts = [slices[index][step] for index in range(2)]
        assert np.array_equal(np.concatenate(parts), batch)
        for part in parts:  # 4 / 2 = 2 whole classes of 3 images each
            assert part.shape == (6,) and _class_counts(labels, part) == [3, 3]
        assert not set(labels[parts[0]].tolist()) & set(labels[parts[1]].tolist())


def test_replica_slices_of_source_aware_batches_are_single_source():
    labels = np.concatenate([np.repeat(np.arange(4), 6), np.repeat(np.arange(4, 10), 4)])
    sources = np.array(["derm"] * 24 + ["xray"] * 24)
    sampler = SourceAwareSampler(labels, sources, num_classes_per_batch=4, num_per_class=2,
                                 seed=3)
    shards = [ReplicaShard(sampler, num_replicas=4, replica_index=index) for index in range(4)]
    slices = [_take(shard, 100) for shard in shards]
    for step, batch in enumerate(_take(sampler, 100)):
        for index in range(4):
            part = slices[index][step]
            assert np.array_equal(part, batch[2 * index:2 * index + 2])
            assert len(set(sources[part].tolist())) == 1
            assert _class_counts(labels, part) == [2]  # 4 / 4 = one class of 2 images


def test_replica_shard_errors_name_the_culprit():
    labels = np.repeat(np.arange(6), 6)
    balanced = ClassBalancedSampler(labels, num_classes_per_batch=3, num_per_class=2)
    with pytest.raises(ValueError, match=r"the sampler's num_classes_per_batch=3 is not "
                                         r"divisible by num_replicas=2: each replica must get "
                                         r"whole classes. Received: num_replicas=2"):
        ReplicaShard(balanced, num_replicas=2, replica_index=0)
    with pytest.raises(ValueError, match=r"the sampler's batch_size=10 is not divisible by "
                                         r"num_replicas=3. Received: num_replicas=3"):
        ReplicaShard(ShuffledSampler(36, batch_size=10), num_replicas=3, replica_index=0)
    with pytest.raises(ValueError, match=r"replica_index must be in \[0, num_replicas=2\). "
                                         r"Received: replica_index=2"):
        ReplicaShard(ShuffledSampler(36, batch_size=10), num_replicas=2, replica_index=2)
    with pytest.raises(ValueError, match=r"num_replicas must be a positive integer. "
                                         r"Received: num_replicas=0"):
        ReplicaShard(balanced, num_replicas=0, replica_index=0)
    # Source 'b' has 2 classes < num_classes_per_batch=4: its batches share their slots among
    # the classes there are (±1 each), which fixed replica slices can cut in two: refused.
    labels, sources = np.repeat([0, 1, 2, 3, 4, 5], 8), np.array(["a"] * 32 + ["b"] * 16)
    aware = SourceAwareSampler(labels, sources, num_classes_per_batch=4, num_per_class=2)
    with pytest.raises(ValueError, match=r"source 'b' has fewer than num_classes_per_batch=4 "
                                         r"classes"):
        ReplicaShard(aware, num_replicas=2, replica_index=1)
    ReplicaShard(aware, num_replicas=1, replica_index=0)  # one replica takes whole batches
