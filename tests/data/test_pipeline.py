"""Tests for tfmir.data.pipeline, eagerly and inside tf.data (STYLE.md: they differ)."""

import csv
import io
import itertools
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfmir.data import (
    ClassBalancedSampler,
    Examples,
    ReplicaShard,
    ShuffledSampler,
    SourceAwareSampler,
    decode_image,
    load_csv_manifest,
    load_image_folder,
    load_medmnist_npz,
    make_dataset,
    preprocess_image,
)


def _encode(pixels, format_name, **save_options):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format_name, **save_options)
    return buffer.getvalue()


def _decode_in_dataset(encoded: bytes) -> np.ndarray:
    dataset = tf.data.Dataset.from_tensors(tf.constant(encoded)).map(decode_image)
    return next(iter(dataset)).numpy()


def _decode_both_ways(encoded: bytes) -> np.ndarray:
    eager = decode_image(tf.constant(encoded)).numpy()
    np.testing.assert_array_equal(eager, _decode_in_dataset(encoded))
    assert eager.dtype == np.uint8 and eager.shape[-1] == 3
    return eager


def _indexed_examples(num_items, labels=None, size=6):
    """In-memory images whose every pixel holds the item's index, so outputs reveal the index."""
    labels = np.arange(num_items) % 3 if labels is None else np.asarray(labels)
    images = np.broadcast_to(np.arange(num_items, dtype=np.uint8)[:, None, None, None],
                             (num_items, size, size, 3)).copy()
    return Examples(labels=labels, sources="s", ids=[str(i) for i in range(num_items)],
                    class_names=tuple(str(i) for i in range(int(labels.max()) + 1)), images=images)


def _indices_of(images) -> np.ndarray:
    """Recovers the item index from a batch made by `_indexed_examples` (constant images)."""
    images = np.asarray(images)
    np.testing.assert_allclose(images.min(axis=(1, 2, 3)), images.max(axis=(1, 2, 3)), atol=1e-3)
    return np.rint(images[:, 0, 0, 0]).astype(np.int64)


# --- decode_image --------------------------------------------------------------------------------


def test_decode_png_rgb_gray_and_rgba():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decode_both_ways(_encode(rgb, "PNG")), rgb)
    gray = rgb[..., 0]
    decoded = _decode_both_ways(_encode(gray, "PNG"))
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], gray)
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 9, np.uint8)], axis=-1)
    np.testing.assert_array_equal(_decode_both_ways(_encode(rgba, "PNG")), rgb)


def test_decode_16_bit_png_scales_the_full_range():
    pixels = np.array([[0, 128, 129, 257], [1000, 32896, 40000, 65535]], np.uint16)
    # round(v / 257), worked by hand: 128/257=0.498 -> 0, 129/257=0.502 -> 1, 1000/257=3.89 -> 4,
    # 32896 = 128*257 -> 128, 40000/257=155.64 -> 156, 65535 = 255*257 -> 255.
    expected = np.array([[0, 0, 1, 1], [4, 128, 156, 255]], np.uint8)
    encoded = _encode(pixels, "PNG")
    assert Image.open(io.BytesIO(encoded)).mode == "I;16"
    decoded = _decode_both_ways(encoded)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], expected)


def test_decode_jpeg_bmp_gif():
    rng = np.random.default_rng(1)
    smooth = np.repeat(np.repeat(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), 8, 0), 8, 1)
    decoded = _decode_both_ways(_encode(smooth, "JPEG", quality=95))
    reference = np.asarray(Image.open(io.BytesIO(_encode(smooth, "JPEG", quality=95))))
    assert decoded.shape == (32, 32, 3)
    assert np.abs(decoded.astype(int) - reference.astype(int)).mean() < 2  # decoder rounding
    np.testing.assert_array_equal(_decode_both_ways(_encode(smooth, "BMP")), smooth)
    palette = np.zeros((3, 4, 3), np.uint8)
    palette[1] = (255, 0, 0)
    np.testing.assert_array_equal(_decode_both_ways(_encode(palette, "GIF")), palette)


