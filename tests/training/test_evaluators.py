"""Evaluators, the Evaluation callback and check_monitor on hand-computable fixtures.

The fake "model" maps an image to a fixed row of a table: every image is filled with one pixel
value v, and the model returns table[v]. With 8×8 images and resize_size=8 the evaluation
preprocessing leaves a constant image unchanged, so each item's embedding is chosen by hand.
Embeddings are 2-D unit vectors at chosen angles, so cosine neighbours are read off the angles.
"""

import csv

import keras
import numpy as np
import pytest

from tfmir.data import Examples
from tfmir.training import evaluators as evaluators_module
from tfmir.training.evaluators import (
    EVALUATORS,
    BinaryAUC,
    Evaluation,
    Evaluator,
    KNNClassification,
    MeanAveragePrecision,
    OutputCache,
    RecallAtK,
    SegmentationOverlap,
    TrainingKNNClassification,
    check_monitor,
    make_evaluator,
)

SIZE = 8


def _unit(degrees):
    radians = np.deg2rad(np.asarray(degrees, np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


def _lookup(rows: dict[int, np.ndarray], width: int):
    """A function from images filled with value v to rows[v]."""
    table = np.zeros((256, width), np.float32)
    for value, row in rows.items():
        table[value] = row
    table = keras.ops.convert_to_tensor(table)

    def lookup(images):
        values = keras.ops.cast(keras.ops.round(images[:, 0, 0, 0]), "int32")
        return keras.ops.take(table, values, axis=0)

    return lookup


def _table_model(rows: dict[int, np.ndarray], width: int = 2) -> keras.Model:
    """Images filled with value v -> rows[v]."""
    return keras.Sequential([keras.Input((SIZE, SIZE, 3)),
                             keras.layers.Lambda(_lookup(rows, width))])


def _hash_table_model(rows: dict[int, np.ndarray], width: int, with_mask: bool = True):
    """A hashing model's outputs: {"code": rows[v] (signs = bits), "mask": red channel / 255}."""
    images = keras.Input((SIZE, SIZE, 3))
    outputs = {"code": keras.layers.Lambda(_lookup(rows, width))(images)}
    if with_mask:
        outputs["mask"] = keras.layers.Lambda(lambda pixels: pixels[..., :1] / 255.0)(images)
    return keras.Model(images, outputs)


def _examples(values, labels, sources="x", num_classes=None, **fields) -> Examples:
    images = np.zeros((len(values), SIZE, SIZE, 3), np.uint8)
    images[:] = np.asarray(values, np.uint8)[:, None, None, None]
    num_classes = num_classes or int(max(labels)) + 1
    return Examples(labels=labels, sources=sources, ids=[f"i{value}" for value in values],
                    class_names=[str(c) for c in range(num_classes)], images=images, **fields)


# --- Recall@K -------------------------------------------------------------------------------


def _two_source_split():
    """Items interleaved by source; values 0..6 select the angles.

    Source a: angles 0 (class 0), 10 (0), 25 (1), 90 (1). Neighbours, query excluded:
      0°  -> 10 (0), 25 (1)         hit@1, hit@2
      10° -> 0 (0), 25 (1)          hit@1, hit@2
      25° -> 10 (0), 0 (0)          miss, miss
      90° -> 25 (1), 10 (0)         hit@1, hit@2
      Recall@1 = Recall@2 = 3/4.
    Source b: angles 0 (class 0), 30 (1), 100 (0).
      0°   -> 30 (1), 100 (0)       miss@1, hit@2
      30°  -> 0 (0), 100 (0)        miss, miss
      100° -> 30 (1), 0 (0)         miss@1, hit@2
      Recall@1 = 0, Recall@2 = 2/3.
    """
    angles = [0, 0, 10, 30, 25, 100, 90]
    sources = ["a", "b", "a", "b", "a", "b", "a"]
    labels = [0, 0, 0, 1, 1, 0, 1]
    model = _table_model({value: _unit([angle])[0] for value, angle in enumerate(angles)})
    return model, _examples(range(7), labels, sources=sources)


def test_recall_at_k_by_hand():
    model, examples = _two_source_split()
    metrics = RecallAtK(ks=(1, 2)).evaluate(model, examples, resize_size=SIZE)
    expected = {
        "recall@1": (3 / 4 + 0) / 2,
        "recall@2": (3 / 4 + 2 / 3) / 2,
        "recall@1_a": 3 / 4,
        "recall@2_a": 3 / 4,
        "recall@1_b": 0.0,
        "recall@2_b": 2 / 3,
    }
    assert metrics == pytest.approx(expected)
    assert sorted(RecallAtK(ks=(1, 2)).metric_names(examples)) == sorted(expected)


def test_recall_at_k_single_source_has_no_per_source_keys():
    model, examples = _two_source_split()
    source_a = examples.subset(examples.sources == "a")
    assert RecallAtK(ks=(1, 2)).metric_names(source_a) == ["recall@1", "recall@2"]
    metrics = RecallAtK(ks=(1, 2)).evaluate(model, source_a, resize_size=SIZE)
    assert metrics == pytest.approx({"recall@1": 3 / 4, "recall@2": 3 / 4})


def test_recall_at_k_check_names_the_small_source():
    _, examples = _two_source_split()
    RecallAtK(ks=(1, 2)).check(examples)
    with pytest.raises(ValueError, match=r"source 'b' has 3 images; Recall@3 needs at least 4"):
        RecallAtK(ks=(1, 3)).check(examples)


# --- kNN classification ---------------------------------------------------------------------


def _knn_splits():
    """Train (values 0..5): angles 0, 5, 10 (class 0), 50, 55 (class 1), 100 (class 2).

    Class 2 is the training split's smallest class (1 item); the test split's smallest is
    class 0, so the RS of the two conventions differ.

    Test (values 10..15), true class, nearest training items (angle gap) and predictions:
      2°  c0: 0 (2), 5 (3), 10 (8)        k=1 -> 0 ✓   k=3 -> 0 ✓
      52° c1: 50 (2), 55 (3), 10 (42)     k=1 -> 1 ✓   k=3 -> 1 ✓
      28° c1: 10 (18), 50 (22), 5 (23)    k=1 -> 0 ✗   k=3 -> 0 ✗
      98° c2: 100 (2), 55 (43), 50 (48)   k=1 -> 2 ✓   k=3 -> 1 ✗
      80° c2: 100 (20), 55 (25), 50 (30)  k=1 -> 2 ✓   k=3 -> 1 ✗
      60° c2: 55 (5), 50 (10), 100 (40)   k=1 -> 1 ✗   k=3 -> 1 ✗
    k=1: Acc 4/6; recalls c0 1, c1 1/2, c2 2/3 -> MCR 13/18; RS (class 2) 2/3.
    k=3: Acc 2/6; recalls c0 1, c1 1/2, c2 0 -> MCR 1/2; RS 0.
    """
    train_angles = [0, 5, 10, 50, 55, 100]
    test_angles = [2, 52, 28, 98, 80, 60]
    rows = {value: _unit([angle])[0] for value, angle in enumerate(train_angles)}
    rows.update({10 + value: _unit([angle])[0] for value, angle in enumerate(test_angles)})
    train = _examples(range(6), [0, 0, 0, 1, 1, 2])
    test = _examples(range(10, 16), [0, 1, 1, 2, 2, 2])
    return _table_model(rows), train, test


def test_knn_classification_by_hand():
    model, train, test = _knn_splits()
    metrics = KNNClassification(num_neighbors=1).evaluate(model, test, resize_size=SIZE,
                                                          train=train)
    assert metrics == pytest.approx({"knn_accuracy": 4 / 6, "knn_mcr": 13 / 18, "knn_rs": 2 / 3})


def test_knn_classification_several_neighbor_counts():
    model, train, test = _knn_splits()
    evaluator = KNNClassification(num_neighbors=(1, 3))
    metrics = evaluator.evaluate(model, test, resize_size=SIZE, train=train)
    expected = {
        "knn@1_accuracy": 4 / 6, "knn@1_mcr": 13 / 18, "knn@1_rs": 2 / 3,
        "knn@3_accuracy": 2 / 6, "knn@3_mcr": 1 / 2, "knn@3_rs": 0.0,
    }
    assert metrics == pytest.approx(expected)
    assert evaluator.metric_names(test) == list(expected)


def test_knn_classification_explicit_smallest_class():
    model, train, test = _knn_splits()
    metrics = KNNClassification(smallest_class=1).evaluate(model, test, resize_size=SIZE,
                                                           train=train)
    assert metrics["knn_rs"] == pytest.approx(1 / 2)


def test_knn_classification_check_errors():
    _, train, test = _knn_splits()
    KNNClassification(num_neighbors=(1, 6)).check(test, train)
    with pytest.raises(ValueError, match=r"needs the training split.*train=None"):
        KNNClassification().check(test)
    with pytest.raises(ValueError, match=r"training split has 6 items.*num_neighbors=7"):
        KNNClassification(num_neighbors=7).check(test, train)
    # The training split's smallest class (2) is absent from this evaluation split.
    without_class_2 = test.subset([0, 1, 2])
    with pytest.raises(ValueError, match=r"smallest_class 2 \(the training split's smallest\) "
                                         r"has no item.*\[0, 1\]"):
        KNNClassification().check(without_class_2, train)
    with pytest.raises(ValueError, match=r"smallest_class 2 \(given\)"):
        KNNClassification(smallest_class=2).check(without_class_2, train)
    KNNClassification(smallest_class=1).check(without_class_2, train)


# --- mAP@k ------------------------------------------------------------------------------------


def test_map_on_embeddings_by_hand():
    """Angles 0 (c0), 10 (c1), 25 (c0), 90 (c1); k=2, query excluded.

    0°  -> 10 (c1), 25 (c0): rel [0, 1] -> AP = P(2) = 1/2
    10° -> 0 (c0), 25 (c0):  rel [0, 0] -> AP = 0
    25° -> 10 (c1), 0 (c0):  rel [0, 1] -> AP = 1/2
    90° -> 25 (c0), 10 (c1): rel [0, 1] -> AP = 1/2
    mAP@2 = 1.5 / 4 = 0.375
    """
    angles = [0, 10, 25, 90]
    model = _table_model({value: _unit([angle])[0] for value, angle in enumerate(angles)})
    examples = _examples(range(4), [0, 1, 0, 1])
    metrics = MeanAveragePrecision(k=2).evaluate(model, examples, resize_size=SIZE)
    assert metrics == pytest.approx({"map@2": 0.375})


def test_map_on_hamming_codes_by_hand_with_ties():
    """Signs give codes x0=1111 (c0), x1=1110 (c1), x2=1101 (c0), x3=0000 (c1); 0.0 -> bit 0.

    Hamming distances: d01=1, d02=1, d03=4, d12=2, d13=3, d23=3. k=2, ties in index order:
    x0 -> x1 (1), x2 (1) tie: x1 first: rel [0, 1] -> AP 1/2 (x2 first would give 1)
    x1 -> x0 (1), x2 (2):            rel [0, 0] -> AP 0
    x2 -> x0 (1), x1 (2):            rel [1, 0] -> AP 1
    x3 -> x1 (3), x2 (3) tie: x1 first: rel [1, 0] -> AP 1
    mAP@2 = 2.5 / 4 = 0.625
    The magnitudes are chosen so that cosine on the real values ranks x2 before x1 for x0.
    """
    outputs = np.array([
        [0.9, 0.2, 0.1, 0.8],
        [0.1, 0.1, 0.9, -0.1],
        [0.9, 0.2, -0.01, 0.8],
        [-0.3, 0.0, -0.1, -2.0],
    ], np.float32)
    model = _table_model(dict(enumerate(outputs)), width=4)
    examples = _examples(range(4), [0, 1, 0, 1])
    metrics = MeanAveragePrecision(k=2, codes=True).evaluate(model, examples, resize_size=SIZE)
    assert metrics == pytest.approx({"map@2": 0.625})
    # The same outputs ranked by cosine differ (x0 -> x2 first), so the codes were used.
    real = MeanAveragePrecision(k=2).evaluate(model, examples, resize_size=SIZE)
    assert real["map@2"] != pytest.approx(0.625)


def _hamming_map_oracle(bits, labels, k):
    """Explicit loop: sort by (Hamming distance, index), query excluded, AP per paper eq. 3."""
    total = 0.0
    for query in range(len(bits)):
        ranked = sorted((int(np.sum(bits[query] != bits[item])), item)
                        for item in range(len(bits)) if item != query)
        relevant = [labels[item] == labels[query] for _, item in ranked[:k]]
        hits, precision_sum = 0, 0.0
        for rank, is_relevant in enumerate(relevant, start=1):
            if is_relevant:
                hits += 1
                precision_sum += hits / rank
        total += precision_sum / hits if hits else 0.0
    return total / len(bits)


def test_map_on_hamming_codes_matches_a_loop_with_many_ties():
    rng = np.random.default_rng(0)
    outputs = rng.normal(size=(30, 5)).astype(np.float32)  # 5 bits: many equal distances
    labels = rng.integers(0, 3, size=30)
    model = _table_model(dict(enumerate(outputs)), width=5)
    examples = _examples(range(30), labels, num_classes=3)
    for k in (1, 4, 10):
        metrics = MeanAveragePrecision(k=k, codes=True).evaluate(model, examples, resize_size=SIZE)
        assert metrics[f"map@{k}"] == pytest.approx(_hamming_map_oracle(outputs > 0, labels, k))


def _hamming_fixture():
    """The four outputs of the test above (codes 1111 c0, 1110 c1, 1101 c0, 0000 c1) and two test
    items (values 4, 5, both c0), as the "code" output of a hashing model and as a plain model's
    one output.

    Queries of the split itself, k=1, ties in index order (Hamming) or by cosine on the values:
      x0 -> x1 (1, tied with x2) c1 miss       cosine: x2 hit
      x1 -> x0 (1) c0 miss                     cosine: x0 miss
      x2 -> x0 (1) hit                         cosine: x0 hit
      x3 -> x1 (3, tied with x2) c1 hit        cosine: x1 hit
      Recall@1 = leave-one-out kNN accuracy = 2/4 (cosine: 3/4).
    Test items against the split, k=1:
      q0 = [.5, .5, .5, .5] (1111) -> x0 (0) c0 right      cosine: x0 right
      q1 = [-.1, -.1, -.1, .9] (0001) -> x3 (1) c1 wrong   cosine: x2 (c0) right
      Acc 1/2, MCR (only c0 queried) 1/2, RS (c0: lowest of the equal classes) 1/2; cosine: 1.
    """
    outputs = np.array([
        [0.9, 0.2, 0.1, 0.8],
        [0.1, 0.1, 0.9, -0.1],
        [0.9, 0.2, -0.01, 0.8],
        [-0.3, 0.0, -0.1, -2.0],
        [0.5, 0.5, 0.5, 0.5],
        [-0.1, -0.1, -0.1, 0.9],
    ], np.float32)
    rows = dict(enumerate(outputs))
    split = _examples(range(4), [0, 1, 0, 1], masks=np.zeros((4, SIZE, SIZE), np.uint8))
    test = _examples([4, 5], [0, 0], num_classes=2)
    return _hash_table_model(rows, 4), _table_model(rows, width=4), split, test, outputs


def test_a_hashing_model_is_ranked_by_hamming_distance():
    hasher, plain, split, test, outputs = _hamming_fixture()
    # mAP: codes default from the model's output kind; codes=False ranks the values by cosine.
    assert MeanAveragePrecision(k=2).evaluate(hasher, split, resize_size=SIZE) == pytest.approx(
        {"map@2": 0.625})
    by_cosine = MeanAveragePrecision(k=2).evaluate(plain, split, resize_size=SIZE)
    assert by_cosine["map@2"] != pytest.approx(0.625)
    assert MeanAveragePrecision(k=2, codes=False).evaluate(hasher, split, resize_size=SIZE) == \
        pytest.approx(by_cosine)

    assert RecallAtK(ks=(1,)).evaluate(hasher, split, resize_size=SIZE) == pytest.approx(
        {"recall@1": 2 / 4})
    assert RecallAtK(ks=(1,)).evaluate(plain, split, resize_size=SIZE) == pytest.approx(
        {"recall@1": 3 / 4})
    expected = {"knn_accuracy": 1 / 2, "knn_mcr": 1 / 2, "knn_rs": 1 / 2}
    assert KNNClassification().evaluate(hasher, test, resize_size=SIZE, train=split) == \
        pytest.approx(expected)
    assert KNNClassification().evaluate(plain, test, resize_size=SIZE, train=split) == \
        pytest.approx({"knn_accuracy": 1.0, "knn_mcr": 1.0, "knn_rs": 1.0})
    assert TrainingKNNClassification().evaluate(
        hasher, test, resize_size=SIZE, train=split)["knn_accuracy"] == pytest.approx(2 / 4)

    # The cache holds the retrieval output itself: the real-valued codes, not the mask.
    np.testing.assert_array_equal(OutputCache().embeddings(hasher, split, resize_size=SIZE),
                                  outputs[:4])


def test_segmentation_reads_the_mask_output_of_a_hashing_model():
    predictions, truths = _half_masks()
    examples = Examples(labels=[0, 0], sources="x", ids=["a", "b"], class_names=["0"],
                        images=np.repeat(predictions[..., None], 3, axis=-1), masks=truths)
    hasher = _hash_table_model({0: [1.0, -1.0], 255: [-1.0, 1.0]}, 2)
    metrics = SegmentationOverlap().evaluate(hasher, examples, resize_size=SIZE, batch_size=1)
    assert metrics == pytest.approx({"dice": 3 / 4, "iou": 2 / 3})
    without_mask = _hash_table_model({0: [1.0, -1.0]}, 2, with_mask=False)
    with pytest.raises(ValueError, match=r"SegmentationOverlap needs the model's 'mask' output. "
                                         r"Received a model with outputs \['code'\]"):
        SegmentationOverlap().evaluate(without_mask, examples, resize_size=SIZE)


def test_map_check():
    examples = _examples(range(4), [0, 1, 0, 1])
    MeanAveragePrecision(k=3).check(examples)
    with pytest.raises(ValueError, match=r"has 4 images; mAP@4 needs at least 5"):
        MeanAveragePrecision(k=4).check(examples)


# --- Segmentation ---------------------------------------------------------------------------


def _probability_model(size):
    """Probability of a pixel = red channel / 255."""
    return keras.Sequential([keras.Input((size, size, 3)),
                             keras.layers.Lambda(lambda images: images[..., :1] / 255.0)])


def _segmentation_batches():
    """Three 4×4 images in batches of 2 and 1; per image (Dice, IoU) by hand.

    img0: predicted 2 pixels (value 200) inside a true 2×2 square: Dice 4/6, IoU 2/4.
    img1: nothing predicted, nothing true: 1, 1.
    img2: one pixel at 130 (p 0.51, predicted) and one at 120 (p 0.47, not), true = the first:
          1, 1 at threshold 0.5; at threshold 0.6 nothing is predicted: 0, 0.
    Mean at 0.5: Dice (2/3 + 1 + 1)/3 = 8/9, IoU (1/2 + 1 + 1)/3 = 5/6. The mean of the two
    batch means would give Dice (5/6 + 1)/2 = 11/12 instead.
    """
    images = np.zeros((3, 4, 4, 3), np.float32)
    masks = np.zeros((3, 4, 4, 1), np.float32)
    images[0, 0, :2] = 200
    masks[0, :2, :2] = 1
    images[2, 3, 3] = 130
    images[2, 0, 0] = 120
    masks[2, 3, 3] = 1
    return [({"image": images[:2]}, {"mask": masks[:2]}),
            ({"image": images[2:]}, {"mask": masks[2:]})]


def test_segmentation_overlap_by_hand(monkeypatch):
    calls = []

    def fake_make_dataset(examples, **kwargs):
        calls.append(kwargs)
        return _segmentation_batches()

    monkeypatch.setattr(evaluators_module, "make_dataset", fake_make_dataset)
    examples = _examples(range(3), [0, 0, 0], masks=np.zeros((3, SIZE, SIZE), np.uint8))
    model = _probability_model(4)
    metrics = SegmentationOverlap().evaluate(model, examples, resize_size=6, batch_size=2)
    assert metrics == pytest.approx({"dice": 8 / 9, "iou": 5 / 6})
    assert calls[0] == {"training": False, "batch_size": 2, "image_size": 4, "resize_size": 6,
                        "fields": ("image", "mask")}
    strict = SegmentationOverlap(threshold=0.6).evaluate(model, examples, resize_size=6)
    assert strict == pytest.approx({"dice": (2 / 3 + 1 + 0) / 3, "iou": (1 / 2 + 1 + 0) / 3})
    assert SegmentationOverlap().metric_names(examples) == ["dice", "iou"]


def _half_masks():
    """img0 predicts its left half, its true mask is the top half: |T ∩ P| = 16, |T| = |P| = 32
    -> Dice 2·16/64 = 1/2, IoU 16/48 = 1/3. img1 predicts nothing and its mask is empty: 1, 1.
    Mean: Dice 3/4, IoU 2/3."""
    predictions = np.zeros((2, SIZE, SIZE), np.uint8)
    truths = np.zeros((2, SIZE, SIZE), np.uint8)
    predictions[0, :, :4] = 255
    truths[0, :4, :] = 255
    return predictions, truths


def test_segmentation_overlap_through_make_dataset_in_memory():
    predictions, truths = _half_masks()
    examples = Examples(labels=[0, 0], sources="x", ids=["a", "b"], class_names=["0"],
                        images=np.repeat(predictions[..., None], 3, axis=-1), masks=truths)
    metrics = SegmentationOverlap().evaluate(_probability_model(SIZE), examples,
                                             resize_size=SIZE, batch_size=1)
    assert metrics == pytest.approx({"dice": 3 / 4, "iou": 2 / 3})


def test_segmentation_overlap_through_make_dataset_on_disk(tmp_path):
    from PIL import Image

    predictions, truths = _half_masks()
    paths, mask_paths = [], []
    for index in range(2):
        paths.append(str(tmp_path / f"image{index}.png"))
        mask_paths.append(str(tmp_path / f"mask{index}.png"))
        Image.fromarray(np.repeat(predictions[index][..., None], 3, axis=-1)).save(paths[-1])
        Image.fromarray(truths[index]).save(mask_paths[-1])
    examples = Examples(labels=[0, 0], sources="x", ids=["a", "b"], class_names=["0"],
                        paths=paths, mask_paths=mask_paths)
    SegmentationOverlap().check(examples)
    metrics = SegmentationOverlap().evaluate(_probability_model(SIZE), examples,
                                             resize_size=SIZE, batch_size=2)
    assert metrics == pytest.approx({"dice": 3 / 4, "iou": 2 / 3})


def test_segmentation_check_errors(tmp_path):
    SegmentationOverlap().check(_examples(range(2), [0, 0],
                                          masks=np.zeros((2, SIZE, SIZE), np.uint8)))
    with pytest.raises(ValueError, match=r"needs ground-truth masks.*in-memory evaluation split "
                                         r"without masks"):
        SegmentationOverlap().check(_examples(range(2), [0, 0]))
    on_disk = dict(labels=[0, 0], sources="x", ids=["a", "b"], class_names=["0"],
                   paths=[str(tmp_path / "a.png"), str(tmp_path / "b.png")])
    with pytest.raises(ValueError, match=r"needs ground-truth masks.*on disk without mask_paths"):
        SegmentationOverlap().check(Examples(**on_disk))
    with pytest.raises(ValueError, match=r"mask for every item.*1 item\(s\).*\['b'\]"):
        SegmentationOverlap().check(Examples(**on_disk, mask_paths=["m0", ""]))


# --- Shared outputs, registry, callback, monitor --------------------------------------------


def test_outputs_are_computed_once_per_model_and_split(monkeypatch):
    model, train, test = _knn_splits()
    calls = []
    real_embed = evaluators_module.embed_examples

    def counting_embed(model, examples, **kwargs):
        calls.append(examples)
        return real_embed(model, examples, **kwargs)

    monkeypatch.setattr(evaluators_module, "embed_examples", counting_embed)
    specs = [{"name": "recall", "ks": (1, 2)}, {"name": "map", "k": 2}, "knn"]
    callback = Evaluation(specs, test, model=model, resize_size=SIZE, train=train)
    logs = {}
    callback.on_epoch_end(0, logs)
    assert len(calls) == 2 and calls[0] is test and calls[1] is train
    callback.on_epoch_end(1, logs)  # a new epoch has new weights: outputs are computed again
    assert len(calls) == 4
    cache = OutputCache()
    first = cache.embeddings(model, test, resize_size=SIZE)
    assert cache.embeddings(model, test, resize_size=SIZE) is first


def test_evaluation_writes_prefixed_keys_and_uses_the_deployable_model():
    model, train, test = _knn_splits()

    class Task(keras.Model):
        def __init__(self, deployable_model):
            super().__init__()
            self.deployable_model = deployable_model

    callback = Evaluation([KNNClassification(), MeanAveragePrecision(k=2)], test,
                          resize_size=SIZE, train=train, prefix="val_")
    callback.set_model(Task(model))
    logs = {"loss": 1.0}
    callback.on_epoch_end(0, logs)
    assert set(logs) == {"loss", "val_knn_accuracy", "val_knn_mcr", "val_knn_rs", "val_map@2"}
    assert logs["val_knn_accuracy"] == pytest.approx(4 / 6)
    assert all(isinstance(value, float) for value in logs.values())
    callback.on_epoch_end(0, None)  # Keras may call without logs: nothing to write, no error


def test_evaluation_keys_reach_later_callbacks_during_fit(tmp_path):
    model, train, test = _knn_splits()
    trainable = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    trainable.compile(optimizer="sgd", loss="mse")
    log_path = tmp_path / "log.csv"
    callbacks = [Evaluation(["knn"], test, model=model, resize_size=SIZE, train=train),
                 keras.callbacks.CSVLogger(str(log_path))]
    trainable.fit(np.zeros((4, 2)), np.zeros((4, 1)), epochs=1, verbose=0, callbacks=callbacks)
    with open(log_path) as file:
        row = next(csv.DictReader(file))
    assert float(row["val_knn_accuracy"]) == pytest.approx(4 / 6)


def test_evaluation_checks_before_training():
    _, examples = _two_source_split()
    with pytest.raises(ValueError, match=r"source 'b' has 3 images"):
        Evaluation([RecallAtK(ks=(1, 3))], examples, resize_size=SIZE)
    with pytest.raises(ValueError, match=r"needs the training split"):
        Evaluation(["knn"], examples, resize_size=SIZE)
    with pytest.raises(ValueError, match=r"log the same keys: \['val_recall@1'"):
        Evaluation([RecallAtK(ks=(1, 2)), RecallAtK(ks=(1,))],
                   examples.subset(examples.sources == "a"), resize_size=SIZE)
    with pytest.raises(ValueError, match=r"at least one evaluator"):
        Evaluation([], examples, resize_size=SIZE)


def test_check_monitor():
    _, examples = _two_source_split()
    check_monitor("val_recall@1_b", ["recall"], examples)
    check_monitor("val_map@10", {"name": "map", "k": 10}, examples)
    check_monitor("recall@2", [RecallAtK(ks=(2,))], examples, prefix="")
    with pytest.raises(ValueError, match=r"monitor 'val_recall@3' is produced by no evaluator; "
                                         r"available: \['val_recall@1', 'val_recall@2', "):
        check_monitor("val_recall@3", [RecallAtK(ks=(1, 2))], examples)
    with pytest.raises(ValueError, match=r"monitor 'val_dice' is produced by no evaluator; "
                                         r"available: \['val_knn_accuracy', 'val_knn_mcr', "
                                         r"'val_knn_rs'\]"):
        check_monitor("val_dice", ["knn"], examples)


def test_make_evaluator():
    assert isinstance(make_evaluator("recall"), RecallAtK)
    evaluator = make_evaluator({"name": "map", "k": 5, "codes": True})
    assert isinstance(evaluator, MeanAveragePrecision) and evaluator.k == 5 and evaluator.codes
    instance = SegmentationOverlap(threshold=0.3)
    assert make_evaluator(instance) is instance
    assert set(EVALUATORS) == {"recall", "knn", "map", "segmentation", "train_knn", "auc"}
    assert all(issubclass(cls, Evaluator) for cls in EVALUATORS.values())
    with pytest.raises(ValueError, match=r"name must be one of \['auc', 'knn', 'map', 'recall', "
                                         r"'segmentation', 'train_knn'\]. "
                                         r"Received: name='bogus'"):
        make_evaluator("bogus")
    with pytest.raises(ValueError, match=r"name must be one of .*Received: name='recal'"):
        make_evaluator({"name": "recal", "ks": (1,)})
    with pytest.raises(ValueError, match=r"needs a 'name' key. Received: spec=\{'k': 5\}"):
        make_evaluator({"k": 5})
    with pytest.raises(ValueError, match=r"Received: spec=3"):
        make_evaluator(3)
    with pytest.raises(ValueError, match=r"evaluator 'map' accepts \['k', 'codes', 'metric'\]. "
                                         r"Received unknown arguments \['bogus'\]"):
        make_evaluator({"name": "map", "bogus": 1})


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"ks must be a positive integer or a non-empty "
                                         r"sequence of them. Received: ks=\(1, 0\)"):
        RecallAtK(ks=(1, 0))
    with pytest.raises(ValueError, match=r"Received: ks=\(\)"):
        RecallAtK(ks=())
    with pytest.raises(ValueError, match=r"Received: num_neighbors=1.5"):
        KNNClassification(num_neighbors=1.5)
    with pytest.raises(ValueError, match=r"must not repeat a value. Received: num_neighbors="
                                         r"\(1, 1\)"):
        KNNClassification(num_neighbors=(1, 1))
    with pytest.raises(ValueError, match=r"smallest_class must be a class index or None"):
        KNNClassification(smallest_class="tumour")
    with pytest.raises(ValueError, match=r"metric must be one of .*Received: metric='hamming'"):
        KNNClassification(metric="hamming")
    with pytest.raises(ValueError, match=r"k must be a positive integer. Received: k=0"):
        MeanAveragePrecision(k=0)
    with pytest.raises(ValueError, match=r"metric must be one of .*Received: metric='l1'"):
        MeanAveragePrecision(metric="l1")
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\). Received: threshold=1"):
        SegmentationOverlap(threshold=1)


