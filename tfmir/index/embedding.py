"""Embedding images for an index: load a model from either form, embed in resumable shards.

`load_embedding_function` accepts a SavedModel written by `tfmir export` (its base directory or
a version directory) or a `.keras` checkpoint written by `tfmir train`, and returns an
`EmbeddingFunction`: a callable from `Examples` to float32 embeddings plus the model's fingerprint
and its query preprocessing (`tfmir.data.query_preprocessing`), both recorded in an index's
manifest and checked when it is searched. A hashing model (a "code" output,
`tfmir.models.retrieval_output`) gives its k hash bits as float32 -1.0 / +1.0 (kind "hash"),
from either form: the SavedModel's "bits" output, or the sign of the checkpoint's code values
(positive -> +1), so both give the same bits; `HammingIndex` takes them as they are.

- SavedModel: images on disk go through `serving_default` as file bytes (the same path as TF
  Serving and `tfmir serve`: header checks, decode, resize, centre crop inside the graph); files
  in formats other than PNG, JPEG and GIF are re-encoded as PNG first
  (`tfmir.images.graph_bytes`). In-memory images (MedMNIST)
  go through `embed_pixels`. The fingerprint is read from `assets.extra/export_info.json`, so it
  is known without loading the graph.
- `.keras`: `tfmir.training.embed_examples` with the resize side from `config.json` beside the
  checkpoint (or given); the fingerprint is `model_fingerprint(model)`.

`embed_in_shards` embeds rows in shards of `shard_size`, each written atomically as
`<directory>/shard-00000.npz` (its embeddings and its rows' ids) next to a `manifest.json` that
records the job: the model fingerprint, the query preprocessing, the shard size, the row count and
a digest of the ids. Run again after an interruption and the finished shards are reused; a folder
that holds another job's shards is refused (or discarded, with `overwrite=True`).

Across workers: `embed_worker_shards` embeds one worker's share (shard n belongs to worker
n % num_workers) into a folder that several processes share, and `read_shards` gathers every
shard once all are finished. The workers agree on one manifest (the first writes it; one whose
job differs is refused and deletes nothing); each holds a lock on its own share only.

Example:

```python
embed = load_embedding_function("exported/tfmir")
vectors = embed_in_shards(embed, [examples], "archive_index.shards", fingerprint=embed.fingerprint,
                          preprocessing=embed.preprocessing, shard_size=4096)
```
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import zipfile
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from absl import logging

from tfmir.data import Examples
from tfmir.files import (LOCK_SUFFIX, TEMPORARY_MARKER, LockedError, exclusive_lock,
                         write_atomic, write_json)

CONFIG_FILE = "config.json"
SHARD_MANIFEST_FILE = "manifest.json"
SHARD_FORMAT_VERSION = 1


class EmbeddingFunction:
    """A loaded embedding model: call it on `Examples` to get float32 (N, D) embeddings.

    Args:
        embed: function from `Examples` to float32 (N, D) embeddings in order.
        fingerprint: the model's fingerprint (as recorded in an index manifest).
        preprocessing: how a query is resized and cropped before the model
            (`tfmir.data.query_preprocessing`), recorded in an index manifest beside the
            fingerprint.
        description: what was loaded, for messages.
        kind: "float" (embeddings) or "hash" (±1 hash bits, searched by Hamming distance).
        output: the model output the vectors come from ("embedding" or "code").
        dimension: D, the embedding size or the number of bits.
    """

    def __init__(self, embed: Callable[[Examples], np.ndarray], *, fingerprint: str,
                 preprocessing: dict, description: str, kind: str = "float",
                 output: str = "embedding", dimension: int | None = None):
        self.embed = embed
        self.fingerprint = fingerprint
        self.preprocessing = preprocessing
        self.description = description
        self.kind = kind
        self.output = output
        self.dimension = dimension

    def describe_output(self) -> str:
        """The output in words, for messages: "the 'code' output (36-bit hash codes)"."""
        if self.kind == "hash":
            what = f"{self.dimension}-bit hash codes" if self.dimension else "hash codes"
        else:
            what = "float embeddings"
        return f"the {self.output!r} output ({what})"

    def __call__(self, examples: Examples) -> np.ndarray:
        return np.asarray(self.embed(examples), dtype=np.float32)


def index_kind_for(kind: str, embed: EmbeddingFunction) -> str:
    """The kind of index for a model's vectors, given the requested kind.

    A hashing model's bits are searched by Hamming distance: "auto" and "hamming" give
    "hamming", and a float index kind ("exact", "scann") is refused. For a float model the
    requested kind comes back unchanged ("hamming" then keeps the signs of its embeddings).

    Args:
        kind: "auto", "exact", "scann" or "hamming" (the `--kind` flag).
        embed: the loaded model.

    Returns:
        The kind to build ("auto" only for a float model).

    Raises:
        ValueError: a float index kind for a hashing model.
    """
    if embed.kind != "hash":
        return kind
    if kind in ("auto", "hamming"):
        return "hamming"
    raise ValueError(f"--kind={kind} does not fit {embed.description}: it retrieves with "
                     f"{embed.describe_output()}, searched by Hamming distance; use "
                     "--kind=hamming (or --kind=auto).")


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
    """The file's bytes as `serving_default` takes them (other formats converted to PNG)."""
    from tfmir.images import graph_bytes

    with open(path, "rb") as stream:
        # The readers checked every file's size from its header already.
        return graph_bytes(stream.read(), max_image_pixels=1 << 62)