def test_decode_image_traces_to_core_ops_for_serving():
    """A serving signature over a batch of encoded images: core TF ops only, no Python."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def serve(encoded_images):
        return tf.map_fn(
            lambda encoded: preprocess_image(decode_image(encoded), training=False,
                                             image_size=4, resize_size=6),
            encoded_images, fn_output_signature=tf.float32)

    graph = serve.get_concrete_function().graph.as_graph_def()
    op_types = {node.op for node in graph.node}
    op_types |= {node.op for function in graph.library.function for node in function.node_def}
    assert not op_types & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}
    pixels = np.random.default_rng(3).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    served = serve(tf.constant([_encode(pixels, "PNG"), _encode(pixels[..., 0], "PNG")])).numpy()
    np.testing.assert_array_equal(served[0], pixels[1:5, 1:5].astype(np.float32))
    np.testing.assert_array_equal(served[1, ..., 2], pixels[1:5, 1:5, 0].astype(np.float32))


# --- preprocess_image ----------------------------------------------------------------------------


def test_central_crop_picks_the_centre_pixels():
    image = np.arange(9 * 9 * 3, dtype=np.float32).reshape(9, 9, 3)
    # resize_size equal to the input: the resize is the identity; (9 - 5) // 2 = 2 -> rows 2..6.
    cropped = preprocess_image(image, training=False, image_size=5, resize_size=9).numpy()
    np.testing.assert_array_equal(cropped, image[2:7, 2:7])
    uint8_image = (np.arange(8 * 8 * 3) % 256).astype(np.uint8).reshape(8, 8, 3)
    cropped = preprocess_image(uint8_image, training=False, image_size=4, resize_size=8)
    assert cropped.dtype == tf.float32
    np.testing.assert_array_equal(cropped.numpy(), uint8_image[2:6, 2:6].astype(np.float32))


def test_resize_keeps_constant_images_constant_in_range():
    image = np.full((28, 40, 3), 200, np.uint8)
    for size in (16, 64):  # shrinking (antialiased) and enlarging
        output = preprocess_image(image, training=False, image_size=size, resize_size=size).numpy()
        assert output.shape == (size, size, 3)
        np.testing.assert_allclose(output, 200.0, atol=1e-3)


def _preprocess_in_dataset(images, **kwargs):
    dataset = tf.data.Dataset.from_tensor_slices(images).map(
        lambda image: preprocess_image(image, **kwargs))
    return np.stack([output.numpy() for output in dataset])


def test_preprocess_eager_and_in_dataset_agree(shared_data_dir):
    path = shared_data_dir / "retinamnist" / "retinamnist.npz"
    images = load_medmnist_npz(path)["val"].images[:4]
    options = dict(training=False, image_size=56, resize_size=64)
    eager = np.stack([preprocess_image(image, **options).numpy() for image in images])
    np.testing.assert_array_equal(eager, _preprocess_in_dataset(images, **options))
    np.testing.assert_array_equal(eager, preprocess_image(images, **options).numpy())  # batch
    seed = tf.constant([3, 4], tf.int64)
    training = dict(training=True, image_size=56, resize_size=64, seed=seed)
    eager = np.stack([preprocess_image(image, **training).numpy() for image in images])
    np.testing.assert_array_equal(eager, _preprocess_in_dataset(images, **training))


def test_training_output_is_a_random_crop_maybe_flipped():
    image = np.random.default_rng(2).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    resized = image.astype(np.float32)  # resize_size == 12: identity
    candidates = {}
    for top, left, flip in itertools.product(range(5), range(5), (False, True)):
        crop = resized[top:top + 8, left:left + 8]
        candidates[(top, left, flip)] = crop[:, ::-1] if flip else crop
    found = set()
    for seed in range(40):
        output = preprocess_image(image, training=True, image_size=8, resize_size=12,
                                  seed=tf.constant([seed, 0])).numpy()
        matches = [key for key, crop in candidates.items() if np.array_equal(crop, output)]
        assert len(matches) == 1
        found.add(matches[0])
    assert len(found) > 20 and {key[2] for key in found} == {False, True}


def test_mask_is_resized_with_nearest_neighbour_and_stays_binary():
    mask = np.array([[0, 255, 0], [255, 0, 0], [0, 0, 255]], np.uint8)[..., None]
    image = np.zeros((3, 3, 3), np.uint8)
    # Doubling the side with half-pixel centres: output pixel j reads input floor((j + 0.5) / 2)
    # = j // 2, so each input pixel becomes a 2x2 block.
    expected = np.repeat(np.repeat(mask // 255, 2, axis=0), 2, axis=1).astype(np.float32)
    options = dict(training=False, image_size=6, resize_size=6)
    _, enlarged = preprocess_image(image, mask=mask, **options)
    np.testing.assert_array_equal(enlarged.numpy(), expected)
    dataset = tf.data.Dataset.from_tensors((image, mask)).map(
        lambda image, mask: preprocess_image(image, mask=mask, **options)[1])
    np.testing.assert_array_equal(next(iter(dataset)).numpy(), expected)
    pattern = (np.random.default_rng(4).random((2, 17, 13, 1)) < 0.4).astype(np.uint8)
    for side in (5, 16, 40):  # shrinking, just below, enlarging
        _, masks = preprocess_image(np.zeros((2, 17, 13, 3), np.uint8), mask=pattern,
                                    training=True, image_size=side, resize_size=side,
                                    seed=tf.constant([side, 0]))
        assert masks.dtype == tf.float32 and masks.shape == (2, side, side, 1)
        assert set(np.unique(masks.numpy()).tolist()) <= {0.0, 1.0}


def test_mask_must_match_its_image():
    image = np.zeros((6, 6, 3), np.uint8)
    with pytest.raises(ValueError, match=re.escape("mask must be shaped like the image with one "
                                                   "channel, (H, W, 1). Received shape (6, 6)")):
        preprocess_image(image, mask=np.zeros((6, 6), np.uint8), training=False, image_size=4,
                         resize_size=6)
    with pytest.raises(tf.errors.InvalidArgumentError, match="mask and image differ"):
        preprocess_image(image, mask=np.zeros((5, 6, 1), np.uint8), training=False, image_size=4,
                         resize_size=6)


# --- make_dataset ------------------------------------------------------------------------------

THRESHOLD = 127


def _positional_images(num_items, size=12):
    """Images whose channel 0 hashes (item, row, column), so every crop and flip is told apart."""
    item, row, column = np.meshgrid(np.arange(num_items), np.arange(size), np.arange(size),
                                    indexing="ij")
    channels = [(53 * item + 37 * row + 101 * column) % 256, 20 * row + column, 20 * column + row]
    return np.stack(channels, axis=-1).astype(np.uint8)


def _masked_examples(num_items, size=12, foreground=255):
    """In-memory items with label = index and a mask drawn from the image: channel 0 > 127."""
    images = _positional_images(num_items, size)
    masks = (images[..., 0] > THRESHOLD).astype(np.uint8) * foreground
    return Examples(labels=np.arange(num_items), sources="s",
                    ids=[str(i) for i in range(num_items)],
                    class_names=tuple(str(i) for i in range(num_items)), images=images,
                    masks=masks)


def _crop_of(output, source, image_size):
    """(top, left, flipped) of the one crop of `source` that `output` is (brute force)."""
    side = source.shape[0]
    found = []
    for top, left, flip in itertools.product(range(side - image_size + 1),
                                             range(side - image_size + 1), (False, True)):
        crop = source[top:top + image_size, left:left + image_size]
        if np.array_equal(crop[:, ::-1] if flip else crop, output):
            found.append((top, left, flip))
    assert len(found) == 1, found
    return found[0]


def _assert_masks_follow_images(dataset, source_images, source_masks, image_size):
    """Each output mask is its image's crop of the source mask, and equals image[..., 0] > 127."""
    crops = set()
    for inputs, targets in dataset:
        images, masks = inputs["image"].numpy(), targets["mask"].numpy()
        assert set(np.unique(masks).tolist()) <= {0.0, 1.0}
        np.testing.assert_array_equal(masks[..., 0], images[..., 0] > THRESHOLD)
        for image, mask, label in zip(images, masks, targets["label"].numpy()):
            top, left, flip = _crop_of(image, source_images[label].astype(np.float32), image_size)
            expected = source_masks[label][top:top + image_size, left:left + image_size] != 0
            np.testing.assert_array_equal(mask[..., 0], expected[:, ::-1] if flip else expected)
            crops.add((top, left, flip))
    return crops