def test_recall_hits_per_source_matches_a_brute_force_loop():
    from tfmir.data import Examples
    from tfmir.training import recall_hits_per_source

    rng = np.random.default_rng(4)
    count = 40
    embeddings = rng.normal(size=(count, 6)).astype("float32")
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    labels = rng.integers(0, 3, count)
    sources = np.where(np.arange(count) % 3 == 0, "b", "a")
    examples = Examples(labels=labels, sources=sources, ids=[str(i) for i in range(count)],
                        class_names=("x", "y", "z"), images=np.zeros((count, 8, 8, 3), np.uint8))
    for k in (1, 3):
        expected = np.zeros(count)
        for query in range(count):
            others = [item for item in range(count)
                      if item != query and sources[item] == sources[query]]
            nearest = sorted(others, key=lambda item: -float(embeddings[query] @ embeddings[item]))
            expected[query] = float(any(labels[item] == labels[query] for item in nearest[:k]))
        np.testing.assert_array_equal(recall_hits_per_source(examples, embeddings, k), expected)


# --- BinaryAUC (paper 003's member and ensemble AUC) ---------------------------------------------


def _brightness_classifier(side=8):
    """A model whose "probability" is the mean pixel / 255 (fixed weights, no training)."""
    images = keras.Input((side, side, 3))
    mean = keras.layers.GlobalAveragePooling2D()(images)
    probability = keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(1 / 765),
                                     bias_initializer="zeros")(mean)
    return keras.Model(images, {"probability": probability, "embedding": mean})