def _saved_model_function(path: str) -> EmbeddingFunction:
    from tfmir.export import read_export_info, resolve_export_directory

    directory = resolve_export_directory(path)
    info = read_export_info(directory)
    kind = info.get("output_kind", "float")  # exports from before hashing models are float
    dimension = int(info["num_bits"] if kind == "hash" else info["embedding_dim"])
    key = "bits" if kind == "hash" else "embedding"
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
            return np.zeros((0, dimension), np.float32)
        if examples.in_memory:
            pixels = tf.constant(examples.images.astype(np.float32))
            return functions["pixels"](pixels=pixels)[key].numpy()
        encoded = tf.constant([_encoded_file(str(item)) for item in examples.paths])
        return functions["images"](images=encoded)[key].numpy()

    from tfmir.data import query_preprocessing

    preprocessing = query_preprocessing(image_size=int(info["image_size"]),
                                        resize_size=int(info["resize_size"]))
    return EmbeddingFunction(embed, fingerprint=str(info["model_fingerprint"]),
                             preprocessing=preprocessing, description=f"SavedModel {directory}",
                             kind=kind, output=info.get("output", key), dimension=dimension)


def _checkpoint_function(path: str, resize_size: int | None,
                         batch_size: int) -> EmbeddingFunction:
    resize_size = read_resize_size(path, resize_size)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a valid .keras file (not a zip archive); it may be "
                         "truncated or corrupted.")
    import keras

    import tfmir.models  # noqa: F401  (registers tfmir's Keras classes for loading)
    from tfmir.export import model_fingerprint
    from tfmir.models import HASH, output_shape, retrieval_output
    from tfmir.training.evaluation import embed_examples

    try:
        model = keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types for a bad archive
        raise ValueError(f"could not load {path} as a Keras model: "
                         f"{type(error).__name__}: {error}") from error

    try:
        output, kind = retrieval_output(model)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error

    def embed(examples: Examples) -> np.ndarray:
        values = embed_examples(model, examples, resize_size=resize_size, batch_size=batch_size,
                                output=output)
        # The bits of an export's "bits" output: positive -> +1, zero or negative -> -1.
        return np.where(values > 0, 1.0, -1.0).astype(np.float32) if kind == HASH else values

    from tfmir.data import query_preprocessing

    image_size = getattr(model, "image_size", None) or int(model.inputs[0].shape[1])
    preprocessing = query_preprocessing(image_size=image_size, resize_size=resize_size)
    return EmbeddingFunction(embed, fingerprint=model_fingerprint(model),
                             preprocessing=preprocessing,
                             description=f"Keras checkpoint {path} (resize_size {resize_size})",
                             kind=kind, output=output,
                             dimension=int(output_shape(model, output)[-1]))