def test_in_memory_masks_are_cropped_and_flipped_with_their_images():
    for foreground in (1, 255):
        examples = _masked_examples(6, foreground=foreground)
        crops = set()
        for seed in range(3):
            dataset = make_dataset(examples, training=True, batch_size=4, image_size=8,
                                   resize_size=12, fields=("image", "label", "mask"), seed=seed)
            crops |= _assert_masks_follow_images(dataset.take(3), examples.images,
                                                 examples.masks, image_size=8)
        assert len(crops) > 20 and {flip for _, _, flip in crops} == {False, True}


def _write_masked_files(root, num_items, mask_kinds):
    """PNG images and masks (mask_kinds[i]: "0/255", "0/1" or "rgb") of `_masked_examples`."""
    root.mkdir(parents=True)
    images = _positional_images(num_items)
    masks = (images[..., 0] > THRESHOLD).astype(np.uint8)
    paths, mask_paths = [], []
    for index in range(num_items):
        kind = mask_kinds[index % len(mask_kinds)]
        mask = {"0/255": masks[index] * 255, "0/1": masks[index],
                "rgb": np.repeat(masks[index][..., None] * 255, 3, axis=-1)}[kind]
        paths.append(str(root / f"{index:02d}.png"))
        mask_paths.append(str(root / f"m{index:02d}.png"))
        Image.fromarray(images[index]).save(paths[-1])
        Image.fromarray(mask).save(mask_paths[-1])
    examples = Examples(labels=np.arange(num_items), sources="s",
                        ids=[f"{index:02d}.png" for index in range(num_items)],
                        class_names=tuple(str(i) for i in range(num_items)), paths=paths,
                        mask_paths=mask_paths)
    return examples, images, masks