def test_binary_auc_against_the_pairwise_definition():
    rng = np.random.default_rng(0)
    levels = rng.integers(0, 255, 12)
    labels = np.array([0, 1, 2] * 4)
    images = np.broadcast_to(levels[:, None, None, None], (12, 8, 8, 3)).astype(np.uint8)
    examples = Examples(labels=labels, sources="s", ids=[str(i) for i in range(12)],
                        class_names=("bkl", "mel", "nv"), images=images)
    positive = labels == 1  # "mel" against the rest
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0
             for p in levels[positive] for n in levels[~positive]]
    evaluator = BinaryAUC("mel")
    evaluator.check(examples)
    result = evaluator.evaluate(_brightness_classifier(), examples, resize_size=8)
    assert result == {"auc": pytest.approx(np.mean(pairs), abs=1e-12)}
    assert make_evaluator({"name": "auc", "positive_class": 1}).positive_class == 1


def test_binary_auc_refusals():
    examples = Examples(labels=[0, 0], sources="s", ids=["a", "b"], class_names=("nv", "mel"),
                        images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"BinaryAUC needs positive \('mel'\) and negative items"):
        BinaryAUC("mel").check(examples)
    with pytest.raises(ValueError, match=r"positive_class must be one of the classes"):
        BinaryAUC("melanoma").check(examples)
    images = keras.Input((8, 8, 3))
    embedder = keras.Model(images, keras.layers.GlobalAveragePooling2D()(images))
    with pytest.raises(ValueError, match="BinaryAUC needs the model's 'probability' output"):
        BinaryAUC("mel").evaluate(embedder, examples, resize_size=8)
