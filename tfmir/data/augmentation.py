"""The melanoma paper's seven augmentations: online in tf.data, or offline as the x7 expansion.

Paper 003 (Sec. 3.2) augments with GridMask (Chen et al. 2020), random left-right and up-down
flips, and random brightness, contrast, hue and saturation, "so for each image there would be 7
more different images". tfmir offers both readings:

- online: `Augmentation` (or `build_augmentation`) draws every named augmentation at random for
  every image of every batch; `make_dataset(..., augmentations=PAPER_AUGMENTATIONS)` applies it
  in training after the crop and flip, and moves a segmentation mask with the flips;
- offline: `expand_dataset` writes each image, its mask and one copy per augmentation (8 files
  per item) with a CSV manifest that `load_csv_manifest` / `--data=<dir>/labels.csv` read.

Six augmentations are Keras 3 layers (`RandomFlip`, `RandomBrightness`, `RandomContrast`,
`RandomHue`, `RandomSaturation`); GridMask is keras-cv's (`pip install tfmir[gridmask]`), set so
that `ratio` means the GridMask paper's r. Every draw is stateless: the same seed gives the same
images eagerly, in tf.data, and in any order of parallel calls.

The paper gives no strengths; `DEFAULT_STRENGTHS` holds ours, in each Keras layer's own `factor`
units:
- brightness 0.1: adds U(-0.1, 0.1) x 255 to every pixel (then clips to [0, 255]);
- contrast 0.2: (x - mean) x U(0.8, 1.2) + mean per image and channel;
- hue 0.05: turns the hue by up to 0.025 of the colour circle (9 degrees) either way; kept
  small because lesion colour is what the paper's readers judge similarity by first;
- saturation (0.4, 0.6): multiplies the HSV saturation by f / (1 - f), f ~ U(0.4, 0.6), i.e.
  by 0.67 to 1.5 (0.5 would keep it);
- gridmask: the GridMask paper's ImageNet setting, r = 0.6 (a unit of side d keeps all but a
  square of side (1 - r) d: 16 % of the pixels go), any rotation, applied to 80 % of the images
  (the paper ramps up to 0.8; tfmir holds it). Removed pixels are set to 0, black; the GridMask
  paper masks normalised images, so its removed pixels have the mean colour (a `fill_value`
  near 128 comes closer to that).

Example:

```python
augment = build_augmentation(PAPER_AUGMENTATIONS, seed=0)
images, masks = augment(images, masks, seed=tf.constant([0, step]))  # (B, S, S, 3), (B, S, S, 1)
train = make_dataset(examples, training=True, batch_size=16, augmentations=PAPER_AUGMENTATIONS)
expand_dataset(examples, "expanded/")  # expanded/labels.csv: 8 rows per item
```

Reference:
    Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data using
    Style Transfer, Semantic Image Segmentation and Ensemble Learning", Sec. 3.2.
    Chen, Liu, Zhao and Jia, "GridMask Data Augmentation", https://arxiv.org/abs/2001.04086.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import os
import shutil
import zlib
from typing import Any, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfmir.data.datasets import Examples
from tfmir.files import exclusive_lock, write_atomic, write_json

AUGMENTATIONS = ("gridmask", "flip_left_right", "flip_up_down", "brightness", "contrast", "hue",
                 "saturation")
# Sec. 3.2 lists exactly these seven.
PAPER_AUGMENTATIONS = AUGMENTATIONS
# The ones that move pixels: a segmentation mask must follow them; the others leave it alone.
GEOMETRIC_AUGMENTATIONS = ("flip_left_right", "flip_up_down")
# Colour changes come before GridMask, so that removed cells keep exactly the fill value.
_ORDER = ("flip_left_right", "flip_up_down", "brightness", "contrast", "hue", "saturation",
          "gridmask")
DEFAULT_STRENGTHS = {
    "gridmask": {"ratio": 0.6, "rotation": 0.5, "probability": 0.8, "fill_value": 0},
    "brightness": 0.1,
    "contrast": 0.2,
    "hue": 0.05,
    "saturation": (0.4, 0.6),
}
GRIDMASK_INSTALL_HINT = "GridMask needs keras-cv: pip install tfmir[gridmask]"
# The name of the unaugmented copy in an expanded dataset.
ORIGINAL = "original"
IMAGE_FORMATS = ("png", "jpg", "jpeg")
MANIFEST = "labels.csv"
EXPANSION_RECORD = "expansion.json"
_RECORD_VERSION = "tfmir.data.expand_dataset/1"
_JPEG_QUALITY = 95


def check_augmentations(names: Sequence[str]) -> tuple[str, ...]:
    """Validates augmentation names: a sequence of distinct `AUGMENTATIONS` entries.

    Example:
    >>> check_augmentations(["hue", "gridmask"])
    ('hue', 'gridmask')
    """
    if isinstance(names, str):
        raise ValueError(f"augmentations must be a sequence of names such as ('gridmask', "
                         f"'hue'), not one string. Received: names={names!r}")
    names = tuple(names)
    unknown = [name for name in names if name not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"augmentation names must be among {AUGMENTATIONS}. "
                         f"Received: names={names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"augmentation names must be distinct. Received: names={names!r}")
    return names


def _import_keras_cv():
    try:
        import keras_cv
    except ImportError as error:
        raise ImportError(GRIDMASK_INSTALL_HINT) from error
    return keras_cv


def gridmask_layer(ratio: float = 0.6, rotation: float = 0.5, fill_value: int = 0):
    """keras-cv's GridMask layer, set so that `ratio` is the GridMask paper's r.

    The paper (Sec. 3.1) tiles the image with units of side d and keeps, in each, all but a
    square of side (1 - r) d ("r is the ratio of the shorter gray edge in a unit", keep ratio
    k = 1 - (1 - r)^2; the official code removes squares of side d - round(r d) with its
    `mode=1`). keras-cv's `ratio_factor` is the other edge: its removed square has side
    ratio_factor x d, so tfmir passes 1 - r. One more difference, fixed here: keras-cv rotates
    its mask bilinearly and removes every pixel the rotated square touches (squares grow by
    about a pixel per side: 13 % more removed at 96 px), so its rotation is swapped for a
    nearest-neighbour one, as the official code's PIL `rotate` does. Kept from keras-cv: d is
    drawn from U(min(0.5 H, 0.3 W), max(0.5 H, 0.3 W) + 1) (the paper's ImageNet runs draw
    96..224 on 224 px) and offsets from U(0, d).

    Args:
        ratio: the paper's r in (0, 1]: the kept share of a unit's edge.
        rotation: the mask turns by U(-rotation, rotation) x 360 degrees (0.5: any angle).
        fill_value: the value of removed pixels, an integer in [0, 255].

    Returns:
        A `keras_cv.layers.GridMask` in float32.

    Raises:
        ImportError: keras-cv is not installed.

    Example:

    ```python
    layer = gridmask_layer(ratio=0.6, rotation=0.0)
    masked = layer(images)  # 16 % of the pixels of each image set to 0, on average
    ```

    Reference:
        Chen et al., "GridMask Data Augmentation", https://arxiv.org/abs/2001.04086.
    """
    keras_cv = _import_keras_cv()
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"gridmask ratio (the paper's r) must be in (0, 1]. "
                         f"Received: ratio={ratio!r}")
    removed = 1.0 - float(ratio)
    layer = keras_cv.layers.GridMask(ratio_factor=(removed, removed),
                                     rotation_factor=float(rotation), fill_mode="constant",
                                     fill_value=fill_value, dtype="float32")
    layer.random_rotate = keras_cv.layers.RandomRotation(
        factor=float(rotation), fill_mode="constant", fill_value=0.0, interpolation="nearest",
        dtype="float32")
    return layer


class _StatelessSeed(keras.random.SeedGenerator):
    """Hands a Keras layer seeds derived from one seed tensor, without any state.

    Keras layers draw from their own `SeedGenerator`, a variable that parallel tf.data calls
    advance in whatever order they run; `keras.random` only takes integer seeds or a
    `SeedGenerator`. Each `next()` folds a call count into the given seed, so a layer that
    draws twice (`RandomHue`) gets two independent streams.
    """

    def __init__(self, seed):  # no state variable: deliberately skips SeedGenerator.__init__
        self._seed = tf.cast(seed, tf.int64)
        self._count = 0

    def next(self, ordered=True):
        self._count += 1
        return tf.random.experimental.stateless_fold_in(self._seed, self._count)


class _StatelessGenerator:
    """Stands in for the stateful `tf.random.Generator` keras-cv layers draw from."""

    def __init__(self, seed):
        self._seed = tf.cast(seed, tf.int64)
        self._count = 0

    def uniform(self, shape, minval=0, maxval=None, dtype=tf.float32, name=None):
        self._count += 1
        return tf.random.stateless_uniform(
            shape, tf.random.experimental.stateless_fold_in(self._seed, self._count),
            minval=minval, maxval=maxval, dtype=dtype)


def _resolve_strengths(names: tuple[str, ...], strengths: Mapping | None) -> dict:
    strengths = dict(strengths or {})
    for name in strengths:
        if name not in DEFAULT_STRENGTHS:
            raise ValueError(f"strengths keys must be among {tuple(DEFAULT_STRENGTHS)} (flips "
                             f"have none). Received: strengths={strengths!r}")
    resolved = copy.deepcopy({name: DEFAULT_STRENGTHS[name] for name in names
                              if name in DEFAULT_STRENGTHS})
    for name, value in strengths.items():
        if name != "gridmask":
            resolved[name] = tuple(value) if isinstance(value, (list, tuple)) else float(value)
            continue
        if not isinstance(value, Mapping):
            value = {"ratio": value}
        unknown = sorted(set(value) - set(DEFAULT_STRENGTHS["gridmask"]))
        if unknown:
            raise ValueError(f"gridmask strengths keys must be among "
                             f"{tuple(DEFAULT_STRENGTHS['gridmask'])}. Received: {dict(value)!r}")
        resolved["gridmask"] = {**DEFAULT_STRENGTHS["gridmask"], **value}
    if "saturation" in resolved:
        low_high = resolved["saturation"]
        if (not isinstance(low_high, tuple) or len(low_high) != 2
                or not 0.0 <= low_high[0] <= low_high[1] < 1.0):
            # A single number would reach Keras as (-f, f): negative saturations.
            raise ValueError("saturation strength must be a pair (low, high) with 0 <= low <= "
                             "high < 1 (Keras RandomSaturation's factor: f becomes the multiplier"
                             f" f / (1 - f), 0.5 keeps). Received: {low_high!r}")
    if "gridmask" in resolved and not 0.0 <= resolved["gridmask"]["probability"] <= 1.0:
        raise ValueError(f"gridmask probability must be in [0, 1]. "
                         f"Received: {resolved['gridmask']['probability']!r}")
    return resolved


class Augmentation:
    """The paper's augmentations as one random transform of an image batch (and its masks).

    Each named augmentation is drawn independently for every image: each flip happens with
    probability 1/2, brightness, contrast, hue and saturation change by a random amount within
    their strengths, and GridMask masks an image with its `probability`. The order of the names
    does not matter: flips come first, then colour, then GridMask (so its cells keep exactly the
    fill value). Flips move the mask with the image; colour and GridMask leave it alone. Pixels
    are float32 RGB in [0, 255], in and out.

    Every draw comes from one stateless seed: pass `seed=` (a shape-(2,) integer tensor) per
    call for a pipeline that is reproducible in any order of parallel calls, as `make_dataset`
    does; without it, calls draw seeds from a generator seeded with the constructor's `seed`.

    Args:
        names: augmentation names, among `AUGMENTATIONS`.
        seed: seeds the draws of calls made without `seed=`; None: not reproducible.
        strengths: overrides of `DEFAULT_STRENGTHS`, by name: the Keras layer's `factor` for
            brightness, contrast, hue and saturation (a (low, high) pair in [0, 1) for
            saturation); for gridmask the paper's r, or a dict of some of ratio, rotation,
            probability, fill_value.

    Raises:
        ValueError: an unknown name or strength.
        ImportError: "gridmask" without keras-cv installed.

    Example:

    ```python
    augment = Augmentation(PAPER_AUGMENTATIONS, seed=0)
    images = augment(images, seed=tf.constant([0, 1]))
    images, masks = augment(images, masks, seed=tf.constant([0, 2]))
    ```

    Reference:
        Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data",
        Sec. 3.2; Chen et al., https://arxiv.org/abs/2001.04086.
    """

    def __init__(self, names: Sequence[str] = PAPER_AUGMENTATIONS, *, seed: int | None = None,
                 strengths: Mapping[str, Any] | None = None):
        self.names = check_augmentations(names)
        self.seed = seed
        self.strengths = _resolve_strengths(self.names, strengths)
        self._layers = {name: self._build_layer(name) for name in self.names}
        self._generator = None  # made on the first call without seed=

    def __repr__(self) -> str:
        return f"Augmentation(names={self.names}, seed={self.seed})"

    def _next_seed(self) -> tf.Tensor:
        if self._generator is None:
            with tf.init_scope():  # a variable: made eagerly even while a function is traced
                self._generator = (tf.random.Generator.from_seed(self.seed)
                                   if self.seed is not None
                                   else tf.random.Generator.from_non_deterministic_state())
        return self._generator.make_seeds(1)[:, 0]

    def _build_layer(self, name: str):
        strength = self.strengths.get(name)
        # float32 whatever the global mixed-precision policy: bfloat16 cannot hold 0..255 exactly.
        if name == "flip_left_right":
            return keras.layers.RandomFlip("horizontal", dtype="float32")
        if name == "flip_up_down":
            return keras.layers.RandomFlip("vertical", dtype="float32")
        if name == "brightness":
            return keras.layers.RandomBrightness(strength, value_range=(0, 255), dtype="float32")
        if name == "contrast":
            return keras.layers.RandomContrast(strength, value_range=(0, 255), dtype="float32")
        if name == "hue":
            return keras.layers.RandomHue(strength, value_range=(0, 255), dtype="float32")
        if name == "saturation":
            # Not (0, 255): this layer clips the HSV saturation, which lies in [0, 1], to its
            # value_range; (0, 255) lets it pass 1 and gives negative pixels. The RGB scale
            # passes through HSV untouched (V = max channel), so [0, 255] images are fine.
            return keras.layers.RandomSaturation(strength, value_range=(0, 1), dtype="float32")
        options = self.strengths["gridmask"]
        return gridmask_layer(ratio=options["ratio"], rotation=options["rotation"],
                              fill_value=options["fill_value"])

    def __call__(self, images: tf.Tensor, masks: tf.Tensor | None = None, *,
                 seed: tf.Tensor | None = None):
        """Augments a batch (B, H, W, 3) or one image (H, W, 3), with its masks if given.

        Args:
            images: RGB pixels in [0, 255], any real dtype.
            masks: optional (B, H, W, 1) or (H, W, 1) segmentation masks, moved by the flips.
            seed: shape (2,) integer seed of every draw of this call.

        Returns:
            float32 images like `images`, or the pair (images, masks).
        """
        return self._apply(self.names, images, masks, seed, certain=False)

    def transform(self, name: str, images: tf.Tensor, masks: tf.Tensor | None = None, *,
                  seed: tf.Tensor | None = None):
        """Applies augmentation `name` for certain: a flip always flips, GridMask always masks.

        What `expand_dataset` writes for each copy; colour changes still draw their amount.

        Args:
            name: one of this augmentation's names.
            images, masks, seed: as for `__call__`.

        Returns:
            As for `__call__`.
        """
        if name not in self.names:
            raise ValueError(f"name must be one of {self.names}. Received: name={name!r}")
        return self._apply((name,), images, masks, seed, certain=True)

    def _apply(self, names, images, masks, seed, certain):
        images = tf.convert_to_tensor(images)
        rank = images.shape.rank
        if rank not in (3, 4) or images.shape[-1] != 3:
            raise ValueError(f"images must be (H, W, 3) or (B, H, W, 3). "
                             f"Received shape {images.shape}")
        images = tf.cast(images if rank == 4 else images[None], tf.float32)
        if masks is not None:
            masks = tf.convert_to_tensor(masks)
            if masks.shape.rank != rank or masks.shape[-1] != 1:
                raise ValueError(f"masks must be shaped like the images with one channel. "
                                 f"Received shape {masks.shape} for images of shape "
                                 f"{images.shape if rank == 4 else images.shape[1:]}")
            masks = masks if rank == 4 else masks[None]
        if seed is None:
            seed = self._next_seed()
        # One stream per augmentation, by its place in AUGMENTATIONS: adding or dropping one
        # leaves the draws of the others unchanged.
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64),
                                                       num=len(AUGMENTATIONS))
        for name in _ORDER:
            if name not in names:
                continue
            name_seed = seeds[AUGMENTATIONS.index(name)]
            if name in GEOMETRIC_AUGMENTATIONS:
                images, masks = self._flip(name, images, masks, name_seed, certain)
            elif name == "gridmask":
                images = self._gridmask(images, name_seed, certain)
            else:
                layer = self._layers[name]
                transformation = layer.get_random_transformation(
                    images, training=True, seed=_StatelessSeed(name_seed))
                images = layer.transform_images(images, transformation, training=True)
        # HSV round trips can leave a pixel a float ulp outside the range.
        images = tf.clip_by_value(tf.cast(images, tf.float32), 0.0, 255.0)
        if rank == 3:
            images = images[0]
            masks = None if masks is None else masks[0]
        return images if masks is None else (images, masks)

    def _flip(self, name, images, masks, seed, certain):
        if certain:
            axis = 2 if name == "flip_left_right" else 1
            flip = lambda tensor: tf.reverse(tensor, axis=[axis])  # noqa: E731
            return flip(images), None if masks is None else flip(masks)
        layer = self._layers[name]
        transformation = layer.get_random_transformation(images, training=True,
                                                         seed=_StatelessSeed(seed))
        images = layer.transform_images(images, transformation, training=True)
        if masks is not None:
            masks = tf.cast(layer.transform_segmentation_masks(tf.cast(masks, tf.float32),
                                                               transformation, training=True),
                            masks.dtype)
        return images, masks

    def _gridmask(self, images, seed, certain):
        layer = self._layers["gridmask"]
        batch = tf.shape(images)[0]
        apply_seed, image_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
        image_seeds = tf.random.stateless_uniform([batch, 2], image_seed, minval=None,
                                                  maxval=None, dtype=tf.int64)

        def mask_one(arguments):
            image, one_seed = arguments
            # keras-cv draws from stateful tf.random.Generators (its own and its rotation's);
            # stateless stand-ins make the draw a function of the seed alone.
            saved = layer._random_generator, layer.random_rotate._random_generator
            layer._random_generator = _StatelessGenerator(one_seed)
            layer.random_rotate._random_generator = _StatelessGenerator(
                tf.random.experimental.stateless_fold_in(one_seed, -1))
            try:
                transformation = layer.get_random_transformation(image=image)
                return tf.cast(layer.augment_image(image, transformation=transformation),
                               tf.float32)
            finally:
                layer._random_generator, layer.random_rotate._random_generator = saved

        masked = tf.map_fn(mask_one, (images, image_seeds),
                           fn_output_signature=tf.TensorSpec(images.shape[1:], tf.float32))
        if certain:
            return masked
        probability = self.strengths["gridmask"]["probability"]
        chosen = tf.random.stateless_uniform([batch], apply_seed) < probability
        return tf.where(chosen[:, None, None, None], masked, images)


def build_augmentation(names: Sequence[str] = PAPER_AUGMENTATIONS, seed: int | None = None,
                       strengths: Mapping[str, Any] | None = None) -> Augmentation:
    """The online augmentation of `names`: `Augmentation(names, seed=seed, strengths=strengths)`.

    Example:

    ```python
    augment = build_augmentation(["flip_left_right", "hue"], seed=0)
    images = augment(images, seed=tf.constant([0, step]))
    ```
    """
    return Augmentation(names, seed=seed, strengths=strengths)


# --- Offline expansion --------------------------------------------------------------------------


def _output_stem(item_id: str) -> str:
    parts = item_id.replace(os.sep, "/").split("/")
    if item_id.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"item id {item_id!r} cannot name a file inside the output directory "
                         "(it is absolute or has empty, '.' or '..' parts); give the items plain "
                         "relative ids")
    return "/".join(parts)


def _input_fingerprint(examples: Examples) -> str:
    """A digest of what the expansion reads: ids, labels, sources, splits, files or pixels."""
    digest = hashlib.sha256()
    fields = [examples.ids, np.asarray(examples.class_names)[examples.labels], examples.sources]
    fields += [field for field in (examples.splits, examples.paths, examples.mask_paths)
               if field is not None]
    for field in fields:
        digest.update(json.dumps([str(value) for value in field]).encode("utf-8"))
    for pixels in (examples.images, examples.masks):
        if pixels is not None:
            digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def _encode(pixels: np.ndarray, image_format: str) -> bytes:
    if image_format == "png":
        return tf.io.encode_png(pixels).numpy()
    return tf.io.encode_jpeg(pixels, quality=_JPEG_QUALITY).numpy()


def _to_uint8(pixels: tf.Tensor) -> np.ndarray:
    return np.asarray(tf.cast(tf.round(tf.clip_by_value(pixels, 0.0, 255.0)), tf.uint8))


def _prepare_directory(directory: str, record: dict, overwrite: bool) -> None:
    record_path = os.path.join(directory, EXPANSION_RECORD)
    owned = [os.path.join(directory, name) for name in (MANIFEST, EXPANSION_RECORD, "images",
                                                       "masks")]
    if overwrite:
        for path in owned:
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    elif os.path.exists(record_path):
        with open(record_path, encoding="utf-8") as stream:
            previous = json.load(stream)
        differing = sorted(key for key in set(previous) | set(record)
                           if previous.get(key) != record.get(key))
        if differing:
            raise ValueError(f"{directory} holds an expansion of another input or setting "
                             f"(differing: {', '.join(differing)}); pass overwrite=True to "
                             "replace it or choose another directory")
    elif any(os.path.exists(path) for path in owned):
        raise ValueError(f"{directory} holds a {MANIFEST} or images/ not written by "
                         "expand_dataset; pass overwrite=True to replace them or choose another "
                         "directory")
    if not os.path.exists(record_path):
        write_json(record_path, record)


def expand_dataset(examples: Examples, directory: str | os.PathLike, *,
                   augmentations: Sequence[str] = PAPER_AUGMENTATIONS, seed: int = 0,
                   overwrite: bool = False, image_format: str = "png",
                   strengths: Mapping[str, Any] | None = None) -> str:
    """Writes the paper's offline expansion: each image, then one copy per augmentation.

    For every item, `images/<id>__original.<ext>` and `images/<id>__<augmentation>.<ext>` for
    each augmentation (8 files per item for the paper's seven: "7 more different images"), at
    the image's own size, each copy with its augmentation applied for certain
    (`Augmentation.transform`: flips always flip, GridMask always masks). Items with a mask get
    `masks/<id>__<augmentation>.png` (0/255), flipped with their image, untouched otherwise. A
    copy depends only on `seed`, the item's id and the augmentation.

    `labels.csv` lists every file: image_id (`<id>__<augmentation>`), path (relative to the
    manifest), label (the class name), source, source_id (the item's id), augmentation, and mask
    and split when the items have them, so `load_csv_manifest(<directory>/labels.csv)` and
    `tfmir train --data=<directory>/labels.csv` read it. Copies of one item must stay in one
    split: expand a training split alone, or items that carry their `splits` (a manifest
    without a split column is split 2:1:1 at random, row by row).

    Every file is written atomically (a temporary name, then a rename), so an interrupted run
    leaves only complete files and a rerun writes just the missing ones; a rerun with the same
    input and settings writes nothing. `expansion.json` records the input's digest and the
    settings; a directory holding another one is refused unless `overwrite`.

    Args:
        examples: the items, in memory or on disk (read with the pipeline's readers).
        directory: the output folder (created).
        augmentations: the copies to write, among `AUGMENTATIONS`.
        seed: the seed of every copy.
        overwrite: delete a previous expansion's manifest, record, images/ and masks/ first.
        image_format: "png" (lossless), "jpg" or "jpeg" (quality 95).
        strengths: as for `Augmentation`.

    Returns:
        The manifest's path.

    Raises:
        ValueError: unknown augmentations or format, ids that cannot name files, or a
            directory holding another expansion (without overwrite).
        LockedError: another process is writing the same directory.

    Example:

    ```python
    manifest = expand_dataset(splits["train"], "isic_x8/")
    train = load_csv_manifest(manifest)  # 8 times the items
    ```

    Reference:
        Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data",
        Sec. 3.2.
    """
    # pipeline.py imports this module for make_dataset.
    from tfmir.data.pipeline import _read_mask_file, read_image_file

    if not isinstance(examples, Examples):
        raise ValueError(f"examples must be an Examples. Received {type(examples).__name__}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}. "
                         f"Received: image_format={image_format!r}")
    augment = Augmentation(augmentations, seed=seed, strengths=strengths)
    stems = [_output_stem(str(item_id)) for item_id in examples.ids]
    directory = os.path.abspath(os.fspath(directory))
    record = {"version": _RECORD_VERSION, "input": _input_fingerprint(examples), "seed": seed,
              "augmentations": list(augment.names), "image_format": image_format,
              "strengths": json.loads(json.dumps(augment.strengths))}
    names = (ORIGINAL, *augment.names)
    if examples.in_memory:
        has_mask = np.full(len(examples), examples.masks is not None)
    else:
        has_mask = (examples.mask_paths != "" if examples.mask_paths is not None
                    else np.zeros(len(examples), bool))

    rows = []
    with exclusive_lock(directory, "tfmir expand_dataset"):
        _prepare_directory(directory, record, overwrite)
        for index, stem in enumerate(stems):
            image_files = {name: f"images/{stem}__{name}.{image_format}" for name in names}
            mask_files = ({name: f"masks/{stem}__{name}.png" for name in names}
                          if has_mask[index] else {})
            wanted = list(image_files.values()) + list(mask_files.values())
            if not all(os.path.exists(os.path.join(directory, path)) for path in wanted):
                _write_item(examples, index, augment, names, image_files, mask_files, directory,
                            image_format, read_image_file, _read_mask_file)
            for name in names:
                row = {"image_id": f"{examples.ids[index]}__{name}", "path": image_files[name],
                       "label": examples.class_names[examples.labels[index]],
                       "source": examples.sources[index], "source_id": examples.ids[index],
                       "augmentation": name}
                if has_mask.any():
                    row["mask"] = mask_files.get(name, "")
                if examples.splits is not None:
                    row["split"] = examples.splits[index]
                rows.append(row)
        manifest = os.path.join(directory, MANIFEST)
        text = _manifest_text(rows)
        if not os.path.exists(manifest) or _read_text(manifest) != text:
            write_atomic(manifest, text)
    return manifest


def _write_item(examples, index, augment, names, image_files, mask_files, directory,
                image_format, read_image_file, read_mask_file) -> None:
    if examples.in_memory:
        image = tf.constant(examples.images[index])
        mask = tf.constant(examples.masks[index][..., None]) if mask_files else None
    else:
        image = read_image_file(tf.constant(os.fsencode(str(examples.paths[index]))))
        mask = (read_mask_file(tf.constant(os.fsencode(str(examples.mask_paths[index]))))
                if mask_files else None)
    image = tf.cast(image, tf.float32)
    mask = None if mask is None else tf.cast(tf.not_equal(mask, 0), tf.float32)
    # From the id, not the position: a copy does not change when `examples` is reordered.
    item_seed = tf.constant([augment.seed, zlib.crc32(str(examples.ids[index]).encode("utf-8"))],
                            tf.int64)
    for name in names:
        image_path = os.path.join(directory, image_files[name])
        mask_path = os.path.join(directory, mask_files[name]) if mask_files else None
        if os.path.exists(image_path) and (mask_path is None or os.path.exists(mask_path)):
            continue
        if name == ORIGINAL:
            outputs = (image, mask)
        else:
            outputs = augment.transform(name, image, mask, seed=item_seed)
            outputs = outputs if mask is not None else (outputs, None)
        new_image, new_mask = outputs
        write_atomic(image_path, _encode(_to_uint8(new_image), image_format))
        if mask_path is not None:
            write_atomic(mask_path, _encode(_to_uint8(new_mask * 255.0), "png"))


def _manifest_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["image_id", "path"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", newline="") as stream:
        return stream.read()