def test_mask_files_are_cropped_and_flipped_with_their_images(tmp_path):
    examples, images, masks = _write_masked_files(tmp_path / "files", 6, ["0/255", "0/1", "rgb"])
    modes = [Image.open(path).mode for path in examples.mask_paths[:3]]
    assert modes == ["L", "L", "RGB"]
    crops = set()
    for seed in range(3):
        dataset = make_dataset(examples, training=True, batch_size=4, image_size=8,
                               resize_size=12, fields=("image", "label", "mask"), seed=seed)
        crops |= _assert_masks_follow_images(dataset.take(3), images, masks, image_size=8)
    assert {flip for _, _, flip in crops} == {False, True}
    evaluation = make_dataset(examples, training=False, batch_size=4, image_size=8,
                              resize_size=12, fields=("image", "label", "mask"))
    assert _assert_masks_follow_images(evaluation, images, masks, image_size=8) == {(2, 2, False)}


FIELD_COMBINATIONS = [("image",), ("image", "label"), ("image", "source"), ("image", "mask"),
                      ("mask", "image", "label"), ("image", "label", "source", "mask")]


def _check_structure(element, fields, batch_shape, image_size):
    targets = [field for field in fields if field != "image"]
    if targets:
        inputs, target_dict = element
        assert sorted(target_dict) == sorted(targets)
    else:
        inputs, target_dict = element, {}
    assert list(inputs) == ["image"]
    assert inputs["image"].dtype == tf.float32
    assert tuple(inputs["image"].shape) == (*batch_shape, image_size, image_size, 3)
    expected = {"label": (tf.int64, batch_shape), "source": (tf.int32, batch_shape),
                "mask": (tf.float32, (*batch_shape, image_size, image_size, 1))}
    for field, value in target_dict.items():
        assert (value.dtype, tuple(value.shape)) == expected[field], field