def load_embedding_function(path: str | os.PathLike, *, resize_size: int | None = None,
                            batch_size: int = 256) -> EmbeddingFunction:
    """Loads a SavedModel export (base or version directory) or a `.keras` checkpoint.

    Args:
        path: the export directory or the checkpoint file.
        resize_size: resize side for a checkpoint (default: from `config.json` beside it); a
            SavedModel does its own resizing and ignores it.
        batch_size: images per model call for a checkpoint.

    Returns:
        An `EmbeddingFunction`: float32 embeddings (kind "float"), or ±1 hash bits for a hashing
        model (kind "hash").

    Raises:
        ValueError: a missing path, a file that is not a `.keras` checkpoint, a directory without
            a SavedModel, a checkpoint without a known resize side, or a model with several
            outputs of which none is an "embedding" or a "code".
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


def worker_shard_numbers(num_shards: int, num_workers: int, worker_index: int) -> range:
    """The shards that worker `worker_index` of `num_workers` embeds.

    Every `num_workers`-th shard starting at `worker_index`, as `tf.data.Dataset.shard` deals out
    elements: the shard numbered n belongs to worker n % num_workers. Dealing shards out in turn
    gives each worker its share of every part of the data (in-memory MedMNIST rows embed far
    faster than files on disk), and the worker that owes a missing shard follows from its number.
    """
    return range(worker_index, num_shards, num_workers)


def number_ranges(numbers: Sequence[int], limit: int = 20) -> str:
    """Sorted numbers as runs, "0-3, 6, 9-10"; after `limit` runs, how many numbers are left."""
    runs = []
    for number in sorted(numbers):
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    text = ", ".join(str(first) if first == last else f"{first}-{last}"
                     for first, last in runs[:limit])
    left = sum(last - first + 1 for first, last in runs[limit:])
    return text + (f" and {left} more" if left else "")


class ShardMismatchError(ValueError):
    """The shard folder holds another job's shards: another model, preprocessing, shard size or
    data (the difference is named)."""


class MissingShardsError(ValueError):
    """Some shards are not finished: `numbers` lists them, out of `num_shards`."""

    def __init__(self, directory: str, numbers: Sequence[int], num_shards: int):
        self.directory = directory
        self.numbers = sorted(numbers)
        self.num_shards = num_shards
        noun = "shard" if len(self.numbers) == 1 else "shards"
        super().__init__(f"{len(self.numbers)} of the {num_shards} shards in {directory} are "
                         f"missing or unreadable: {noun} {number_ranges(self.numbers)}")


class _ShardJob:
    """The rows of `parts` cut into shards of `shard_size` rows, and the manifest naming the job."""

    def __init__(self, parts: Sequence[Examples], directory: str | os.PathLike, *,
                 fingerprint: str, preprocessing: dict | None, shard_size: int):
        if int(shard_size) != shard_size or shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer. Received: {shard_size!r}")
        self.parts = list(parts)
        self.ids = (np.concatenate([part.ids for part in self.parts]).astype(str) if self.parts
                    else np.array([], str))
        if len(self.ids) == 0:
            raise ValueError("nothing to embed: the data holds no items.")
        self.directory = os.fspath(directory)
        self.shard_size = int(shard_size)
        self.num_shards = -(-len(self.ids) // self.shard_size)
        self.starts = np.cumsum([0] + [len(part) for part in self.parts])
        # Through JSON, as it is read back from disk (tuples become lists).
        self.manifest = json.loads(json.dumps({
            "format_version": SHARD_FORMAT_VERSION, "model_fingerprint": fingerprint,
            "preprocessing": preprocessing, "shard_size": self.shard_size,
            "count": int(len(self.ids)), "ids_sha256": _digest(self.ids)}))

    def rows(self, number: int) -> tuple[int, int]:
        start = number * self.shard_size
        return start, min(start + self.shard_size, len(self.ids))

    def read(self, number: int) -> np.ndarray | None:
        """The finished shard's embeddings; None when it is missing or holds other rows."""
        path = shard_path(self.directory, number)
        start, stop = self.rows(number)
        return _read_shard(path, self.ids[start:stop]) if os.path.isfile(path) else None

    def embed(self, number: int, embed: Callable[[Examples], np.ndarray], batch_size: int,
              bar) -> np.ndarray:
        """Embeds the shard's rows `batch_size` at a time and writes the shard atomically."""
        start, stop = self.rows(number)
        batches = []
        for batch_start in range(start, stop, batch_size):
            batch_stop = min(batch_start + batch_size, stop)
            batches.append(self._embed_rows(embed, batch_start, batch_stop))
            if bar is not None:
                bar.add(batch_stop - batch_start)
        embeddings = np.concatenate(batches)
        ids = self.ids[start:stop]
        write_atomic(shard_path(self.directory, number),
                     lambda stream: np.savez(stream, ids=ids, embeddings=embeddings))
        return embeddings

    def _embed_rows(self, embed, start: int, stop: int) -> np.ndarray:
        pieces = []
        for part, offset in zip(self.parts, self.starts[:-1]):
            low, high = max(start - offset, 0), min(stop - offset, len(part))
            if low < high:
                pieces.append(np.asarray(embed(part.subset(np.arange(low, high))), np.float32))
        return np.concatenate(pieces)


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


