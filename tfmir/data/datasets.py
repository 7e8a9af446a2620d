"""Readers for labelled medical images: MedMNIST `.npz`, class folders and CSV manifests.

Every reader returns `Examples`: one split of labelled images, either decoded in memory (MedMNIST)
or as files on disk (folders, manifests). Files on disk are checked once when they are listed, by
decoding them with PIL, so a corrupt file is reported by name before training starts instead of
stopping a `tf.data` pipeline hours later.

Example:

```python
splits = load_medmnist("retinamnist", download=True)
train = splits["train"]
folder = load_image_folder("archive/")            # archive/<class>/<image>
parts = split_examples(folder, (2, 1, 1), seed=0)  # {"train", "val", "test"}
```
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import os
import pathlib
import tempfile
import urllib.error
import urllib.request
from typing import Iterable, Mapping, Sequence

import numpy as np
from absl import logging

from tfmir.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, decode_rgb

SPLIT_NAMES = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".dcm")
MEDMNIST_SIZES = (28, 64, 128, 224)
# The URL pattern of the medmnist package (v3) for the official Zenodo record.
MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{file_name}?download=1"
DATA_DIR_ENV = "TFMIR_DATA_DIR"

# MD5 of the official MedMNIST v3 files (Zenodo record 10519652), as listed in the medmnist
# package's `info.py` (INFO[flag]["MD5"], ["MD5_64"], ["MD5_128"], ["MD5_224"]).
MEDMNIST_MD5 = {
    "pathmnist": {
        28: "a8b06965200029087d5bd730944a56c1", 64: "55aa9c1e0525abe5a6b9d8343a507616",
        128: "ac42d08fb904d92c244187169d1fd1d9", 224: "2c51a510bcdc9cf8ddb2af93af1eadec",
    },
    "chestmnist": {
        28: "02c8a6516a18b556561a56cbdd36c4a8", 64: "9de6cd0b934ebb5b7426cfba5efbae16",
        128: "db107e5590b27930b62dbaf558aebee3", 224: "45bd33e6f06c3e8cdb481c74a89152aa",
    },
    "dermamnist": {
        28: "0744692d530f8e62ec473284d019b0c7", 64: "b70a2f5635c6199aeaa28c31d7202e1f",
        128: "2defd784463fa5243564e855ed717de1", 224: "8974907d8e169bef5f5b96bc506ae45d",
    },
    "octmnist": {
        28: "c68d92d5b585d8d81f7112f81e2d0842", 64: "e229e9440236b774d9f0dfef9d07bdaf",
        128: "0a97e76651ace45c5d943ee3f65b63ae", 224: "abc493b6d529d5de7569faaef2773ba3",
    },
    "pneumoniamnist": {
        28: "28209eda62fecd6e6a2d98b1501bb15f", 64: "8f4eceb4ccffa70c672198ea285246c6",
        128: "05b46931834c231683c68f40c47b2971", 224: "d6a3c71de1b945ea11211b03746c1fe1",
    },
    "retinamnist": {
        28: "bd4c0672f1bba3e3a89f0e4e876791e4", 64: "afda852cc34dcda56f86ad2b2457dbcc",
        128: "e48e916a24454daf90583d4e6efb1a18", 224: "eae7e3b6f3fcbda4ae613ebdcbe35348",
    },
    "breastmnist": {
        28: "750601b1f35ba3300ea97c75c52ff8f6", 64: "742edef2a1fd1524b2efff4bd7ba9364",
        128: "363e4b3f8d712e9b5de15470a2aaadf1", 224: "b56378a6eefa9fed602bb16d192d4c8b",
    },
    "bloodmnist": {
        28: "7053d0359d879ad8a5505303e11de1dc", 64: "2b94928a2ae4916078ca51e05b6b800b",
        128: "adace1e0ed228fccda1f39692059dd4c", 224: "b718ff6835fcbdb22ba9eacccd7b2601",
    },
    "tissuemnist": {
        28: "ebe78ee8b05294063de985d821c1c34b", 64: "123ece2eba09d0aa5d698fda57103344",
        128: "61b955355d7425a89687b06cca3ce0c2", 224: "b077128c4a949f0a4eb01517f9037b9c",
    },
    "organamnist": {
        28: "68e3f8846a6bd62f0c9bf841c0d9eacc", 64: "2dcccc29b88e6da5a01161ef20cda288",
        128: "eeae80d0a227a8d099027e1b3cfd3b60", 224: "50747347e05c87dd3aaf92c49f9f3170",
    },
    "organcmnist": {
        28: "b9ceb9546e10131b32923c5bbeaea2b1", 64: "3ce34a8724ea6f548e6db4744d03b6a9",
        128: "773c1f009daa3fe5d9a2a201b2a7ed94", 224: "050f5e875dc056f6768abf94ec9995d1",
    },
    "organsmnist": {
        28: "9ab87b696fb54e2a387ebe992d6ed5f1", 64: "53a6d115339d874c25e309a994ff46d3",
        128: "ded0c5fa01a95dc4978b956f613e9b8e", 224: "b354719e553fbbb2513d5533f52a4cb1",
    },
}

_ORGAN_NAMES = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
                "liver", "lung-left", "lung-right", "pancreas", "spleen")
# Label names of the 2D MedMNIST sets, from the medmnist package's `info.py` (INFO[flag]["label"]).
MEDMNIST_CLASS_NAMES = {
    "pathmnist": ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                  "normal colon mucosa", "cancer-associated stroma",
                  "colorectal adenocarcinoma epithelium"),
    "chestmnist": ("atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
                   "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
                   "pleural", "hernia"),
    "dermamnist": ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                   "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                   "melanocytic nevi", "vascular lesions"),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "retinamnist": ("0", "1", "2", "3", "4"),
    "breastmnist": ("malignant", "normal, benign"),
    "bloodmnist": ("basophil", "eosinophil", "erythroblast",
                   "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
                   "lymphocyte", "monocyte", "neutrophil", "platelet"),
    "tissuemnist": ("Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                    "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
                    "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"),
    "organamnist": _ORGAN_NAMES,
    "organcmnist": _ORGAN_NAMES,
    "organsmnist": _ORGAN_NAMES,
}


def _string_array(values, name: str, length: int | None = None) -> np.ndarray:
    if isinstance(values, (str, bytes)):
        if length is None:
            raise ValueError(f"{name} must be an array of strings. Received the string {values!r}")
        values = [values] * length
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D. Received shape {array.shape}")
    if array.dtype.kind == "S":
        array = np.char.decode(array, "utf-8")
    elif array.dtype.kind != "U":
        array = array.astype(str) if array.size else np.zeros((0,), dtype=str)
    return array


@dataclasses.dataclass(frozen=True, eq=False)
class Examples:
    """One split of labelled images, either decoded in memory or as files on disk.

    Attributes:
        labels: int64, shape (N,): the class index of each item.
        sources: str, shape (N,): the domain of each item, e.g. "retina". A single string is
            broadcast to every item.
        ids: str, shape (N,): unique ids, e.g. "retinamnist/train/17" or the file path relative
            to the dataset root.
        class_names: label index -> class name.
        images: uint8 (N, H, W, 3) when the images are in memory (MedMNIST); grayscale is already
            broadcast to RGB.
        paths: str (N,) absolute file paths when the images are on disk (folders, CSV).
        mask_paths: str (N,) absolute mask paths ("" where an item has no mask), or None; read
            when the images are on disk.
        masks: uint8 (N, H, W) binary masks of in-memory images (any non-zero value is
            foreground), with the height and width of `images`, or None.
        splits: str (N,) the split of each item when the data source says it, or None.

    Example:

    ```python
    examples = Examples(labels=[0, 1], sources="retina", ids=["a", "b"], class_names=("0", "1"),
                        images=np.zeros((2, 28, 28, 3), np.uint8))
    len(examples)             # 2
    examples.subset([1]).ids  # array(['b'])
    ```
    """

    labels: np.ndarray
    sources: np.ndarray
    ids: np.ndarray
    class_names: tuple[str, ...]
    images: np.ndarray | None = None
    paths: np.ndarray | None = None
    mask_paths: np.ndarray | None = None
    splits: np.ndarray | None = None
    masks: np.ndarray | None = None

    def __post_init__(self):
        set_field = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        labels = np.asarray(self.labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D (N,). Received shape {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers. Received dtype {labels.dtype}")
        labels = labels.astype(np.int64)
        set_field("labels", labels)
        num_items = len(labels)
        set_field("sources", _string_array(self.sources, "sources", num_items))
        set_field("ids", _string_array(self.ids, "ids"))
        if isinstance(self.class_names, str):
            raise ValueError("class_names must be a sequence of names. "
                             f"Received {self.class_names!r}")
        set_field("class_names", tuple(str(name) for name in self.class_names))

        if (self.images is None) == (self.paths is None):
            raise ValueError(
                "Examples needs exactly one of `images` (decoded, in memory) or `paths` (files on "
                f"disk). Received images={'set' if self.images is not None else None}, "
                f"paths={'set' if self.paths is not None else None}"
            )
        if self.images is not None:
            images = np.asarray(self.images)
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(
                    "images must be uint8 of shape (N, H, W, 3). "
                    f"Received dtype {images.dtype} and shape {images.shape}"
                )
            set_field("images", images)
        else:
            set_field("paths", _string_array(self.paths, "paths"))
        if self.mask_paths is not None:
            set_field("mask_paths", _string_array(self.mask_paths, "mask_paths"))
        if self.masks is not None:
            if self.images is None:
                raise ValueError("masks (in memory) need images in memory; give masks of images "
                                 "on disk as mask_paths. Received masks with paths")
            masks = np.asarray(self.masks)
            if masks.dtype != np.uint8 or masks.shape != self.images.shape[:3]:
                raise ValueError(
                    f"masks must be uint8 of shape {self.images.shape[:3]} (N, H, W), like "
                    f"images. Received dtype {masks.dtype} and shape {masks.shape}"
                )
            set_field("masks", masks)
        if self.splits is not None:
            set_field("splits", _string_array(self.splits, "splits", num_items))

        for name in ("sources", "ids", "images", "paths", "mask_paths", "splits"):
            value = getattr(self, name)
            if value is not None and len(value) != num_items:
                raise ValueError(
                    f"every field of Examples must have one entry per label ({num_items}). "
                    f"Received {name} of length {len(value)}"
                )
        if num_items:
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= len(self.class_names):
                raise ValueError(
                    f"labels must lie in [0, {len(self.class_names)}) for the "
                    f"{len(self.class_names)} class_names. Received labels from {low} to {high}"
                )
            unique_ids, counts = np.unique(self.ids, return_counts=True)
            if len(unique_ids) != num_items:
                duplicates = unique_ids[counts > 1][:5].tolist()
                raise ValueError(f"ids must be unique. Received duplicates such as {duplicates}")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        storage = (f"images={self.images.shape}" if self.images is not None
                   else f"paths=({len(self.paths)},)")
        return (f"Examples(num_items={len(self)}, num_classes={len(self.class_names)}, "
                f"sources={self.source_names}, {storage})")

    @property
    def in_memory(self) -> bool:
        """True when the images are decoded in memory (`images`), False when on disk (`paths`)."""
        return self.images is not None

    @property
    def source_names(self) -> tuple[str, ...]:
        """The sorted unique sources."""
        return tuple(str(source) for source in np.unique(self.sources))

    def subset(self, indices: np.ndarray | Sequence[int]) -> Examples:
        """Returns the items at `indices` (integers, in that order, or a boolean mask).

        Args:
            indices: integer positions (without repeats: ids stay unique) or a boolean mask of
                length N.

        Returns:
            A new `Examples` with the same `class_names`.
        """
        indices = np.asarray(indices)
        if indices.dtype == bool:
            if indices.shape != (len(self),):
                raise ValueError(f"a boolean mask must have shape ({len(self)},). "
                                 f"Received {indices.shape}")
            indices = np.flatnonzero(indices)
        elif indices.size == 0:
            indices = indices.astype(np.int64)
        elif not np.issubdtype(indices.dtype, np.integer):
            raise ValueError("indices must be integers or a boolean mask. "
                             f"Received dtype {indices.dtype}")
        take = lambda array: None if array is None else array[indices]  # noqa: E731
        return Examples(labels=self.labels[indices], sources=self.sources[indices],
                        ids=self.ids[indices], class_names=self.class_names,
                        images=take(self.images), paths=take(self.paths),
                        mask_paths=take(self.mask_paths), splits=take(self.splits),
                        masks=take(self.masks))


def _part_prefix(part: Examples) -> str:
    return "+".join(part.source_names)


def concatenate(parts: Sequence[Examples], *, separate_classes: bool = True) -> Examples:
    """Joins several `Examples`, e.g. the training splits of several sources.

    In-memory `masks` are kept when every part has them; a mix of parts with and without masks
    is refused.

    Args:
        parts: the `Examples` to join, all in memory with equal height and width, or all on disk.
        separate_classes: when True the labels of each part are offset so that classes of
            different parts never collide, and class names become "source/class". When False,
            classes with the same name are merged (labels are remapped by class name).

    Returns:
        One `Examples` holding the items of every part, in order. If the same id occurs in two
        parts, every id is prefixed with its source ("source/id").

    Example:

    ```python
    train = concatenate([retina["train"], xray["train"]])
    train.class_names  # ("retina/0", ..., "retina/4", "xray/normal", "xray/pneumonia")
    ```
    """
    parts = list(parts)
    if not parts:
        raise ValueError("concatenate needs at least one Examples. Received an empty sequence")
    kinds = ["in memory" if part.in_memory else "on disk" for part in parts]
    if len(set(kinds)) > 1:
        described = ", ".join(f"part {index} ({_part_prefix(part)}) {kind}"
                              for index, (part, kind) in enumerate(zip(parts, kinds)))
        raise ValueError("all parts must store the same kind of images (all in memory or all on "
                         f"disk). Received: {described}")
    if parts[0].in_memory:
        shapes = [part.images.shape[1:3] for part in parts]
        if len(set(shapes)) > 1:
            raise ValueError(
                "in-memory parts must have images of equal height and width. Received (H, W): "
                + ", ".join(f"part {i} ({_part_prefix(p)}) {s}"
                            for i, (p, s) in enumerate(zip(parts, shapes)))
            )

    labels = []
    if separate_classes:
        class_names, offset = [], 0
        owner = {}
        for index, part in enumerate(parts):
            prefix = _part_prefix(part)
            if prefix in owner:
                raise ValueError(
                    f"parts {owner[prefix]} and {index} both hold source {prefix!r}, so "
                    "separate_classes=True would give two classes the same name. Give the parts "
                    "different sources or use separate_classes=False to merge their classes"
                )
            owner[prefix] = index
            class_names += [f"{prefix}/{name}" for name in part.class_names]
            labels.append(part.labels + offset)
            offset += len(part.class_names)
    else:
        class_names = list(parts[0].class_names)
        for part in parts[1:]:
            class_names += [name for name in part.class_names if name not in class_names]
        index_of = {name: index for index, name in enumerate(class_names)}
        for part in parts:
            mapping = np.array([index_of[name] for name in part.class_names], dtype=np.int64)
            labels.append(mapping[part.labels] if len(part) else part.labels)

    def joined(name: str, fill: str | None = None):
        values = [getattr(part, name) for part in parts]
        if all(value is None for value in values):
            return None
        return np.concatenate([
            value if value is not None else np.full(len(part), fill, dtype=str)
            for part, value in zip(parts, values)
        ])

    # A missing mask cannot be filled in (zeros would say "no lesion"), unlike an empty path.
    with_masks = [part.masks is not None for part in parts]
    if any(with_masks) and not all(with_masks):
        missing = ", ".join(f"part {index} ({_part_prefix(part)})"
                            for index, part in enumerate(parts) if part.masks is None)
        raise ValueError(f"some parts have masks and others not (without masks: {missing}). "
                         "Give every part masks, or drop them with "
                         "dataclasses.replace(part, masks=None)")
    masks = np.concatenate([part.masks for part in parts]) if all(with_masks) else None

    sources = np.concatenate([part.sources for part in parts])
    ids = np.concatenate([part.ids for part in parts])
    if len(np.unique(ids)) != len(ids):
        ids = np.char.add(np.char.add(sources, "/"), ids)
    return Examples(labels=np.concatenate(labels), sources=sources, ids=ids,
                    class_names=tuple(class_names), images=joined("images"),
                    paths=joined("paths"), mask_paths=joined("mask_paths", ""),
                    splits=joined("splits", ""), masks=masks)


# --- MedMNIST -----------------------------------------------------------------------------------


def default_data_dir() -> pathlib.Path:
    """The dataset folder: $TFMIR_DATA_DIR, else ~/.tfmir/datasets."""
    override = os.environ.get(DATA_DIR_ENV)
    return pathlib.Path(override) if override else pathlib.Path.home() / ".tfmir" / "datasets"


def medmnist_file_name(name: str, size: int = 28) -> str:
    """The file name MedMNIST uses: "retinamnist.npz" at size 28, "retinamnist_64.npz" otherwise."""
    return f"{name}.npz" if size == 28 else f"{name}_{size}.npz"


def _md5(path: os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, destination: pathlib.Path, expected_md5: str | None) -> None:
    """Downloads `url` to `destination` atomically, verifying the MD5 when one is known."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part",
                                         dir=destination.parent)
    try:
        digest = hashlib.md5()
        with os.fdopen(handle, "wb") as file, urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                file.write(chunk)
                digest.update(chunk)
        if expected_md5 is not None and digest.hexdigest() != expected_md5:
            raise ValueError(
                f"the download of {url} has MD5 {digest.hexdigest()}, expected {expected_md5}; "
                f"the file was deleted, {destination} was not written. Try again, or place the "
                "official file there by hand"
            )
        os.replace(temporary, destination)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_medmnist(name: str, *, data_dir: str | os.PathLike | None = None, size: int = 28,
                  download: bool = False, source: str | None = None) -> dict[str, Examples]:
    """Loads a 2D MedMNIST set with its official train/val/test splits.

    The file is looked for as `data_dir/<file>` and `data_dir/<name>/<file>`, where `<file>` is
    MedMNIST's name ("retinamnist.npz" at size 28, "retinamnist_64.npz" at size 64, ...).

    Args:
        name: a MedMNIST flag ("retinamnist", "pneumoniamnist", "dermamnist", ...) or the path
            of an `.npz` file in the MedMNIST layout.
        data_dir: the folder holding the files (default: $TFMIR_DATA_DIR or ~/.tfmir/datasets).
        size: image size, one of 28, 64, 128, 224.
        download: fetch a missing file from the official Zenodo record (MD5-checked).
        source: the source name of every item (default: `name`).

    Returns:
        {"train", "val", "test"} -> `Examples` with images in memory.

    Raises:
        FileNotFoundError: the file is missing and could not be downloaded; the message names the
            file to place, the folder and the URL.
        ValueError: an unknown size, or a download whose MD5 does not match.

    Example:

    ```python
    splits = load_medmnist("retinamnist", download=True)
    splits["train"].images.shape  # (1080, 28, 28, 3)
    ```

    Reference:
        Yang et al., "MedMNIST v2", Scientific Data 10, 41 (2023), https://arxiv.org/abs/2110.14795
    """
    if str(name).endswith(".npz") or os.path.isfile(name):
        return load_medmnist_npz(name, source=source)
    if size not in MEDMNIST_SIZES:
        raise ValueError(f"size must be one of {MEDMNIST_SIZES}. Received: size={size!r}")
    flag = name.lower()
    data_dir = pathlib.Path(data_dir) if data_dir is not None else default_data_dir()
    file_name = medmnist_file_name(flag, size)
    for candidate in (data_dir / file_name, data_dir / flag / file_name):
        if candidate.is_file():
            return load_medmnist_npz(candidate, source=source or flag)

    destination = data_dir / file_name
    if flag not in MEDMNIST_MD5:
        raise FileNotFoundError(
            f"{file_name} was not found in {data_dir}, and {flag!r} is not a known 2D MedMNIST "
            f"set, so it cannot be downloaded. Known sets: {', '.join(sorted(MEDMNIST_MD5))}. "
            "Place the .npz file there or pass its path as `name`"
        )
    url = MEDMNIST_URL.format(file_name=file_name)
    if not download:
        raise FileNotFoundError(
            f"{file_name} was not found in {data_dir}. Download it from {url} and place it at "
            f"{destination}, or call load_medmnist(..., download=True)"
        )
    logging.info("downloading %s to %s", url, destination)
    try:
        _download(url, destination, MEDMNIST_MD5[flag][size])
    except (urllib.error.URLError, OSError) as error:
        raise FileNotFoundError(
            f"{file_name} was not found in {data_dir} and downloading it failed ({error}). "
            f"Download it from {url} on a machine with internet access and place it at "
            f"{destination}"
        ) from error
    return load_medmnist_npz(destination, source=source or flag)