def _same_element(*element):
    return element if len(element) > 1 else element[0]


@pytest.mark.parametrize("fields", FIELD_COMBINATIONS)
def test_elements_are_dicts_of_the_requested_fields(tmp_path, fields):
    in_memory = _masked_examples(6)
    on_disk, _, _ = _write_masked_files(tmp_path / "files", 6, ["0/255"])
    for examples in (in_memory, on_disk):
        for training, batch_size, batch_shape in [(True, 4, (4,)), (False, None, ())]:
            dataset = make_dataset(examples, training=training, batch_size=batch_size,
                                   image_size=8, resize_size=12, fields=fields)
            _check_structure(next(iter(dataset)), fields, batch_shape, 8)
            # A further tf.data map (a model's input pipeline) receives the same structure.
            mapped = dataset.map(_same_element)
            assert mapped.element_spec == dataset.element_spec
            _check_structure(next(iter(mapped)), fields, batch_shape, 8)


def test_eval_dataset_keeps_order_and_partial_batch():
    examples = _indexed_examples(10)
    dataset = make_dataset(examples, training=False, batch_size=4, image_size=4, resize_size=6)
    batches = list(dataset)
    assert [len(targets["label"]) for _, targets in batches] == [4, 4, 2]
    images = np.concatenate([inputs["image"].numpy() for inputs, _ in batches])
    labels = np.concatenate([targets["label"].numpy() for _, targets in batches])
    assert images.dtype == np.float32 and images.shape == (10, 4, 4, 3)
    assert _indices_of(images).tolist() == list(range(10))
    assert labels.dtype == np.int64 and labels.tolist() == examples.labels.tolist()
    only_images = make_dataset(examples, training=False, batch_size=4, fields=("image",),
                               image_size=4, resize_size=6)
    assert list(next(iter(only_images))) == ["image"]
    single = list(make_dataset(examples, training=False, image_size=4, resize_size=6))
    inputs, targets = single[3]
    assert inputs["image"].shape == (4, 4, 3) and int(targets["label"]) == examples.labels[3]


def test_eval_dataset_matches_eager_preprocessing(shared_data_dir):
    examples = load_medmnist_npz(shared_data_dir / "retinamnist" / "retinamnist.npz")["test"]
    examples = examples.subset(np.arange(6))
    dataset = make_dataset(examples, training=False, batch_size=4, image_size=48, resize_size=56,
                           fields=("image",))
    from_dataset = np.concatenate([element["image"].numpy() for element in dataset])
    eager = np.stack([preprocess_image(image, training=False, image_size=48,
                                       resize_size=56).numpy() for image in examples.images])
    np.testing.assert_array_equal(from_dataset, eager)


def test_training_without_a_sampler_draws_shuffled_sampler_batches():
    examples = _indexed_examples(10)
    make = lambda seed: make_dataset(examples, training=True, batch_size=4, image_size=4,  # noqa
                                     resize_size=6, seed=seed)
    batches = [_indices_of(inputs["image"]) for inputs, _ in make(0).take(5)]
    expected = list(itertools.islice(iter(ShuffledSampler(10, batch_size=4, seed=0)), 5))
    assert [batch.tolist() for batch in batches] == [batch.tolist() for batch in expected]
    first_epoch = np.concatenate(batches[:2])  # 10 // 4 = 2 batches per permutation
    assert len(set(first_epoch.tolist())) == 8 and first_epoch.tolist() != list(range(8))
    again = [_indices_of(inputs["image"]) for inputs, _ in make(0).take(5)]
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    with pytest.raises(ValueError, match="training without a sampler needs a batch_size"):
        make_dataset(examples, training=True)
    with pytest.raises(ValueError, match="draws shuffled batches.*Received: shuffle=False"):
        make_dataset(examples, training=True, batch_size=4, shuffle=False)