def _read_manifest(path: str) -> dict | None:
    """The shard folder's manifest; None when there is none yet."""
    try:
        with open(path) as stream:
            manifest = json.load(stream)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        return {"unreadable": f"{type(error).__name__}: {error}"}
    return manifest if isinstance(manifest, dict) else {"unreadable": "not a JSON object"}


def _create_manifest(path: str, manifest: dict) -> dict:
    """Writes `manifest` unless one is there already; returns the one on disk.

    Workers that start together race to write it: a hard link creates the name only if it does
    not exist, and only with complete contents, so the first wins and the others compare theirs
    with it (a plain rename would let the last one win after the first had started).
    """
    directory = os.path.dirname(path)
    staged = os.path.join(directory, f".{SHARD_MANIFEST_FILE}{TEMPORARY_MARKER}"
                                     f"{os.getpid()}-{secrets.token_hex(4)}")
    write_json(staged, manifest)
    try:
        os.link(staged, path)
    except FileExistsError:
        pass
    finally:
        os.remove(staged)
    return _read_manifest(path)


_MANIFEST_NAMES = {"model_fingerprint": "model fingerprint", "shard_size": "shard size",
                   "count": "item count", "ids_sha256": "item ids (sha256)",
                   "format_version": "format version"}


def _mismatch_message(directory: str, found: dict, expected: dict) -> str:
    if "unreadable" in found:
        return f"{directory} holds shards under an unreadable {SHARD_MANIFEST_FILE} " \
               f"({found['unreadable']})"
    differences = [f"{_MANIFEST_NAMES.get(key, key)} {found.get(key)!r} there, "
                   f"{expected.get(key)!r} here"
                   for key in sorted(set(found) | set(expected))
                   if found.get(key) != expected.get(key)]
    return f"{directory} holds the shards of another job ({'; '.join(differences)})"


def _worker_lock(directory: str, num_workers: int, worker_index: int) -> str:
    return os.path.join(directory, f"worker-{worker_index:05d}-of-{num_workers:05d}")


def _busy_workers(directory: str) -> list[str]:
    """The workers (by lock name) that hold their lock in `directory` now."""
    busy = []
    for name in sorted(os.listdir(directory)):
        if name.startswith("worker-") and name.endswith(LOCK_SUFFIX):
            try:
                with exclusive_lock(os.path.join(directory, name[:-len(LOCK_SUFFIX)]), "worker"):
                    pass
            except LockedError:
                busy.append(name[:-len(LOCK_SUFFIX)])
    return busy


