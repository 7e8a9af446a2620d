"""tf.data input pipelines: decode, resize, crop and flip, batch (optionally by a sampler).

Every function here works eagerly and inside `tf.data.Dataset.map` (or a `tf.function`).
`decode_image` uses only core TensorFlow ops so that it can go into a SavedModel served by
TF Serving.

Example:

```python
train_dataset = make_dataset(splits["train"], training=True,
                             sampler=ClassBalancedSampler(splits["train"].labels,
                                                          num_classes_per_batch=8))
test_dataset = make_dataset(splits["test"], training=False, batch_size=128)
```
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow as tf
from PIL import Image

from tfmir.data.datasets import Examples
from tfmir.data.samplers import ClassBalancedSampler, SourceAwareSampler

AUTOTUNE = tf.data.AUTOTUNE

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_GIF_SIGNATURE = b"GIF8"
# 16-bit -> 8-bit: round(value / 257) maps 0..65535 onto 0..255 and 257 * v back onto v.
_SIXTEEN_BIT_DIVISOR = 257


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    """(H, W, C) with C in 1..4 -> (H, W, 3): gray (+alpha) is repeated, alpha is dropped."""
    channels = tf.shape(image)[-1]
    channel_indices = tf.where(channels < 3, tf.constant([0, 0, 0]), tf.constant([0, 1, 2]))
    return tf.gather(image, channel_indices, axis=-1)


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes PNG, JPEG, BMP or GIF bytes into a uint8 RGB image.

    Grayscale is repeated to RGB and an alpha channel dropped. 16-bit PNGs (X-rays) are mapped
    onto 8 bits by round(value / 257), so 65535 -> 255 and the full 16-bit range is kept. GIFs
    give their first frame. BMP support is TensorFlow's: 24/32-bit and 8-bit grayscale, not
    palette or 1-bit BMPs. Only core TensorFlow ops are used (SavedModel-safe).

    Args:
        encoded: scalar tf.string, the file contents.

    Returns:
        uint8 tensor of shape (H, W, 3).

    Example:

    ```python
    image = decode_image(tf.io.read_file("xray.png"))  # uint8 (H, W, 3)
    ```
    """
    encoded = tf.convert_to_tensor(encoded, dtype=tf.string)

    def from_png():
        # decode_png with dtype=uint16 returns 8-bit PNGs multiplied by 257, 16-bit ones as they
        # are; one rounding division then serves both.
        wide = tf.cast(tf.io.decode_png(encoded, channels=0, dtype=tf.uint16), tf.int32)
        return tf.cast((wide + _SIXTEEN_BIT_DIVISOR // 2) // _SIXTEEN_BIT_DIVISOR, tf.uint8)

    def from_other():
        return tf.io.decode_image(encoded, channels=0, dtype=tf.uint8, expand_animations=False)

    is_png = tf.equal(tf.strings.substr(encoded, 0, len(_PNG_SIGNATURE)), _PNG_SIGNATURE)
    image = tf.cond(is_png, from_png, from_other)
    image = _to_rgb(image)
    image.set_shape([None, None, 3])
    return image


def _pil_decode(contents: bytes) -> np.ndarray:
    """PIL decoder for what TensorFlow cannot decode (TIFF, palette or 1-bit BMP, ...)."""
    with Image.open(io.BytesIO(contents)) as image:
        if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            pixels = np.asarray(image, dtype=np.int64)
            pixels = np.clip((pixels + _SIXTEEN_BIT_DIVISOR // 2) // _SIXTEEN_BIT_DIVISOR, 0, 255)
            return np.repeat(pixels.astype(np.uint8)[..., None], 3, axis=-1)
        if image.mode == "F":
            pixels = np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)
            return np.repeat(pixels[..., None], 3, axis=-1)
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_image_file(path: tf.Tensor) -> tf.Tensor:
    """Reads and decodes one image file into uint8 (H, W, 3).

    PNG, JPEG and GIF go through `decode_image`; other formats PIL can read (BMP, TIFF, ...) go
    through PIL in a `tf.numpy_function` (fine in a training pipeline, not for a SavedModel).

    Args:
        path: scalar tf.string.

    Returns:
        uint8 tensor of shape (H, W, 3).
    """
    contents = tf.io.read_file(path)
    native = tf.logical_or(
        tf.equal(tf.strings.substr(contents, 0, len(_PNG_SIGNATURE)), _PNG_SIGNATURE),
        tf.logical_or(
            tf.equal(tf.strings.substr(contents, 0, len(_JPEG_SIGNATURE)), _JPEG_SIGNATURE),
            tf.equal(tf.strings.substr(contents, 0, len(_GIF_SIGNATURE)), _GIF_SIGNATURE)))

    def with_pil():
        image = tf.numpy_function(_pil_decode, [contents], tf.uint8, stateful=False)
        return tf.ensure_shape(image, [None, None, 3])

    image = tf.cond(native, lambda: decode_image(contents), with_pil)
    image.set_shape([None, None, 3])
    return image


def _random_crop_and_flip(images: tf.Tensor, image_size: int, resize_size: int,
                          seed: tf.Tensor | None) -> tf.Tensor:
    """Per image: a uniformly random image_size crop, mirrored left-right with probability 1/2."""
    batch = tf.shape(images)[0]
    num_offsets = resize_size - image_size + 1
    if seed is None:
        offsets = tf.random.uniform([batch, 2], 0, num_offsets, dtype=tf.int32)
        flips = tf.random.uniform([batch]) < 0.5
    else:
        offset_seed, flip_seed = tf.unstack(
            tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2))
        offsets = tf.random.stateless_uniform([batch, 2], offset_seed, 0, num_offsets,
                                              dtype=tf.int32)
        flips = tf.random.stateless_uniform([batch], flip_seed) < 0.5
    steps = tf.range(image_size)[None, :]
    rows = offsets[:, :1] + steps
    columns = offsets[:, 1:] + steps
    # A flip is the crop's columns read right to left: one gather does crop and flip.
    columns = tf.where(flips[:, None], tf.reverse(columns, axis=[1]), columns)
    images = tf.gather(images, rows, axis=1, batch_dims=1)
    return tf.gather(images, columns, axis=2, batch_dims=1)


def _resize(images: tf.Tensor, size: int) -> tf.Tensor:
    """Bilinear resize to (size, size) with antialiasing.

    Antialiasing only widens the kernel when shrinking; when no side shrinks the plain bilinear
    kernel gives the same pixels (up to float rounding) about 3x faster, so it is used then.
    """
    def antialiased():
        return tf.image.resize(images, [size, size], method="bilinear", antialias=True)

    def plain():
        return tf.image.resize(images, [size, size], method="bilinear", antialias=False)

    height, width = images.shape[1], images.shape[2]
    if height is not None and width is not None:
        return plain() if max(height, width) <= size else antialiased()
    shape = tf.shape(images)
    return tf.cond(tf.reduce_max(shape[1:3]) <= size, plain, antialiased)


def preprocess_image(image: tf.Tensor, *, training: bool, image_size: int = 224,
                     resize_size: int = 256, seed: tf.Tensor | None = None) -> tf.Tensor:
    """Resizes, then crops (and in training flips) one image or a batch of images.

    The image is resized to (resize_size, resize_size) (bilinear, antialiased). Training: a
    random image_size crop and a random horizontal flip; evaluation: the central crop. Pixels stay
    in [0, 255]; the model normalises them.

    Args:
        image: uint8 or float, (H, W, 3) or a batch (B, H, W, 3).
        training: random crop + flip (True) or central crop (False).
        image_size: the output side S.
        resize_size: the side images are resized to before cropping (>= image_size).
        seed: shape (2,) integer seed for reproducible stateless augmentation; None uses
            TensorFlow's global random state. Ignored when not training.

    Returns:
        float32 (S, S, 3), or (B, S, S, 3) for a batch.

    Example:

    ```python
    pixels = preprocess_image(decode_image(encoded), training=False)  # float32 (224, 224, 3)
    ```
    """
    if image_size < 1 or resize_size < image_size:
        raise ValueError("image_size must be positive and resize_size >= image_size. Received: "
                         f"image_size={image_size}, resize_size={resize_size}")
    image = tf.convert_to_tensor(image)
    rank = image.shape.rank
    if rank not in (3, 4):
        raise ValueError(f"image must be (H, W, 3) or (B, H, W, 3). Received shape {image.shape}")
    images = image if rank == 4 else image[None]
    images = _resize(tf.cast(images, tf.float32), resize_size)
    if training:
        images = _random_crop_and_flip(images, image_size, resize_size, seed)
    else:
        start = (resize_size - image_size) // 2
        images = images[:, start:start + image_size, start:start + image_size, :]
    return images if rank == 4 else images[0]


def make_dataset(examples: Examples, *, training: bool, batch_size: int | None = None,
                 sampler: ClassBalancedSampler | SourceAwareSampler | None = None,
                 image_size: int = 224, resize_size: int = 256,
                 with_labels: bool = True, with_sources: bool = False,
                 shuffle: bool | None = None, seed: int = 0,
                 num_parallel_calls: int = AUTOTUNE,
                 deterministic: bool | None = None) -> tf.data.Dataset:
    """Builds the tf.data pipeline of `examples`: images (and labels) in batches.

    - Evaluation (training=False, no sampler): the original order (unless shuffle=True), the last
      partial batch kept, one pass. Without batch_size, single images.
    - Training without a sampler: shuffled (seeded), repeated forever, full batches only.
    - With a sampler: the batches are exactly the sampler's index batches, forever.

    Training augmentation (random crop + flip) is seeded by `seed` and the element's position in
    the stream, so a pipeline is reproducible. In-memory images are gathered and augmented a whole
    batch at a time; files are read and decoded in parallel, one per call.

    Args:
        examples: the items, in memory or on disk.
        training: augment (random crop + flip) instead of the central crop; without a sampler
            also shuffle, repeat and drop the last partial batch.
        batch_size: items per batch; required when training without a sampler; must equal
            `sampler.batch_size` when both are given.
        sampler: an iterable of int64 index batches with a `batch_size` (e.g.
            `ClassBalancedSampler`, `SourceAwareSampler`).
        image_size: side S of the output images.
        resize_size: side images are resized to before cropping.
        with_labels: yield (images, labels) or images only.
        with_sources: also yield each item's source index, its position in
            `examples.source_names`: (images, labels, source_indices). Needs `with_labels`.
        shuffle: shuffle the order (default: `training`); not allowed with a sampler.
        seed: the seed of shuffling and augmentation.
        num_parallel_calls: parallelism of the decode/augment map.
        deterministic: passed to `Dataset.map` (None keeps the tf.data default, deterministic).
            Files read for a sampler are always kept in order so batches stay the sampler's.

    Returns:
        A dataset of (float32 (B, S, S, 3) in [0, 255], int64 (B,) labels), with an int32 (B,)
        source index as third element when `with_sources`, or of images only; prefetched.

    Example:

    ```python
    dataset = make_dataset(examples, training=False, batch_size=64, with_labels=False)
    embeddings = model.predict(dataset)
    ```
    """
    if not isinstance(examples, Examples):
        raise ValueError(f"examples must be an Examples. Received {type(examples).__name__}")
    if image_size < 1 or resize_size < image_size:
        raise ValueError("image_size must be positive and resize_size >= image_size. Received: "
                         f"image_size={image_size}, resize_size={resize_size}")
    if with_sources and not with_labels:
        raise ValueError("with_sources=True needs with_labels=True: elements are "
                         "(images, labels, source_indices)")
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise ValueError("batch_size must be a positive integer. "
                         f"Received: batch_size={batch_size!r}")
    if sampler is not None:
        sampler_batch_size = int(sampler.batch_size)
        if batch_size is not None and batch_size != sampler_batch_size:
            raise ValueError(f"batch_size={batch_size} differs from the sampler's batch_size="
                             f"{sampler_batch_size}; leave batch_size unset with a sampler")
        if shuffle:
            raise ValueError("shuffle=True cannot be combined with a sampler: the sampler decides "
                             "the order")
        num_items = getattr(sampler, "num_items", len(examples))
        if num_items != len(examples):
            raise ValueError(f"the sampler draws from {num_items} items but examples has "
                             f"{len(examples)}; build the sampler from these examples' labels")
        batch_size = sampler_batch_size
        indices = tf.data.Dataset.from_generator(
            lambda: iter(sampler), output_signature=tf.TensorSpec([batch_size], tf.int64))
        indices_batched = True
    else:
        if len(examples) == 0 and training:
            raise ValueError("examples is empty; nothing to train on")
        if training and batch_size is None:
            raise ValueError("training without a sampler needs a batch_size")
        shuffle = training if shuffle is None else shuffle
        indices = tf.data.Dataset.range(len(examples))
        if shuffle:
            indices = indices.shuffle(len(examples), seed=seed, reshuffle_each_iteration=True)
        if training:
            indices = indices.repeat()
        indices_batched = False

    labels = tf.convert_to_tensor(examples.labels, dtype=tf.int64)
    if with_sources:
        source_names = np.asarray(examples.source_names, dtype=str)
        source_indices = tf.convert_to_tensor(
            np.searchsorted(source_names, examples.sources.astype(str)), dtype=tf.int32)
    base_seed = tf.constant(seed, dtype=tf.int64)

    def finish(index, images):
        if with_sources:
            return images, tf.gather(labels, index), tf.gather(source_indices, index)
        return (images, tf.gather(labels, index)) if with_labels else images

    if examples.in_memory:
        # Gather and augment a whole batch at once: much cheaper than one map call per image.
        pixels = tf.convert_to_tensor(examples.images)
        if batch_size is not None and not indices_batched:
            indices = indices.batch(batch_size, drop_remainder=training)

        def load(step, index):
            images = preprocess_image(tf.gather(pixels, index), training=training,
                                      image_size=image_size, resize_size=resize_size,
                                      seed=tf.stack([base_seed, step]))
            return finish(index, images)

        dataset = indices.enumerate().map(load, num_parallel_calls=num_parallel_calls,
                                          deterministic=deterministic)
    else:
        paths = tf.convert_to_tensor(examples.paths, dtype=tf.string)
        if indices_batched:
            indices = indices.unbatch()

        def load(step, index):
            image = preprocess_image(read_image_file(tf.gather(paths, index)), training=training,
                                     image_size=image_size, resize_size=resize_size,
                                     seed=tf.stack([base_seed, step]))
            return finish(index, image)

        # Files are decoded one per call; out-of-order results would mix the sampler's batches
        # (and so their sources), so order is kept whenever a sampler is used.
        dataset = indices.enumerate().map(
            load, num_parallel_calls=num_parallel_calls,
            deterministic=True if sampler is not None else deterministic)
        if batch_size is not None:
            dataset = dataset.batch(batch_size, drop_remainder=training or sampler is not None)
    return dataset.prefetch(AUTOTUNE)