def test_sampler_dataset_yields_the_sampler_batches():
    labels = np.repeat(np.arange(4), 6)
    examples = _indexed_examples(len(labels), labels=labels)
    sampler = ClassBalancedSampler(labels, num_classes_per_batch=2, num_per_class=3, seed=5)
    dataset = make_dataset(examples, training=True, sampler=sampler, image_size=4, resize_size=6)
    expected = list(itertools.islice(iter(sampler), 4))
    for (inputs, targets), indices in zip(dataset.take(4), expected):
        assert inputs["image"].shape == (6, 4, 4, 3)
        assert _indices_of(inputs["image"]).tolist() == indices.tolist()
        assert targets["label"].numpy().tolist() == labels[indices].tolist()
    with pytest.raises(ValueError, match="differs from the sampler"):
        make_dataset(examples, training=True, sampler=sampler, batch_size=5)
    with pytest.raises(ValueError, match="shuffle"):
        make_dataset(examples, training=True, sampler=sampler, shuffle=True)
    with pytest.raises(ValueError, match="24 items"):
        make_dataset(examples.subset(np.arange(10)), training=True, sampler=sampler)


def test_replica_shards_feed_slices_of_the_global_batches():
    labels = np.repeat(np.arange(4), 6)
    examples = _indexed_examples(len(labels), labels=labels)
    sampler = ClassBalancedSampler(labels, num_classes_per_batch=4, num_per_class=2, seed=1)
    global_batches = list(itertools.islice(iter(sampler), 3))
    for replica_index in range(2):
        shard = ReplicaShard(sampler, num_replicas=2, replica_index=replica_index)
        dataset = make_dataset(examples, training=True, sampler=shard, image_size=4,
                               resize_size=6)
        for (inputs, _), batch in zip(dataset.take(3), global_batches):
            assert _indices_of(inputs["image"]).tolist() == \
                batch[4 * replica_index:4 * replica_index + 4].tolist()


def _write_indexed_files(root, formats):
    """One class folder; file i is a constant image of value 10 * i in format formats[i]."""
    (root / "c").mkdir(parents=True)
    for index, (extension, mode) in enumerate(formats):
        pixels = np.full((8 + index, 9, 3), 10 * index, np.uint8)
        # An adaptive palette holds the one colour exactly (the default web palette dithers).
        palette = Image.Palette.ADAPTIVE if mode == "P" else Image.Palette.WEB
        image = Image.fromarray(pixels).convert(mode, palette=palette)
        image.save(root / "c" / f"{index:02d}{extension}")


def test_files_on_disk_decode_in_order_including_pil_formats(tmp_path):
    formats = [(".png", "RGB"), (".jpg", "L"), (".png", "RGBA"), (".bmp", "P"), (".tif", "RGB"),
               (".gif", "RGB"), (".bmp", "RGB")]
    _write_indexed_files(tmp_path / "files", formats)
    examples = load_image_folder(tmp_path / "files")
    dataset = make_dataset(examples, training=False, batch_size=3, image_size=4, resize_size=6)
    images = np.concatenate([inputs["image"].numpy() for inputs, _ in dataset])
    assert images.shape == (len(formats), 4, 4, 3)
    np.testing.assert_allclose(images[:, 0, 0, 0], 10.0 * np.arange(len(formats)), atol=1.0)
    np.testing.assert_allclose(images.min(axis=(1, 2, 3)), images.max(axis=(1, 2, 3)), atol=1.0)