def _agree_on_manifest(job: _ShardJob, *, overwrite: bool) -> None:
    """Makes the job's manifest the shard folder's, or checks that it is already.

    Another job's shards are refused; with `overwrite` they are discarded instead, unless a
    worker is still writing into the folder.
    """
    path = os.path.join(job.directory, SHARD_MANIFEST_FILE)
    found = _read_manifest(path)
    if found is None:
        found = _create_manifest(path, job.manifest)
    if found == job.manifest:
        return
    message = _mismatch_message(job.directory, found, job.manifest)
    if not overwrite:
        raise ShardMismatchError(message)
    busy = _busy_workers(job.directory)
    if busy:
        raise ShardMismatchError(f"{message}, and {', '.join(busy)} still writes into it")
    logging.warning("discarding the shards in %s: %s", job.directory, message)
    shutil.rmtree(job.directory)
    found = _create_manifest(path, job.manifest)
    if found != job.manifest:  # a worker of another job started in between
        raise ShardMismatchError(_mismatch_message(job.directory, found, job.manifest))


def _embedded_shards(job: _ShardJob, numbers: Sequence[int],
                     embed: Callable[[Examples], np.ndarray], batch_size: int,
                     progress: bool) -> Iterator[tuple[int, np.ndarray, bool]]:
    """(number, embeddings, whether it was reused) for each shard of `numbers`, in order."""
    bar = None
    if progress and len(numbers):
        import keras

        bar = keras.utils.Progbar(sum(stop - start for start, stop in map(job.rows, numbers)),
                                  unit_name="image")
    reused = 0
    for number in numbers:
        embeddings = job.read(number)
        if embeddings is None:
            yield number, job.embed(number, embed, int(batch_size), bar), False
            continue
        reused += 1
        if bar is not None:
            bar.add(len(embeddings))
        yield number, embeddings, True
    if reused:
        logging.info("reused %d of %d finished shards in %s", reused, len(numbers), job.directory)


def _check_batch_size(batch_size: int) -> None:
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer. Received: {batch_size!r}")


def embed_in_shards(embed: Callable[[Examples], np.ndarray], parts: Sequence[Examples],
                    directory: str | os.PathLike, *, fingerprint: str,
                    preprocessing: dict | None = None, shard_size: int = 4096,
                    batch_size: int = 256, progress: bool = True,
                    overwrite: bool = False) -> np.ndarray:
    """Embeds the rows of `parts` (in order) shard by shard, reusing shards already on disk.

    Args:
        embed: function from `Examples` to (N, D) embeddings (e.g. an `EmbeddingFunction`); it is
            called on at most `batch_size` rows at a time.
        parts: the items; their rows are numbered in order across the parts. Ids must be unique.
        directory: the shard folder (created; `<index>.shards` by convention).
        fingerprint: the model's fingerprint, recorded in the folder's manifest.
        preprocessing: the query preprocessing (`EmbeddingFunction.preprocessing`), recorded
            beside it.
        shard_size: rows per shard file.
        batch_size: rows per `embed` call.
        progress: show a progress bar.
        overwrite: discard the shards of another job (another model, preprocessing, shard size
            or data) instead of refusing them; still refused while a worker writes into them.

    Returns:
        float32 (total rows, D) embeddings. The shard folder is left in place; delete it once the
        index is saved.

    Raises:
        ShardMismatchError: the folder holds the shards of another job (and not `overwrite`).
    """
    _check_batch_size(batch_size)
    job = _ShardJob(parts, directory, fingerprint=fingerprint, preprocessing=preprocessing,
                    shard_size=shard_size)
    _agree_on_manifest(job, overwrite=overwrite)
    return np.concatenate([embeddings for _, embeddings, _ in _embedded_shards(
        job, range(job.num_shards), embed, batch_size, progress)])


