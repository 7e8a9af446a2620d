"""Embedding images for an index: load a model from either form, embed in resumable shards.

`load_embedding_function` accepts a SavedModel written by `tfmir export` (its base directory or
a version directory) or a `.keras` checkpoint written by `tfmir train`, and returns an
`EmbeddingFunction`: a callable from `Examples` to float32 embeddings plus the model's fingerprint
and its query preprocessing (`tfmir.data.query_preprocessing`), both recorded in an index's
manifest and checked when it is searched.

- SavedModel: images on disk go through `serving_default` as file bytes (the same path as TF
  Serving and `tfmir serve`: header checks, decode, resize, centre crop inside the graph); files
  that are neither JPEG nor PNG are re-encoded as PNG with PIL first. In-memory images (MedMNIST)
  go through `embed_pixels`. The fingerprint is read from `assets.extra/export_info.json`, so it
  is known without loading the graph.
- `.keras`: `tfmir.training.embed_examples` with the resize side from `config.json` beside the
  checkpoint (or given); the fingerprint is `model_fingerprint(model)`.

`embed_in_shards` embeds rows in shards of `shard_size`, each written atomically as
`<directory>/shard-00000.npz` (its embeddings and its rows' ids) next to a `manifest.json` that
records the model fingerprint, the query preprocessing, the shard size and the row count. Run again after an interruption
and the shards whose ids still match (under the same fingerprint and shard size) are reused.

Example:

```python
embed = load_embedding_function("exported/tfmir")
vectors = embed_in_shards(embed, [examples], "archive_index.shards", fingerprint=embed.fingerprint,
                          preprocessing=embed.preprocessing, shard_size=4096)
```
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

from tfmir.data import Examples
from tfmir.files import write_atomic, write_json

CONFIG_FILE = "config.json"
SHARD_MANIFEST_FILE = "manifest.json"
SHARD_FORMAT_VERSION = 1
_NATIVE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


class EmbeddingFunction:
    """A loaded embedding model: call it on `Examples` to get float32 (N, D) embeddings.

    Args:
        embed: function from `Examples` to float32 (N, D) embeddings in order.
        fingerprint: the model's fingerprint (as recorded in an index manifest).
        preprocessing: how a query is resized and cropped before the model
            (`tfmir.data.query_preprocessing`), recorded in an index manifest beside the
            fingerprint.
        description: what was loaded, for messages.
    """

    def __init__(self, embed: Callable[[Examples], np.ndarray], *, fingerprint: str,
                 preprocessing: dict, description: str):
        self.embed = embed
        self.fingerprint = fingerprint
        self.preprocessing = preprocessing
        self.description = description

    def __call__(self, examples: Examples) -> np.ndarray:
        return np.asarray(self.embed(examples), dtype=np.float32)


def read_resize_size(checkpoint_path: str, resize_size: int | None = None) -> int:
    """The resize side: `resize_size` if given, else from `config.json` beside the checkpoint."""
    if resize_size is not None:
        return int(resize_size)
    config_path = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(f"the resize side is needed: there is no {CONFIG_FILE} next to "
                         f"{checkpoint_path} (`tfmir train` writes one); pass resize_size "
                         "(--resize_size).")
    try:
        with open(config_path) as stream:
            return int(json.load(stream)["resize_size"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"could not read resize_size from {config_path} ({error!r}); pass "
                         "resize_size (--resize_size).") from error


def _encoded_file(path: str) -> bytes:
    with open(path, "rb") as stream:
        contents = stream.read()
    if contents.startswith(_NATIVE_SIGNATURES):
        return contents
    from PIL import Image  # BMP, TIFF, GIF, ...: the serving signature reads JPEG and PNG only

    with Image.open(io.BytesIO(contents)) as image:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _saved_model_function(path: str) -> EmbeddingFunction:
    from tfmir.export import read_export_info, resolve_export_directory

    directory = resolve_export_directory(path)
    info = read_export_info(directory)
    loaded = {}

    def signatures():
        if not loaded:
            import tensorflow as tf

            model = tf.saved_model.load(directory)
            loaded.update(model=model, images=model.signatures["serving_default"],
                          pixels=model.signatures["embed_pixels"])
        return loaded

    def embed(examples: Examples) -> np.ndarray:
        import tensorflow as tf

        functions = signatures()
        if len(examples) == 0:
            return np.zeros((0, int(info["embedding_dim"])), np.float32)
        if examples.in_memory:
            pixels = tf.constant(examples.images.astype(np.float32))
            return functions["pixels"](pixels=pixels)["embedding"].numpy()
        encoded = tf.constant([_encoded_file(str(item)) for item in examples.paths])
        return functions["images"](images=encoded)["embedding"].numpy()

    from tfmir.data import query_preprocessing

    preprocessing = query_preprocessing(image_size=int(info["image_size"]),
                                        resize_size=int(info["resize_size"]))
    return EmbeddingFunction(embed, fingerprint=str(info["model_fingerprint"]),
                             preprocessing=preprocessing, description=f"SavedModel {directory}")


def _checkpoint_function(path: str, resize_size: int | None,
                         batch_size: int) -> EmbeddingFunction:
    resize_size = read_resize_size(path, resize_size)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a valid .keras file (not a zip archive); it may be "
                         "truncated or corrupted.")
    import keras

    import tfmir.models  # noqa: F401  (registers tfmir's Keras classes for loading)
    from tfmir.export import model_fingerprint
    from tfmir.training.evaluation import embed_examples

    try:
        model = keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types for a bad archive
        raise ValueError(f"could not load {path} as a Keras model: "
                         f"{type(error).__name__}: {error}") from error

    def embed(examples: Examples) -> np.ndarray:
        return embed_examples(model, examples, resize_size=resize_size, batch_size=batch_size)

    from tfmir.data import query_preprocessing

    image_size = getattr(model, "image_size", None) or int(model.inputs[0].shape[1])
    preprocessing = query_preprocessing(image_size=image_size, resize_size=resize_size)
    return EmbeddingFunction(embed, fingerprint=model_fingerprint(model),
                             preprocessing=preprocessing,
                             description=f"Keras checkpoint {path} (resize_size {resize_size})")


def load_embedding_function(path: str | os.PathLike, *, resize_size: int | None = None,
                            batch_size: int = 256) -> EmbeddingFunction:
    """Loads a SavedModel export (base or version directory) or a `.keras` checkpoint.

    Args:
        path: the export directory or the checkpoint file.
        resize_size: resize side for a checkpoint (default: from `config.json` beside it); a
            SavedModel does its own resizing and ignores it.
        batch_size: images per model call for a checkpoint.

    Returns:
        An `EmbeddingFunction`.

    Raises:
        ValueError: a missing path, a file that is not a `.keras` checkpoint, a directory without
            a SavedModel, or a checkpoint without a known resize side.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"model {path} does not exist. Expected a SavedModel directory from "
                         "`tfmir export` or a .keras checkpoint from `tfmir train`.")
    if os.path.isdir(path):
        try:
            return _saved_model_function(path)
        except FileNotFoundError as error:
            raise ValueError(str(error)) from error
    if not path.endswith(".keras"):
        raise ValueError(f"model {path} is neither a SavedModel directory nor a .keras "
                         "checkpoint.")
    return _checkpoint_function(path, resize_size, batch_size)