def test_files_on_disk_with_sampler(tmp_path):
    _write_indexed_files(tmp_path / "files", [(".png", "RGB")] * 8)
    examples = load_image_folder(tmp_path / "files")
    examples = Examples(labels=np.arange(8) % 2, sources="s", ids=examples.ids,
                        class_names=("a", "b"), paths=examples.paths)
    sampler = ClassBalancedSampler(examples.labels, num_classes_per_batch=2, num_per_class=2)
    dataset = make_dataset(examples, training=True, sampler=sampler, image_size=4, resize_size=6)
    for (inputs, targets), indices in zip(dataset.take(3), iter(sampler)):
        assert inputs["image"].shape == (4, 4, 4, 3)
        np.testing.assert_allclose(inputs["image"].numpy()[:, 0, 0, 0], 10.0 * indices,
                                   atol=1e-3)
        assert targets["label"].numpy().tolist() == (indices % 2).tolist()


def test_source_indices_follow_source_names_in_memory_and_on_disk(tmp_path):
    # Sources out of alphabetical order: the index is the position in the sorted source_names.
    sources = np.array(["xray", "derm", "retina", "derm", "xray", "retina"] * 2)
    labels = np.searchsorted(["derm", "retina", "xray"], sources) * 2 + np.arange(12) % 2
    in_memory = _indexed_examples(12, labels=labels)
    in_memory = Examples(labels=labels, sources=sources, ids=in_memory.ids,
                         class_names=tuple(str(i) for i in range(6)), images=in_memory.images)
    _write_indexed_files(tmp_path / "files", [(".png", "RGB")] * 12)
    files = load_image_folder(tmp_path / "files")
    on_disk = Examples(labels=labels, sources=sources, ids=files.ids,
                       class_names=in_memory.class_names, paths=files.paths)
    expected_index = {"derm": 0, "retina": 1, "xray": 2}
    fields = ("image", "label", "source")
    for examples, pixel_scale in [(in_memory, 1.0), (on_disk, 10.0)]:
        evaluation = make_dataset(examples, training=False, batch_size=5, image_size=4,
                                  resize_size=6, fields=fields)
        source_indices = np.concatenate([targets["source"].numpy() for _, targets in evaluation])
        assert source_indices.dtype == np.int32
        assert source_indices.tolist() == [expected_index[name] for name in sources]
        sampler = SourceAwareSampler(labels, sources, num_classes_per_batch=2, num_per_class=2)
        training = make_dataset(examples, training=True, sampler=sampler, image_size=4,
                                resize_size=6, fields=fields)
        for (inputs, targets), indices in zip(training.take(4), sampler):
            np.testing.assert_allclose(inputs["image"].numpy()[:, 0, 0, 0], pixel_scale * indices,
                                       atol=1e-3)
            assert targets["label"].numpy().tolist() == labels[indices].tolist()
            assert targets["source"].numpy().tolist() == [expected_index[name]
                                                          for name in sources[indices]]


def test_fields_are_validated():
    examples = _indexed_examples(4)
    with pytest.raises(ValueError, match=re.escape(
            "unknown field 'boxes'; fields are drawn from ('image', 'label', 'source', 'mask'). "
            "Received: fields=('image', 'boxes')")):
        make_dataset(examples, training=False, fields=("image", "boxes"))
    with pytest.raises(ValueError, match=re.escape(
            "fields must include 'image'. Received: fields=('label',)")):
        make_dataset(examples, training=False, fields=("label",))
    with pytest.raises(ValueError, match=re.escape(
            "fields must be a sequence of field names such as ('image', 'label'). "
            "Received: fields='image'")):
        make_dataset(examples, training=False, fields="image")


def test_asking_for_masks_that_do_not_exist_is_refused(tmp_path):
    with pytest.raises(ValueError, match=re.escape(
            "examples has no masks (masks is None; in-memory images take `masks`, images on disk "
            "`mask_paths`), but fields asks for 'mask'. Received: fields=('image', 'mask')")):
        make_dataset(_indexed_examples(4), training=True, batch_size=2, fields=("image", "mask"))
    _write_indexed_files(tmp_path / "files", [(".png", "RGB")] * 2)
    files = load_image_folder(tmp_path / "files")
    with pytest.raises(ValueError, match=re.escape("examples has no masks (mask_paths is None")):
        make_dataset(files, training=False, fields=("image", "mask"))