def embed_worker_shards(embed: Callable[[Examples], np.ndarray], parts: Sequence[Examples],
                        directory: str | os.PathLike, *, num_workers: int, worker_index: int,
                        fingerprint: str, preprocessing: dict | None = None,
                        shard_size: int = 4096, batch_size: int = 256,
                        progress: bool = True) -> tuple[list[int], list[int]]:
    """Embeds one worker's share of the shards that `embed_in_shards` would write.

    Independent processes, on machines that share `directory`, each embed the shards of
    `worker_shard_numbers(num_shards, num_workers, worker_index)`; `read_shards` then gathers
    them all. Every worker must be given the same parts, fingerprint, preprocessing and shard
    size: the first to start writes the folder's manifest, and a worker whose job differs is
    refused before it embeds anything, leaving the others' shards alone. Finished shards are
    reused, as by `embed_in_shards`. A second process for the same worker is refused while the
    first runs (a lock on `<directory>/worker-IIIII-of-NNNNN.lock`).

    Args:
        embed, parts, directory, fingerprint, preprocessing, shard_size, batch_size, progress:
            as for `embed_in_shards`.
        num_workers: how many workers share the shards (at least 1).
        worker_index: this worker's index, in [0, num_workers).

    Returns:
        (the numbers of the shards embedded now, the numbers of those found finished).

    Raises:
        ShardMismatchError: the folder holds the shards of another job.
        tfmir.files.LockedError: another process is this worker already.

    Example:

    ```python
    embed_worker_shards(embed, [examples], "archive_index.shards", num_workers=4,
                        worker_index=int(os.environ["WORKER"]), fingerprint=embed.fingerprint,
                        preprocessing=embed.preprocessing)
    ```
    """
    if int(num_workers) != num_workers or num_workers < 1:
        raise ValueError(f"num_workers must be a positive integer. Received: {num_workers!r}")
    if int(worker_index) != worker_index or not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index must lie in [0, {num_workers}). Received: "
                         f"worker_index={worker_index!r}")
    _check_batch_size(batch_size)
    job = _ShardJob(parts, directory, fingerprint=fingerprint, preprocessing=preprocessing,
                    shard_size=shard_size)
    _agree_on_manifest(job, overwrite=False)
    lock = _worker_lock(job.directory, num_workers, worker_index)
    try:
        with exclusive_lock(lock, "worker"):
            numbers = worker_shard_numbers(job.num_shards, num_workers, worker_index)
            embedded, reused = [], []
            for number, _, was_reused in _embedded_shards(job, numbers, embed, batch_size,
                                                          progress):
                (reused if was_reused else embedded).append(number)
    except LockedError:
        raise LockedError(f"worker {worker_index} of {num_workers} is already embedding into "
                          f"{job.directory} (another process holds {lock}{LOCK_SUFFIX}); wait for "
                          "it to finish.") from None
    return embedded, reused


def read_shards(parts: Sequence[Examples], directory: str | os.PathLike, *, fingerprint: str,
                preprocessing: dict | None = None, shard_size: int = 4096) -> np.ndarray:
    """The embeddings of every row of `parts`, from shards finished by `embed_worker_shards`.

    Embeds nothing: the shards must all be there, written for the same parts, fingerprint,
    preprocessing and shard size.

    Returns:
        float32 (total rows, D) embeddings, in row order.

    Raises:
        ShardMismatchError: the folder holds the shards of another job.
        MissingShardsError: shards are missing or unreadable (its `numbers` lists them).
    """
    job = _ShardJob(parts, directory, fingerprint=fingerprint, preprocessing=preprocessing,
                    shard_size=shard_size)
    found = _read_manifest(os.path.join(job.directory, SHARD_MANIFEST_FILE))
    if found is None:  # no worker has started: shards without a manifest are not trusted
        raise MissingShardsError(job.directory, range(job.num_shards), job.num_shards)
    if found != job.manifest:
        raise ShardMismatchError(_mismatch_message(job.directory, found, job.manifest))
    shards = [job.read(number) for number in range(job.num_shards)]
    missing = [number for number, embeddings in enumerate(shards) if embeddings is None]
    if missing:
        raise MissingShardsError(job.directory, missing, job.num_shards)
    return np.concatenate(shards)


def _digest(ids: np.ndarray) -> str:
    import hashlib

    digest = hashlib.sha256()
    for item in ids:
        digest.update(item.encode("utf-8", "surrogateescape") + b"\0")
    return digest.hexdigest()