def _medmnist_flag(path: pathlib.Path) -> str:
    stem = path.stem.lower()
    for size in MEDMNIST_SIZES[1:]:
        if stem.endswith(f"_{size}"):
            return stem[: -len(f"_{size}")]
    return stem


def _to_rgb_uint8(images: np.ndarray, where: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{where} must be 2D images (N, H, W), (N, H, W, 1) or (N, H, W, 3); 3D volumes are "
            f"not supported. Received shape {images.shape}"
        )
    if images.dtype != np.uint8:
        if not np.issubdtype(images.dtype, np.integer) or images.min() < 0 or images.max() > 255:
            raise ValueError(f"{where} must hold uint8 pixels. Received dtype {images.dtype}")
        images = images.astype(np.uint8)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images


def load_medmnist_npz(path: str | os.PathLike, *, source: str | None = None,
                      class_names: Sequence[str] | None = None) -> dict[str, Examples]:
    """Reads an `.npz` in the MedMNIST layout (`{train,val,test}_{images,labels}`).

    Args:
        path: the `.npz` file.
        source: the source name of every item (default: the MedMNIST flag read from the file name,
            e.g. "retinamnist" for "retinamnist_64.npz").
        class_names: label index -> name (default: MedMNIST's names for known sets, else "0", "1",
            ...).

    Returns:
        {"train", "val", "test"} -> `Examples` with uint8 RGB images in memory, int64 labels of
        shape (N,), ids "<source>/<split>/<index>" and `splits` set to the split name.

    Example:

    ```python
    splits = load_medmnist_npz("pneumoniamnist.npz", source="xray")
    splits["val"].images.shape  # (524, 28, 28, 3)
    ```
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MedMNIST file not found: {path}")
    flag = _medmnist_flag(path)
    source = source or flag
    with np.load(path, allow_pickle=False) as archive:
        expected = [f"{split}_{kind}" for split in SPLIT_NAMES for kind in ("images", "labels")]
        missing = [key for key in expected if key not in archive.files]
        if missing:
            raise ValueError(f"{path} is not in the MedMNIST layout: missing {missing}. "
                             f"Keys found: {sorted(archive.files)}")
        arrays = {key: archive[key] for key in expected}

    labels = {}
    for split in SPLIT_NAMES:
        split_labels = arrays[f"{split}_labels"]
        if split_labels.ndim == 2 and split_labels.shape[1] != 1:
            raise ValueError(
                f"{path} has multi-label targets ({split}_labels of shape {split_labels.shape}); "
                "tfmir needs one class per image. Keep the single-label rows first"
            )
        labels[split] = split_labels.reshape(-1).astype(np.int64)
    if class_names is None:
        if flag in MEDMNIST_CLASS_NAMES:
            class_names = MEDMNIST_CLASS_NAMES[flag]
        else:
            num_classes = 1 + max(int(values.max()) for values in labels.values() if values.size)
            class_names = tuple(str(index) for index in range(num_classes))

    result = {}
    for split in SPLIT_NAMES:
        images = _to_rgb_uint8(arrays[f"{split}_images"], f"{path.name}:{split}_images")
        count = len(images)
        if len(labels[split]) != count:
            raise ValueError(f"{path}: {split} has {count} images but {len(labels[split])} labels")
        result[split] = Examples(
            labels=labels[split], sources=np.full(count, source, dtype=object),
            ids=np.array([f"{source}/{split}/{index}" for index in range(count)]),
            class_names=tuple(class_names), images=images,
            splits=np.full(count, split, dtype=object),
        )
    return result


# --- Files on disk ------------------------------------------------------------------------------

def _check_image(path: str, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> str | None:
    """Returns why `path` is not a readable image, or None when it decodes fully.

    The size is checked from the header first (`tfmir.images`), so a decompression bomb is never
    decoded.
    """
    try:
        with open(path, "rb") as stream:
            data = stream.read()
        decode_rgb(data, max_image_pixels)
    except FileNotFoundError:
        return "file not found"
    except OSError as error:
        return f"{type(error).__name__}: {error}"
    except ImageError as error:
        return str(error)
    return None


def find_unreadable(paths: Iterable[str | os.PathLike], *,
                    num_workers: int | None = None,
                    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[tuple[str, str]]:
    """Decodes every file (`tfmir.images.decode_rgb`, in a thread pool) and lists those that fail.

    Args:
        paths: image files.
        num_workers: threads (default: min(32, cpu count + 4)).
        max_image_pixels: the most pixels an image may have (read from its header, before
            decoding).

    Returns:
        (path, reason) for each missing, empty, truncated, corrupt or non-image file, each image
        of more than `max_image_pixels` pixels or with a side under `MIN_IMAGE_SIDE`, in the
        order of `paths`.

    Example:

    ```python
    find_unreadable(["ok.png", "empty.png"])  # [("empty.png", "an empty file")]
    ```
    """
    paths = [os.fspath(path) for path in paths]
    if not paths:
        return []
    num_workers = num_workers or min(32, (os.cpu_count() or 1) + 4)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(num_workers, len(paths))) as pool:
        reasons = list(pool.map(lambda path: _check_image(path, max_image_pixels), paths,
                                chunksize=64))
    return [(path, reason) for path, reason in zip(paths, reasons) if reason is not None]


def _readable_mask(paths: Sequence[str], where: str, strict: bool) -> np.ndarray:
    """Checks `paths`; logs (or, when strict, raises on) each bad one; returns which are good."""
    unreadable = find_unreadable(paths)
    if unreadable and strict:
        path, reason = unreadable[0]
        raise ValueError(f"{path} is not a readable image ({reason}); "
                         f"{len(unreadable)} of {len(paths)} files {where} are unreadable")
    for path, reason in unreadable:
        logging.warning("skipping %s: %s", path, reason)
    if unreadable:
        logging.warning("skipped %d of %d files %s: not readable images",
                        len(unreadable), len(paths), where)
    bad = {path for path, _ in unreadable}
    return np.array([path not in bad for path in paths], dtype=bool)


def _relative_id(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


def load_image_folder(root: str | os.PathLike, *, source: str | None = None, strict: bool = False,
                      extensions: Sequence[str] = IMAGE_EXTENSIONS) -> Examples:
    """Lists a folder with one sub-folder per class (`root/<class>/.../<image>`).

    Class names are the sorted sub-folder names (hidden ones skipped); images are found at any
    depth below a class folder. Every image is decoded once with PIL: corrupt, empty or non-image
    files are logged one line each and skipped, with a count at the end.

    Args:
        root: the dataset folder.
        source: the source name of every item (default: the folder's name).
        strict: raise on the first unreadable file instead of skipping it.
        extensions: file name endings (case-insensitive) that count as images.

    Returns:
        `Examples` on disk: absolute `paths`, ids relative to `root` ("melanoma/img1.jpg").

    Raises:
        FileNotFoundError: `root` is not a folder.
        ValueError: no class folders, no images, or (strict) an unreadable file.

    Example:

    ```python
    examples = load_image_folder("archive/", source="skin")
    examples.class_names  # ("melanoma", "nevus")
    ```
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    extensions = tuple(extension.lower() for extension in extensions)
    entries = sorted(entry for entry in os.listdir(root) if not entry.startswith("."))
    class_names = [entry for entry in entries if os.path.isdir(os.path.join(root, entry))]
    if not class_names:
        loose = [entry for entry in entries if entry.lower().endswith(extensions)]
        raise ValueError(
            f"{root} has no class folders; expected one sub-folder per class "
            f"(root/<class>/<image>). Found {len(loose)} image files directly under it"
        )
    paths, labels = [], []
    for label, class_name in enumerate(class_names):
        for directory, subdirectories, files in os.walk(os.path.join(root, class_name)):
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
            for file_name in sorted(files):
                if not file_name.startswith(".") and file_name.lower().endswith(extensions):
                    paths.append(os.path.join(directory, file_name))
                    labels.append(label)
    if not paths:
        raise ValueError(f"{root} has class folders {class_names} but no image files in them "
                         f"(expected files ending in {extensions})")
    good = _readable_mask(paths, f"under {root}", strict)
    if not good.any():
        raise ValueError(f"none of the {len(paths)} image files under {root} is readable")
    paths = np.array(paths)[good]
    labels = np.array(labels, dtype=np.int64)[good]
    for label in sorted(set(range(len(class_names))) - set(labels.tolist())):
        logging.warning("class folder %s has no readable images",
                        os.path.join(root, class_names[label]))
    return Examples(labels=labels, sources=source or os.path.basename(root),
                    ids=np.array([_relative_id(path, root) for path in paths]),
                    class_names=tuple(class_names), paths=paths)


def _parse_labels(values: Sequence[str], path: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Integers are kept (names "0".."max"); anything else: sorted names -> indices."""
    values = [value.strip() for value in values]
    for row, value in enumerate(values):
        if not value:
            raise ValueError(f"{path}: row {row + 2} has an empty label")
    if all(value.lstrip("+-").isdigit() for value in values):
        labels = np.array([int(value) for value in values], dtype=np.int64)
        if labels.min() < 0:
            raise ValueError(f"{path}: integer labels must be >= 0. Received {labels.min()}")
        return labels, tuple(str(index) for index in range(int(labels.max()) + 1))
    class_names = tuple(sorted(set(values)))
    index_of = {name: index for index, name in enumerate(class_names)}
    return np.array([index_of[value] for value in values], dtype=np.int64), class_names


def load_csv_manifest(path: str | os.PathLike, *, root: str | os.PathLike | None = None,
                      strict: bool = False, source: str | None = None,
                      columns: Mapping[str, str | None] | None = None) -> Examples:
    """Reads a CSV manifest with a header row: `path,label[,source][,mask][,split]`.

    Other columns are ignored. Labels may be integers (kept as they are; class names "0".."max")
    or class names (sorted, then numbered). Files are checked like `load_image_folder` does.

    Args:
        path: the CSV file.
        root: the folder that relative paths (images and masks) resolve against (default: the
            CSV's folder).
        strict: raise on the first unreadable file instead of skipping its row.
        source: the source of rows without a `source` value (default: the CSV folder's name).
        columns: where a manifest names its columns otherwise: {tfmir name: header name}, a
            None header ignoring that column; e.g. `{"path": "image", "label": "dx",
            "source": None}` reads HAM10000-style label files.

    Returns:
        `Examples` on disk; `mask_paths` when there is a `mask` column ("" where empty), `splits`
        when there is a `split` column. Ids are the image paths relative to `root`.

    Raises:
        ValueError: a missing `path` or `label` column, an empty label, a file listed twice, no
            readable image, or (strict) an unreadable file.

    Example:

    ```python
    # manifest.csv:  path,label,split
    #                images/a.png,melanoma,train
    examples = load_csv_manifest("manifest.csv")
    ```
    """
    path = os.path.abspath(os.fspath(path))
    root = os.path.abspath(os.fspath(root)) if root is not None else os.path.dirname(path)
    with open(path, newline="", encoding="utf-8-sig") as file:
        reader = csv.reader(file)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty; expected a header row "
                             "path,label[,source][,mask][,split]")
        rows = [row for row in reader if any(cell.strip() for cell in row)]
    mapping = dict(columns or {})
    unknown = sorted(set(mapping) - {"path", "label", "source", "mask", "split"})
    if unknown:
        raise ValueError(f"columns keys must be among path, label, source, mask, split. "
                         f"Received: columns={columns!r}")
    renamed = {header_name.strip().lower(): name for name, header_name in mapping.items()
               if header_name is not None}
    # A header that is renamed takes its tfmir name; a column named like a tfmir name that the
    # mapping takes from elsewhere (or ignores) is dropped.
    columns = [renamed.get(name, None if name in mapping else name)
               for name in (name.strip().lower() for name in header)]
    for required in ("path", "label"):
        if required not in columns:
            raise ValueError(f"{path} has no {required!r} column; expected a header row "
                             f"path,label[,source][,mask][,split]. Columns found: {header}")
    if not rows:
        raise ValueError(f"{path} has a header but no rows")
    column = {name: index for index, name in reversed(list(enumerate(columns)))}

    def cells(name: str) -> list[str] | None:
        if name not in column:
            return None
        index = column[name]
        return [row[index].strip() if index < len(row) else "" for row in rows]

    def resolve(value: str) -> str:
        return os.path.normpath(os.path.join(root, value)) if value else ""

    image_paths = [resolve(value) for value in cells("path")]
    if "" in image_paths:
        raise ValueError(f"{path}: row {image_paths.index('') + 2} has an empty path")
    first_row = {}
    for row, image_path in enumerate(image_paths):
        if image_path in first_row:
            raise ValueError(f"{path}: {image_path} is listed twice (rows "
                             f"{first_row[image_path] + 2} and {row + 2})")
        first_row[image_path] = row
    labels, class_names = _parse_labels(cells("label"), path)
    default_source = source or os.path.basename(os.path.dirname(path))
    sources = [value or default_source for value in cells("source") or [""] * len(rows)]
    mask_values = cells("mask")
    mask_paths = [resolve(value) for value in mask_values] if mask_values is not None else None
    splits = cells("split")

    checked = image_paths + [mask for mask in mask_paths or [] if mask]
    good = _readable_mask(checked, f"listed in {path}", strict)
    bad = {checked_path for checked_path, ok in zip(checked, good) if not ok}
    keep = np.array([image_paths[row] not in bad and not (mask_paths and mask_paths[row] in bad)
                     for row in range(len(rows))], dtype=bool)
    if not keep.any():
        raise ValueError(f"none of the {len(rows)} rows of {path} has a readable image")
    select = lambda values: None if values is None else np.array(values)[keep]  # noqa: E731
    kept_paths = select(image_paths)
    return Examples(labels=labels[keep], sources=select(sources),
                    ids=np.array([_relative_id(image_path, root) for image_path in kept_paths]),
                    class_names=class_names, paths=kept_paths, mask_paths=select(mask_paths),
                    splits=select(splits))


# --- Splits and class balance -------------------------------------------------------------------


def split_by_column(examples: Examples) -> dict[str, Examples]:
    """Splits `examples` by its `splits` field (e.g. a CSV `split` column).

    Args:
        examples: items with `splits` set.

    Returns:
        split name -> `Examples`, names in order of first appearance, items in their order.

    Example:

    ```python
    parts = split_by_column(load_csv_manifest("labels.csv"))  # {"train": ..., "val": ..., ...}
    ```
    """
    if examples.splits is None:
        raise ValueError("examples has no split column (splits is None); use split_examples to "
                         "make a seeded split instead")
    empty = int(np.sum(examples.splits == ""))
    if empty:
        raise ValueError(f"{empty} of {len(examples)} items have an empty split name")
    names = list(dict.fromkeys(examples.splits.tolist()))
    return {name: examples.subset(np.flatnonzero(examples.splits == name)) for name in names}


def _allocate(count: int, ratios: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Largest-remainder allocation of `count` items to ratios; ties broken at random."""
    exact = count * ratios / ratios.sum()
    sizes = np.floor(exact).astype(np.int64)
    remainder = count - sizes.sum()
    if remainder:
        order = np.lexsort((rng.permutation(len(ratios)), -(exact - sizes)))
        sizes[order[:remainder]] += 1
    return sizes


def split_examples(examples: Examples, ratios: Sequence[float] = (2, 1, 1), *, seed: int = 0,
                   stratify: bool = True,
                   names: Sequence[str] = SPLIT_NAMES) -> dict[str, Examples]:
    """Splits `examples` at random into named parts with the given size ratios.

    With `stratify`, every (source, label) group is split on its own, so each split holds each
    class in the ratio within ±1 item. The result depends only on `seed` and the data.

    Args:
        examples: the items to split.
        ratios: relative sizes of the splits, e.g. (2, 1, 1) for 50/25/25 %.
        seed: the random seed.
        stratify: split each (source, label) group separately.
        names: the split names, one per ratio.

    Returns:
        split name -> `Examples`; every item is in exactly one split, in its original order.

    Raises:
        ValueError: ratios and names of different lengths, a non-positive ratio, or an empty
            split.

    Example:

    ```python
    parts = split_examples(load_image_folder("archive/"), (2, 1, 1), seed=0)
    ```
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    names = tuple(names)
    if ratios.ndim != 1 or len(ratios) != len(names):
        raise ValueError(f"ratios and names must have the same length. Received ratios="
                         f"{ratios.tolist()} and names={names}")
    if len(set(names)) != len(names):
        raise ValueError(f"split names must be unique. Received names={names}")
    if not np.all(ratios > 0):
        raise ValueError(f"ratios must be positive. Received ratios={ratios.tolist()}")
    rng = np.random.default_rng(seed)
    if stratify:
        keys = np.char.add(np.char.add(examples.sources, "\x00"), examples.labels.astype(str))
        _, groups = np.unique(keys, return_inverse=True)
        groups = groups.reshape(-1)
    else:
        groups = np.zeros(len(examples), dtype=np.int64)
    assignment = np.empty(len(examples), dtype=np.int64)
    for group in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == group))
        sizes = _allocate(len(members), ratios, rng)
        assignment[members] = np.repeat(np.arange(len(names)), sizes)
    sizes = {name: int(np.sum(assignment == index)) for index, name in enumerate(names)}
    empty = [name for name, size in sizes.items() if size == 0]
    if empty:
        raise ValueError(f"split {empty[0]!r} would be empty: sizes {sizes} for {len(examples)} "
                         f"items and ratios {ratios.tolist()}")
    return {name: examples.subset(np.flatnonzero(assignment == index))
            for index, name in enumerate(names)}


def downsample_top_classes(labels: np.ndarray | Sequence[int], num_equalized: int, *,
                           seed: int = 0) -> np.ndarray:
    """Caps the most frequent classes so that the top `num_equalized` classes have equal size.

    The (num_equalized - 1) most frequent classes are randomly downsampled to the count of the
    num_equalized-th most frequent class (ties in counts are ordered by label). Other classes are
    kept whole. The paper uses num_equalized=2 for Retina and 3 for ChestX-ray8.

    Args:
        labels: class labels, shape (N,).
        num_equalized: how many of the largest classes end up with equal size.
        seed: the random seed of the choice.

    Returns:
        The sorted indices of the kept items.

    Example:

    ```python
    labels = [0] * 50 + [1] * 30 + [2] * 20 + [3] * 5
    kept = downsample_top_classes(labels, 3)
    np.bincount(np.asarray(labels)[kept])  # [20, 20, 20, 5]
    ```

    Reference:
        Feng et al., "Universal Model for Multi-Domain Medical Image Retrieval",
        https://arxiv.org/abs/2007.08628, Sec. IV-A (Retina: "the most frequent label and second
        most frequent label are the same").
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D. Received shape {labels.shape}")
    classes, counts = np.unique(labels, return_counts=True)
    if not 1 <= num_equalized <= len(classes):
        raise ValueError(f"num_equalized must be between 1 and the number of classes "
                         f"({len(classes)}). Received: num_equalized={num_equalized}")
    order = np.lexsort((classes, -counts))  # by count, descending; ties by label
    cap = counts[order[num_equalized - 1]]
    rng = np.random.default_rng(seed)
    keep = np.ones(len(labels), dtype=bool)
    for position in order[: num_equalized - 1]:
        members = np.flatnonzero(labels == classes[position])
        if len(members) > cap:
            dropped = rng.choice(members, size=len(members) - cap, replace=False)
            keep[dropped] = False
    return np.flatnonzero(keep)


def keep_single_label(label_strings: Iterable[str], *, separator: str = "|") -> np.ndarray:
    """Indices of the rows whose label string holds one label (no `separator`).

    The universal-embedding paper drops the multi-label ChestX-ray8 images (e.g.
    "Effusion|Infiltration") and keeps single-label ones.

    Args:
        label_strings: label text per row, shape (N,).
        separator: what joins several labels.

    Returns:
        Sorted indices of the single-label, non-empty rows.

    Example:

    ```python
    keep_single_label(["Mass", "Effusion|Mass", "No Finding"])  # array([0, 2])
    ```
    """
    return np.array([index for index, value in enumerate(label_strings)
                     if str(value).strip() and separator not in str(value)], dtype=np.int64)