def test_an_item_without_a_mask_file_is_named(tmp_path):
    examples, _, _ = _write_masked_files(tmp_path / "files", 4, ["0/255"])
    mask_paths = examples.mask_paths.copy()
    mask_paths[[1, 3]] = ""
    examples = Examples(labels=examples.labels, sources="s", ids=examples.ids,
                        class_names=examples.class_names, paths=examples.paths,
                        mask_paths=mask_paths)
    with pytest.raises(ValueError, match=re.escape(
            "item '01.png' has no mask (its mask path is \"\"); 2 of 4 items have none")):
        make_dataset(examples, training=True, batch_size=2, fields=("image", "mask"))
    make_dataset(examples, training=True, batch_size=2)  # masks not asked for: fine


def test_a_mask_file_of_another_size_is_named(tmp_path):
    examples, _, _ = _write_masked_files(tmp_path / "files", 3, ["0/255"])
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(examples.mask_paths[2])
    with pytest.raises(ValueError, match=re.escape(
            f"mask {examples.mask_paths[2]} is 10x12 (height x width) but its image "
            f"{examples.paths[2]} is 12x12")):
        make_dataset(examples, training=False, batch_size=2, fields=("image", "mask"))


def test_real_lesion_masks_from_a_manifest(tmp_path, shared_data_dir):
    """PH2 dermoscopy: JPEG images with 0/255 PNG lesion masks, listed in a CSV manifest."""
    ph2 = shared_data_dir / "ph2"
    with open(ph2 / "labels.csv", newline="") as file:
        rows = list(csv.DictReader(file))[:3]
    with open(tmp_path / "manifest.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label", "mask"])
        for row in rows:
            writer.writerow([ph2 / row["image"], row["diagnosis_name"], ph2 / row["mask"]])
    examples = load_csv_manifest(tmp_path / "manifest.csv", source="ph2")
    options = dict(image_size=64, resize_size=96)
    evaluation = make_dataset(examples, training=False, batch_size=3,
                              fields=("image", "mask"), **options)
    inputs, targets = next(iter(evaluation))
    for index, row in enumerate(rows):
        image = decode_image(tf.io.read_file(str(ph2 / row["image"])))  # JPEG: TF's decoder
        mask = np.asarray(Image.open(ph2 / row["mask"]))[..., None]
        expected_image, expected_mask = preprocess_image(image, mask=mask, training=False,
                                                         **options)
        np.testing.assert_array_equal(inputs["image"][index], expected_image)
        np.testing.assert_array_equal(targets["mask"][index], expected_mask)
        assert 0 < float(np.mean(targets["mask"][index])) < 1  # a lesion on skin
    training = make_dataset(examples, training=True, batch_size=2, fields=("image", "mask"),
                            **options)
    for _, targets in training.take(2):
        assert set(np.unique(targets["mask"]).tolist()) == {0.0, 1.0}


def test_files_whose_names_are_not_utf8_are_read(tmp_path):
    # A name with bytes that are not UTF-8 (os.fsdecode keeps them as surrogate escapes).
    path = os.fsdecode(os.fsencode(str(tmp_path)) + b"/scan\xff\xfe.png")
    pixels = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    Image.fromarray(pixels).save(os.fsencode(path), format="PNG")
    examples = Examples(labels=[0], sources="s", ids=["a"], class_names=("x",), paths=[path])
    (element,) = list(make_dataset(examples, training=False, batch_size=1, image_size=4,
                                   resize_size=4, fields=("image",)))
    np.testing.assert_array_equal(element["image"][0].numpy(), pixels.astype("float32"))