def shard_path(directory: str | os.PathLike, number: int) -> str:
    return os.path.join(os.fspath(directory), f"shard-{number:05d}.npz")


def _read_shard(path: str, expected_ids: np.ndarray) -> np.ndarray | None:
    """The shard's embeddings when it holds exactly `expected_ids`, else None."""
    try:
        with np.load(path, allow_pickle=False) as shard:
            ids, embeddings = shard["ids"], shard["embeddings"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    if ids.shape != expected_ids.shape or not np.array_equal(ids.astype(str), expected_ids):
        return None
    if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
        return None
    return embeddings.astype(np.float32)


def _prepare_directory(directory: str, manifest: dict) -> None:
    """Keeps the shards of the same job; clears those of another model, preprocessing or shard
    size."""
    path = os.path.join(directory, SHARD_MANIFEST_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as stream:
                previous = json.load(stream)
        except (OSError, ValueError):
            previous = None
        if previous == manifest:
            return
        logging.warning("discarding the shards in %s: they were written by another model, shard "
                        "size or dataset (%s)", directory, previous)
        shutil.rmtree(directory)
    os.makedirs(directory, exist_ok=True)
    write_json(path, manifest)


def embed_in_shards(embed: Callable[[Examples], np.ndarray], parts: Sequence[Examples],
                    directory: str | os.PathLike, *, fingerprint: str,
                    preprocessing: dict | None = None, shard_size: int = 4096,
                    batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """Embeds the rows of `parts` (in order) shard by shard, reusing shards already on disk.

    Args:
        embed: function from `Examples` to (N, D) embeddings (e.g. an `EmbeddingFunction`); it is
            called on at most `batch_size` rows at a time.
        parts: the items; their rows are numbered in order across the parts. Ids must be unique.
        directory: the shard folder (created; `<index>.shards` by convention).
        fingerprint: the model's fingerprint; shards of another model are discarded.
        preprocessing: the query preprocessing (`EmbeddingFunction.preprocessing`); shards
            embedded with another one are discarded too.
        shard_size: rows per shard file.
        batch_size: rows per `embed` call.
        progress: show a progress bar.

    Returns:
        float32 (total rows, D) embeddings. The shard folder is left in place; delete it once the
        index is saved.
    """
    if int(shard_size) != shard_size or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer. Received: {shard_size!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer. Received: {batch_size!r}")
    parts = list(parts)
    ids = np.concatenate([part.ids for part in parts]).astype(str) if parts else np.array([], str)
    if len(ids) == 0:
        raise ValueError("nothing to embed: the data holds no items.")
    directory = os.fspath(directory)
    ids_digest = _digest(ids)
    _prepare_directory(directory, {"format_version": SHARD_FORMAT_VERSION,
                                   "model_fingerprint": fingerprint, "preprocessing": preprocessing,
                                   "shard_size": int(shard_size),
                                   "count": int(len(ids)), "ids_sha256": ids_digest})
    starts = np.cumsum([0] + [len(part) for part in parts])

    def embed_rows(start: int, stop: int) -> np.ndarray:
        pieces = []
        for part, offset in zip(parts, starts[:-1]):
            low, high = max(start - offset, 0), min(stop - offset, len(part))
            if low < high:
                pieces.append(np.asarray(embed(part.subset(np.arange(low, high))), np.float32))
        return np.concatenate(pieces)

    bar = None
    if progress:
        import keras

        bar = keras.utils.Progbar(len(ids), unit_name="image")
    shards, reused = [], 0
    for number, start in enumerate(range(0, len(ids), shard_size)):
        stop = min(start + shard_size, len(ids))
        path = shard_path(directory, number)
        embeddings = _read_shard(path, ids[start:stop]) if os.path.isfile(path) else None
        if embeddings is not None:
            reused += 1
            if bar is not None:
                bar.add(stop - start)
        else:
            batches = []
            for batch_start in range(start, stop, batch_size):
                batch_stop = min(batch_start + batch_size, stop)
                batches.append(embed_rows(batch_start, batch_stop))
                if bar is not None:
                    bar.add(batch_stop - batch_start)
            embeddings = np.concatenate(batches)
            shard_ids = ids[start:stop]
            write_atomic(path, lambda stream: np.savez(stream, ids=shard_ids,
                                                       embeddings=embeddings))
        shards.append(embeddings)
    if reused:
        logging.info("reused %d of %d finished shards in %s", reused, len(shards), directory)
    return np.concatenate(shards)


def _digest(ids: np.ndarray) -> str:
    import hashlib

    digest = hashlib.sha256()
    for item in ids:
        digest.update(item.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()
