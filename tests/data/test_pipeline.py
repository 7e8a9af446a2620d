"""Tests for tfmir.data.pipeline, eagerly and inside tf.data (STYLE.md: they differ)."""

import io
import itertools

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfmir.data import (
    ClassBalancedSampler,
    Examples,
    SourceAwareSampler,
    decode_image,
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


# --- make_dataset ------------------------------------------------------------------------------


def test_eval_dataset_keeps_order_and_partial_batch():
    examples = _indexed_examples(10)
    dataset = make_dataset(examples, training=False, batch_size=4, image_size=4, resize_size=6)
    batches = list(dataset)
    assert [len(labels) for _, labels in batches] == [4, 4, 2]
    images = np.concatenate([images.numpy() for images, _ in batches])
    labels = np.concatenate([labels.numpy() for _, labels in batches])
    assert images.dtype == np.float32 and images.shape == (10, 4, 4, 3)
    assert _indices_of(images).tolist() == list(range(10))
    assert labels.dtype == np.int64 and labels.tolist() == examples.labels.tolist()
    only_images = make_dataset(examples, training=False, batch_size=4, with_labels=False,
                               image_size=4, resize_size=6)
    assert isinstance(next(iter(only_images)), tf.Tensor)
    single = list(make_dataset(examples, training=False, image_size=4, resize_size=6))
    assert single[3][0].shape == (4, 4, 3) and int(single[3][1]) == examples.labels[3]


def test_eval_dataset_matches_eager_preprocessing(shared_data_dir):
    examples = load_medmnist_npz(shared_data_dir / "retinamnist" / "retinamnist.npz")["test"]
    examples = examples.subset(np.arange(6))
    dataset = make_dataset(examples, training=False, batch_size=4, image_size=48, resize_size=56,
                           with_labels=False)
    from_dataset = np.concatenate([batch.numpy() for batch in dataset])
    eager = np.stack([preprocess_image(image, training=False, image_size=48,
                                       resize_size=56).numpy() for image in examples.images])
    np.testing.assert_array_equal(from_dataset, eager)


def test_training_dataset_shuffles_repeats_and_drops_remainder():
    examples = _indexed_examples(10)
    make = lambda seed: make_dataset(examples, training=True, batch_size=4, image_size=4,  # noqa
                                     resize_size=6, seed=seed)
    batches = [_indices_of(images) for images, _ in make(0).take(5)]
    assert all(len(batch) == 4 for batch in batches)
    seen = np.concatenate(batches)
    assert sorted(seen[:10].tolist()) == list(range(10))  # the first pass covers each item once
    assert seen[:10].tolist() != list(range(10))
    again = [_indices_of(images) for images, _ in make(0).take(5)]
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    with pytest.raises(ValueError, match="batch_size"):
        make_dataset(examples, training=True)


def test_sampler_dataset_yields_the_sampler_batches():
    labels = np.repeat(np.arange(4), 6)
    examples = _indexed_examples(len(labels), labels=labels)
    sampler = ClassBalancedSampler(labels, num_classes_per_batch=2, num_per_class=3, seed=5)
    dataset = make_dataset(examples, training=True, sampler=sampler, image_size=4, resize_size=6)
    expected = list(itertools.islice(iter(sampler), 4))
    for (images, batch_labels), indices in zip(dataset.take(4), expected):
        assert images.shape == (6, 4, 4, 3)
        assert _indices_of(images).tolist() == indices.tolist()
        assert batch_labels.numpy().tolist() == labels[indices].tolist()
    with pytest.raises(ValueError, match="differs from the sampler"):
        make_dataset(examples, training=True, sampler=sampler, batch_size=5)
    with pytest.raises(ValueError, match="shuffle"):
        make_dataset(examples, training=True, sampler=sampler, shuffle=True)
    with pytest.raises(ValueError, match="24 items"):
        make_dataset(examples.subset(np.arange(10)), training=True, sampler=sampler)


def _write_indexed_files(root, formats):
    """One class folder; file i is a constant image of value 10 * i in format formats[i]."""
    (root / "c").mkdir(parents=True)
    for index, (extension, mode) in enumerate(formats):
        pixels = np.full((5 + index, 9, 3), 10 * index, np.uint8)
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
    images = np.concatenate([images.numpy() for images, _ in dataset])
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
    for (images, labels), indices in zip(dataset.take(3), iter(sampler)):
        assert images.shape == (4, 4, 4, 3)
        np.testing.assert_allclose(images.numpy()[:, 0, 0, 0], 10.0 * indices, atol=1e-3)
        assert labels.numpy().tolist() == (indices % 2).tolist()


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
    for examples, pixel_scale in [(in_memory, 1.0), (on_disk, 10.0)]:
        evaluation = make_dataset(examples, training=False, batch_size=5, image_size=4,
                                  resize_size=6, with_sources=True)
        source_indices = np.concatenate([indices.numpy() for _, _, indices in evaluation])
        assert source_indices.dtype == np.int32
        assert source_indices.tolist() == [expected_index[name] for name in sources]
        sampler = SourceAwareSampler(labels, sources, num_classes_per_batch=2, num_per_class=2)
        training = make_dataset(examples, training=True, sampler=sampler, image_size=4,
                                resize_size=6, with_sources=True)
        for (images, batch_labels, batch_sources), indices in zip(training.take(4), sampler):
            np.testing.assert_allclose(images.numpy()[:, 0, 0, 0], pixel_scale * indices,
                                       atol=1e-3)
            assert batch_labels.numpy().tolist() == labels[indices].tolist()
            assert batch_sources.numpy().tolist() == [expected_index[name]
                                                      for name in sources[indices]]
    with pytest.raises(ValueError, match="with_sources=True needs with_labels=True"):
        make_dataset(in_memory, training=False, with_labels=False, with_sources=True)
