"""tf.data input pipelines: decode, resize, crop and flip, batch by a sampler into dict batches.

Every function here works eagerly and inside `tf.data.Dataset.map` (or a `tf.function`).
`decode_image` uses only core TensorFlow ops so that it can go into a SavedModel served by
TF Serving. `make_dataset` yields `(inputs, targets)` dicts: `{"image": ...}` and the requested
targets among "label", "source" and "mask" (a segmentation mask cropped and flipped with its
image).

Example:

```python
train_dataset = make_dataset(splits["train"], training=True,
                             sampler=ClassBalancedSampler(splits["train"].labels,
                                                          num_classes_per_batch=8))
inputs, targets = next(iter(train_dataset))  # {"image": (40, 224, 224, 3)}, {"label": (40,)}
test_dataset = make_dataset(splits["test"], training=False, batch_size=128, fields=("image",))
for element in test_dataset:
    embeddings = model(element["image"])
```
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from tfmir.data.augmentation import Augmentation, check_augmentations
from tfmir.data.datasets import Examples
from tfmir.data.samplers import ShuffledSampler
from tfmir.images import (GIF_SIGNATURES, JPEG_SIGNATURE, PNG_SIGNATURE, SIXTEEN_BIT_DIVISOR,
                          decode_rgb)

AUTOTUNE = tf.data.AUTOTUNE
# The fields an element can hold: "image" is the model input, the others are targets.
FIELDS = ("image", "label", "source", "mask")

_GIF_SIGNATURE = GIF_SIGNATURES[0][:4]  # "GIF8", both versions
# Files reaching the pipeline were size-checked by the readers already.
_NO_PIXEL_LIMIT = 1 << 62
# Byte offset of a PNG's bit depth: signature (8), IHDR length and type (8), width, height (8).
_PNG_BIT_DEPTH_OFFSET = 24
# EXIF lives in a JPEG's APP1 segment (at most 64 KiB) near the start of the file: "Exif\0\0",
# then a TIFF header (byte order "II" or "MM", 42, offset of IFD0) and IFD0's 12-byte entries.
_EXIF_MARKER = b"Exif\x00\x00"
_EXIF_SCAN_BYTES = 1 << 17
_EXIF_MAX_ENTRIES = 128
_ORIENTATION_TAG = 0x0112


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    """(H, W, C) with C in 1..4 -> (H, W, 3): gray (+alpha) is repeated, alpha is dropped."""
    channels = tf.shape(image)[-1]
    channel_indices = tf.where(channels < 3, tf.constant([0, 0, 0]), tf.constant([0, 1, 2]))
    return tf.gather(image, channel_indices, axis=-1)


def exif_orientation(encoded: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (1..8) of JPEG bytes, read with core TensorFlow ops; 1 when absent.

    1 is upright; 2..8 are the mirrorings and quarter turns of the EXIF / TIFF standard (tag
    0x0112 in IFD0), e.g. 6 for a phone held upright whose sensor was turned. Anything unreadable
    (no EXIF, a damaged one, a value outside 1..8, not a JPEG) counts as 1.

    Args:
        encoded: scalar tf.string, the file contents.

    Returns:
        int32 scalar.
    """
    encoded = tf.convert_to_tensor(encoded, dtype=tf.string)
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, len(JPEG_SIGNATURE)), JPEG_SIGNATURE)
    parts = tf.strings.split(tf.strings.substr(encoded, 0, _EXIF_SCAN_BYTES), sep=_EXIF_MARKER,
                             maxsplit=1)
    found = tf.logical_and(is_jpeg, tf.equal(tf.size(parts), 2))
    tiff = tf.where(found, parts[-1], b"")
    # Zero-padded to a fixed length, so every read below is in range.
    padded = tf.strings.substr(tf.strings.join([tiff, tf.constant(b"\0" * _EXIF_SCAN_BYTES)]),
                               0, _EXIF_SCAN_BYTES)
    data = tf.cast(tf.io.decode_raw(padded, tf.uint8), tf.int64)
    big_endian = tf.reduce_all(tf.equal(data[:2], ord("M")))
    little_endian = tf.reduce_all(tf.equal(data[:2], ord("I")))

    def read(offsets, size):
        """Unsigned integers of `size` bytes at `offsets` (any shape), in the file's byte order."""
        offsets = tf.convert_to_tensor(offsets, tf.int64)
        positions = tf.clip_by_value(offsets[..., None] + tf.range(size, dtype=tf.int64), 0,
                                     _EXIF_SCAN_BYTES - 1)
        values = tf.gather(data, positions)
        weights = 256 ** tf.range(size, dtype=tf.int64)
        weights = tf.where(big_endian, tf.reverse(weights, [0]), weights)
        return tf.reduce_sum(values * weights, axis=-1)

    first_directory = read(4, 4)
    count = read(first_directory, 2)
    entries = first_directory + 2 + 12 * tf.range(_EXIF_MAX_ENTRIES, dtype=tf.int64)
    is_orientation = tf.logical_and(tf.range(_EXIF_MAX_ENTRIES, dtype=tf.int64) < count,
                                    tf.equal(read(entries, 2), _ORIENTATION_TAG))
    # A SHORT value sits in the first two bytes of the entry's 4-byte value field.
    values = tf.boolean_mask(read(entries + 8, 2), is_orientation)
    value = tf.cond(tf.size(values) > 0, lambda: values[0], lambda: tf.constant(1, tf.int64))
    valid = tf.logical_and(tf.logical_or(big_endian, little_endian),
                           tf.logical_and(value >= 1, value <= 8))
    return tf.cast(tf.where(tf.logical_and(found, valid), value, 1), tf.int32)


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Turns an (H, W, C) image upright by its EXIF orientation (1..8), as PIL's
    `ImageOps.exif_transpose` does."""
    def transposed():
        return tf.transpose(image, [1, 0, 2])

    # Reverses and transposes only (tf.image.rot90 adds assertions that upset graph optimizers).
    branches = [
        lambda: image,                              # 1: upright
        lambda: tf.reverse(image, [1]),             # 2: mirrored left-right
        lambda: tf.reverse(image, [0, 1]),          # 3: turned 180°
        lambda: tf.reverse(image, [0]),             # 4: mirrored top-bottom
        transposed,                                 # 5: transposed
        lambda: tf.reverse(transposed(), [1]),      # 6: turned 90° clockwise
        lambda: tf.reverse(transposed(), [0, 1]),   # 7: transversed
        lambda: tf.reverse(transposed(), [0]),      # 8: turned 90° anticlockwise
    ]
    return tf.switch_case(tf.clip_by_value(orientation, 1, 8) - 1, branches)


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """Decodes PNG, JPEG or GIF bytes into an upright uint8 RGB image.

    Grayscale is repeated to RGB and an alpha channel dropped. 16-bit PNGs (X-rays) are mapped
    onto 8 bits by round(value / 257), so 65535 -> 255 and the full 16-bit range is kept. A JPEG's
    EXIF orientation is applied (`exif_orientation`); CMYK JPEGs become RGB. GIFs give their
    first frame. Only core TensorFlow ops are used (SavedModel-safe). Other formats:
    `tfmir.images.decode_rgb` (PIL, pydicom) by the same rules, as `read_image_file` does.

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
        bit_depth = tf.io.decode_raw(tf.strings.substr(encoded, _PNG_BIT_DEPTH_OFFSET, 1),
                                     tf.uint8)

        def sixteen_bits():
            # One rounding division of the 16-bit values.
            wide = tf.cast(tf.io.decode_png(encoded, channels=0, dtype=tf.uint16), tf.int32)
            return tf.cast((wide + SIXTEEN_BIT_DIVISOR // 2) // SIXTEEN_BIT_DIVISOR, tf.uint8)

        def eight_bits():  # a quarter of the memory of the 16-bit path, the same pixels
            return tf.io.decode_png(encoded, channels=0, dtype=tf.uint8)

        return tf.cond(tf.reduce_all(tf.equal(bit_depth, 16)), sixteen_bits, eight_bits)

    def from_other():
        image = tf.io.decode_image(encoded, channels=0, dtype=tf.uint8, expand_animations=False)
        return apply_orientation(image, exif_orientation(encoded))

    is_png = tf.equal(tf.strings.substr(encoded, 0, len(PNG_SIGNATURE)), PNG_SIGNATURE)
    image = tf.cond(is_png, from_png, from_other)
    image = _to_rgb(image)
    image.set_shape([None, None, 3])
    return image


def _decode_rgb(contents) -> np.ndarray:
    # tf.numpy_function passes a scalar string as a 0-d object array.
    contents = contents.item() if isinstance(contents, np.ndarray) else contents
    return decode_rgb(contents, max_image_pixels=_NO_PIXEL_LIMIT)


def read_image_file(path: tf.Tensor) -> tf.Tensor:
    """Reads and decodes one image file into uint8 (H, W, 3), upright.

    PNG, JPEG and GIF go through `decode_image`; other formats (BMP, TIFF, DICOM, ...) through
    `tfmir.images.decode_rgb` in a `tf.numpy_function` (fine in a training pipeline, not for a
    SavedModel). The readers (`load_image_folder`, `load_csv_manifest`) have already checked
    every file's size from its header.

    Args:
        path: scalar tf.string.

    Returns:
        uint8 tensor of shape (H, W, 3).
    """
    contents = tf.io.read_file(path)
    native = tf.logical_or(
        tf.equal(tf.strings.substr(contents, 0, len(PNG_SIGNATURE)), PNG_SIGNATURE),
        tf.logical_or(
            tf.equal(tf.strings.substr(contents, 0, len(JPEG_SIGNATURE)), JPEG_SIGNATURE),
            tf.equal(tf.strings.substr(contents, 0, len(_GIF_SIGNATURE)), _GIF_SIGNATURE)))

    def with_python():
        image = tf.numpy_function(_decode_rgb, [contents], tf.uint8, stateful=False)
        return tf.ensure_shape(image, [None, None, 3])

    image = tf.cond(native, lambda: decode_image(contents), with_python)
    image.set_shape([None, None, 3])
    return image


def _random_crop_and_flip(images: tf.Tensor, image_size: int, resize_size: int,
                          seed: tf.Tensor | None) -> tf.Tensor:
    """Per image: a uniformly random image_size crop, mirrored left-right with probability 1/2.

    Works on any number of channels, so a mask stacked onto its image as a 4th channel gets the
    image's crop and flip.
    """
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


def query_preprocessing(*, image_size: int, resize_size: int) -> dict:
    """What `preprocess_image(training=False)` does to a query, as a record for an index manifest.

    An index only answers queries embedded the way its items were: the same model (its
    fingerprint) and the same preprocessing. Decoding (to RGB, with the header checks) is the
    same in every reader; what a caller can change is recorded here.

    Example:
    >>> query_preprocessing(image_size=224, resize_size=256)["crop"]
    'central'
    """
    return {"resize": "bilinear, antialiased when shrinking", "resize_size": int(resize_size),
            "crop": "central", "image_size": int(image_size), "pixels": "RGB in [0, 255]"}


def preprocess_image(image: tf.Tensor, *, training: bool, image_size: int = 224,
                     resize_size: int = 256, seed: tf.Tensor | None = None,
                     mask: tf.Tensor | None = None) -> tf.Tensor | tuple[tf.Tensor, tf.Tensor]:
    """Resizes, then crops (and in training flips) one image or a batch, with its mask if given.

    The image is resized to (resize_size, resize_size) (bilinear, antialiased). Training: a
    random image_size crop and a random horizontal flip; evaluation: the central crop. Pixels stay
    in [0, 255]; the model normalises them. A mask is binarised (any non-zero value -> 1),
    resized with nearest neighbour (so it stays binary) and gets exactly its image's crop and flip.

    Args:
        image: uint8 or float, (H, W, 3) or a batch (B, H, W, 3).
        training: random crop + flip (True) or central crop (False).
        image_size: the output side S.
        resize_size: the side images are resized to before cropping (>= image_size).
        seed: shape (2,) integer seed for reproducible stateless augmentation; None uses
            TensorFlow's global random state. Ignored when not training.
        mask: optional, any numeric dtype, (H, W, 1) or (B, H, W, 1) like `image`.

    Returns:
        float32 (S, S, 3), or (B, S, S, 3) for a batch; with a mask, the pair (image, mask), the
        mask float32 (S, S, 1) or (B, S, S, 1) holding exactly 0.0 or 1.0.

    Example:

    ```python
    pixels = preprocess_image(decode_image(encoded), training=False)  # float32 (224, 224, 3)
    pixels, lesion = preprocess_image(image, mask=mask, training=True, seed=tf.constant([0, 1]))
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
    if mask is not None:
        mask = tf.convert_to_tensor(mask)
        if mask.shape.rank != rank or mask.shape[-1] != 1:
            raise ValueError(f"mask must be shaped like the image with one channel, "
                             f"{'(B, H, W, 1)' if rank == 4 else '(H, W, 1)'}. "
                             f"Received shape {mask.shape} for an image of shape {image.shape}")
        masks = mask if rank == 4 else mask[None]
        # Both get resized to resize_size, so a size mismatch would pass silently, misaligned.
        tf.debugging.assert_equal(tf.shape(masks)[:3], tf.shape(images)[:3],
                                  message="mask and image differ in batch size, height or width")
    images = _resize(tf.cast(images, tf.float32), resize_size)
    if mask is not None:
        masks = tf.cast(tf.not_equal(masks, 0), tf.float32)
        masks = tf.image.resize(masks, [resize_size, resize_size], method="nearest")
        # One tensor through one crop: the mask gets exactly its image's offsets and flip.
        images = tf.concat([images, masks], axis=-1)
    if training:
        images = _random_crop_and_flip(images, image_size, resize_size, seed)
    else:
        start = (resize_size - image_size) // 2
        images = images[:, start:start + image_size, start:start + image_size, :]
    if mask is None:
        return images if rank == 4 else images[0]
    images, masks = images[..., :3], images[..., 3:]
    return (images, masks) if rank == 4 else (images[0], masks[0])


def _pil_mask(contents: bytes) -> np.ndarray:
    """PIL reader for non-PNG masks: uint8 (H, W, 1), 1 where the first channel is non-zero."""
    with Image.open(io.BytesIO(contents)) as image:
        # Palette indices say nothing about foreground; their gray levels do.
        pixels = np.asarray(image.convert("L") if image.mode == "P" else image)
    if pixels.ndim == 3:
        pixels = pixels[..., 0]
    return (pixels != 0).astype(np.uint8)[..., None]


def _read_mask_file(path: tf.Tensor) -> tf.Tensor:
    """Reads one mask file into uint8 (H, W, 1) of 0/1: any non-zero first channel is 1.

    PNGs (8 or 16 bits, gray or RGB, values 0/255 or 0/1) are decoded natively; other formats
    through PIL.
    """
    contents = tf.io.read_file(path)
    is_png = tf.equal(tf.strings.substr(contents, 0, len(PNG_SIGNATURE)), PNG_SIGNATURE)

    def from_png():
        # uint16 keeps a 16-bit mask's 1s (an 8-bit decode would round them down to 0).
        pixels = tf.io.decode_png(contents, channels=0, dtype=tf.uint16)[..., :1]
        return tf.cast(tf.not_equal(pixels, 0), tf.uint8)

    def with_pil():
        mask = tf.numpy_function(_pil_mask, [contents], tf.uint8, stateful=False)
        return tf.ensure_shape(mask, [None, None, 1])

    mask = tf.cond(is_png, from_png, with_pil)
    mask.set_shape([None, None, 1])
    return mask


def _check_fields(fields: Sequence[str]) -> tuple[str, ...]:
    if isinstance(fields, str):
        raise ValueError(f"fields must be a sequence of field names such as ('image', 'label'). "
                         f"Received: fields={fields!r}")
    fields = tuple(fields)
    for field in fields:
        if field not in FIELDS:
            raise ValueError(f"unknown field {field!r}; fields are drawn from {FIELDS}. "
                             f"Received: fields={fields!r}")
    if "image" not in fields:
        raise ValueError(f"fields must include 'image'. Received: fields={fields!r}")
    return fields


def _check_mask_files(examples: Examples) -> None:
    """Every item has a mask file of its image's size; raises naming the first that does not.

    Done up front, reading only the file headers, so a bad mask stops the run before training
    starts rather than deep inside a tf.data pipeline.
    """
    empty = np.flatnonzero(examples.mask_paths == "")
    if len(empty):
        first = str(examples.ids[empty[0]])
        raise ValueError(f"item {first!r} has no mask (its mask path is \"\"); {len(empty)} of "
                         f"{len(examples)} items have none. Keep the items with masks: "
                         "examples.subset(examples.mask_paths != \"\")")
    for image_path, mask_path in zip(examples.paths, examples.mask_paths):
        with Image.open(image_path) as image, Image.open(mask_path) as mask:
            image_size, mask_size = image.size, mask.size
        if image_size != mask_size:
            raise ValueError(
                f"mask {mask_path} is {mask_size[1]}x{mask_size[0]} (height x width) but its "
                f"image {image_path} is {image_size[1]}x{image_size[0]}"
            )


def _path_tensor(paths) -> tf.Tensor:
    """File names as the bytes the file system holds: a name that is not UTF-8 (kept by Python
    as surrogate escapes) must still open, and TensorFlow strings take bytes, not surrogates."""
    return tf.constant([os.fsencode(str(path)) for path in paths], dtype=tf.string)


def make_dataset(examples: Examples, *, training: bool, batch_size: int | None = None,
                 sampler: Iterable[np.ndarray] | None = None, image_size: int = 224,
                 resize_size: int = 256, fields: Sequence[str] = ("image", "label"),
                 shuffle: bool | None = None, seed: int = 0, num_parallel_calls: int = AUTOTUNE,
                 deterministic: bool | None = None,
                 augmentations: Sequence[str] | Augmentation = ()) -> tf.data.Dataset:
    """Builds the tf.data pipeline of `examples`: dict batches of the requested fields.

    Elements are `(inputs, targets)`: `inputs = {"image": float32 (B, S, S, 3) in [0, 255]}` and
    `targets` holds the requested target fields among
    - "label": int64 (B,), the class index;
    - "source": int32 (B,), the item's position in `examples.source_names`;
    - "mask": float32 (B, S, S, 1), exactly 0.0 or 1.0, cropped and flipped with its image.
    With no target field (`fields=("image",)`) an element is the inputs dict alone.

    - Evaluation (training=False, no sampler): the original order (unless shuffle=True), the last
      partial batch kept, one pass. Without batch_size, single items (no batch axis).
    - Training: the batches are exactly the sampler's index batches, forever; without a sampler,
      those of `ShuffledSampler(len(examples), batch_size=batch_size, seed=seed)`.

    Training augmentation (random crop + flip, then `augmentations`) is seeded by `seed` and the
    element's position in the stream, so a pipeline is reproducible. In-memory images are
    gathered and augmented a whole batch at a time; files are read and decoded in parallel, one
    per call. Masks come from `examples.masks` (in memory) or `examples.mask_paths` (files,
    checked up front: every item needs a mask file of its image's size).

    Args:
        examples: the items, in memory or on disk.
        training: augment (random crop + flip) instead of the central crop, and draw batches from
            a sampler forever.
        batch_size: items per batch; required when training without a sampler; must equal
            `sampler.batch_size` when both are given.
        sampler: an iterable of int64 index batches with `batch_size` and `num_items` (e.g.
            `ShuffledSampler`, `ClassBalancedSampler`, `SourceAwareSampler`, `ReplicaShard`).
        image_size: side S of the output images.
        resize_size: side images are resized to before cropping.
        fields: the fields of each element, drawn from `FIELDS`; "image" is required.
        shuffle: shuffle the evaluation order (default False); training without a sampler always
            shuffles (shuffle=False is refused) and a sampler decides the order itself.
        seed: the seed of shuffling and augmentation.
        num_parallel_calls: parallelism of the decode/augment map.
        deterministic: passed to `Dataset.map` (None keeps the tf.data default, deterministic).
            Files read for a sampler are always kept in order so batches stay the sampler's.
        augmentations: in training, after the crop and flip: names among
            `tfmir.data.AUGMENTATIONS` (e.g. `PAPER_AUGMENTATIONS`) or an `Augmentation`; flips
            move the mask with its image. Ignored (names still checked) when not training.

    Returns:
        A prefetched dataset of `(inputs, targets)` dicts, or of `inputs` alone.

    Example:

    ```python
    train = make_dataset(examples, training=True, sampler=sampler,
                         fields=("image", "label", "mask"))
    inputs, targets = next(iter(train))  # inputs["image"], targets["label"], targets["mask"]
    test = make_dataset(examples, training=False, batch_size=64, fields=("image",))
    embeddings = np.concatenate([model(element["image"]) for element in test])
    ```
    """
    if not isinstance(examples, Examples):
        raise ValueError(f"examples must be an Examples. Received {type(examples).__name__}")
    if image_size < 1 or resize_size < image_size:
        raise ValueError("image_size must be positive and resize_size >= image_size. Received: "
                         f"image_size={image_size}, resize_size={resize_size}")
    fields = _check_fields(fields)
    if isinstance(augmentations, Augmentation):
        augment = augmentations if training else None
    else:
        names = check_augmentations(augmentations)
        augment = Augmentation(names, seed=seed) if names and training else None
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
        raise ValueError("batch_size must be a positive integer. "
                         f"Received: batch_size={batch_size!r}")
    with_masks = "mask" in fields
    if with_masks:
        mask_field = "masks" if examples.in_memory else "mask_paths"
        if getattr(examples, mask_field) is None:
            raise ValueError(
                f"examples has no masks ({mask_field} is None; in-memory images take `masks`, "
                f"images on disk `mask_paths`), but fields asks for 'mask'. "
                f"Received: fields={fields!r}")
        if not examples.in_memory:
            _check_mask_files(examples)

    if sampler is not None and shuffle:
        raise ValueError("shuffle=True cannot be combined with a sampler: the sampler decides "
                         "the order")
    if training and sampler is None:
        if len(examples) == 0:
            raise ValueError("examples is empty; nothing to train on")
        if batch_size is None:
            raise ValueError("training without a sampler needs a batch_size")
        if shuffle is False:
            raise ValueError("training without a sampler draws shuffled batches (ShuffledSampler);"
                             " for another order pass a sampler. Received: shuffle=False")
        sampler = ShuffledSampler(len(examples), batch_size=batch_size, seed=seed)
    if sampler is not None:
        sampler_batch_size = int(sampler.batch_size)
        if batch_size is not None and batch_size != sampler_batch_size:
            raise ValueError(f"batch_size={batch_size} differs from the sampler's batch_size="
                             f"{sampler_batch_size}; leave batch_size unset with a sampler")
        if sampler.num_items != len(examples):
            raise ValueError(f"the sampler draws from {sampler.num_items} items but examples has "
                             f"{len(examples)}; build the sampler from these examples")
        batch_size = sampler_batch_size
        indices = tf.data.Dataset.from_generator(
            lambda: iter(sampler), output_signature=tf.TensorSpec([batch_size], tf.int64))
        indices_batched = True
    else:
        indices = tf.data.Dataset.range(len(examples))
        if shuffle:
            indices = indices.shuffle(len(examples), seed=seed, reshuffle_each_iteration=True)
        indices_batched = False

    labels = tf.convert_to_tensor(examples.labels, dtype=tf.int64)
    source_names = np.asarray(examples.source_names, dtype=str)
    source_indices = tf.convert_to_tensor(
        np.searchsorted(source_names, examples.sources.astype(str)), dtype=tf.int32)
    base_seed = tf.constant(seed, dtype=tf.int64)

    def element(index, images, masks):
        targets = {}
        if "label" in fields:
            targets["label"] = tf.gather(labels, index)
        if "source" in fields:
            targets["source"] = tf.gather(source_indices, index)
        if with_masks:
            targets["mask"] = masks
        return ({"image": images}, targets) if targets else {"image": images}

    def preprocess(step, images, masks):
        step_seed = tf.stack([base_seed, step])
        outputs = preprocess_image(images, training=training, image_size=image_size,
                                   resize_size=resize_size, seed=step_seed, mask=masks)
        if augment is not None:
            # A stream apart from the crop and flip's, which split step_seed itself.
            outputs = augment(*(outputs if with_masks else (outputs,)),
                              seed=tf.random.experimental.stateless_fold_in(step_seed, 1))
        return outputs if with_masks else (outputs, None)

    if examples.in_memory:
        # Gather and augment a whole batch at once: much cheaper than one map call per image.
        pixels = tf.convert_to_tensor(examples.images)
        mask_pixels = tf.convert_to_tensor(examples.masks) if with_masks else None
        if batch_size is not None and not indices_batched:
            indices = indices.batch(batch_size)

        def load(step, index):
            masks = tf.gather(mask_pixels, index)[..., None] if with_masks else None
            return element(index, *preprocess(step, tf.gather(pixels, index), masks))

        dataset = indices.enumerate().map(load, num_parallel_calls=num_parallel_calls,
                                          deterministic=deterministic)
    else:
        paths = _path_tensor(examples.paths)
        mask_paths = _path_tensor(examples.mask_paths) if with_masks else None
        if indices_batched:
            indices = indices.unbatch()

        def load(step, index):
            mask = _read_mask_file(tf.gather(mask_paths, index)) if with_masks else None
            image = read_image_file(tf.gather(paths, index))
            return element(index, *preprocess(step, image, mask))

        # Files are decoded one per call; out-of-order results would mix the sampler's batches
        # (and so their sources), so order is kept whenever a sampler is used.
        dataset = indices.enumerate().map(
            load, num_parallel_calls=num_parallel_calls,
            deterministic=True if sampler is not None else deterministic)
        if batch_size is not None:
            dataset = dataset.batch(batch_size, drop_remainder=sampler is not None)
    return dataset.prefetch(AUTOTUNE)
