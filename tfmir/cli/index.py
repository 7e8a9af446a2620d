"""`tfmir index`: embed an image archive with a trained model and write a search index.

    tfmir index --model=exported/tfmir --data=skin=path/to/folder --output=indexes/skin
    tfmir index --model=runs/sample/best.keras --data=sample --splits=test --output=indexes/sample
    tfmir index --model=exported/tfmir --data=skin=path/to/folder --kind=hamming --output=bits

--model is a SavedModel from `tfmir export` (base or version directory) or a .keras checkpoint
from `tfmir train` (resize side from its config.json, or --resize_size). A SavedModel embeds
files through its `serving_default` signature (file bytes, as TF Serving does) and in-memory
MedMNIST images through `embed_pixels`. --data takes the specs of `tfmir train` (all splits by
default) and also a plain folder of images without class sub-folders (unlabelled items).

--kind=hamming keeps one bit per embedding component, its sign (`tfmir.index.sign_codes`: D-bit
codes for D-dimensional embeddings), and searches by Hamming distance; `tfmir search` and
`tfmir serve` turn query embeddings into codes the same way. A hashing model (one with a "code"
output, e.g. Y-Net) gives k-bit hash codes: --kind=auto builds a hamming index of them, and
--kind=exact or --kind=scann is refused before anything is embedded.

An existing index at --output is replaced only with --overwrite (atomically: a reader sees the
old index or the new one), and a second `tfmir index` on the same --output while one runs is
refused (a lock on <output>.lock, released by the system when the first exits). An --output that
cannot be written (its folder is read-only, or a file stands where a folder should) is refused
before anything is embedded. Embeddings are written in shards of --shard_size rows to
<output>.shards/ as they are computed; after an interruption, run the same command again and the
finished shards are reused (checked against their ids). <output>.shards/manifest.json records
the job (model fingerprint, preprocessing, shard size, the ids' count and digest): shards of
another job are refused, or discarded with --overwrite. Once the index is saved (atomically) the
shards are removed. The index manifest records the model fingerprint and the query preprocessing
(resize side, crop, input size); `tfmir search` and `tfmir serve` refuse a model or resize side
that differ.

A style model (Gram matrix outputs, paper 003) gives a style database instead: see
`tfmir.cli.style_index` (--segmenter, --mask_size, --layer_weights, --projection_dim).

Embedding on several machines: each of N workers runs the same command with
--num_shards=N --shard_index=i, and one merge builds the index:

    tfmir index --model=M --data=D --output=/shared/skin --num_shards=2 --shard_index=0  # host 1
    tfmir index --model=M --data=D --output=/shared/skin --num_shards=2 --shard_index=1  # host 2
    tfmir index --model=M --data=D --output=/shared/skin --num_shards=2 --merge          # then

Worker i embeds the shard files whose number modulo N is i (shard n belongs to worker n % N, as
`tf.data.Dataset.shard` deals out elements, so every worker gets its share of each --data part)
into <output>.shards/, which must lie on a filesystem all workers share (NFS or the like), then
exits without building the index, printing the merge command. Every worker is resumable on its
own, and locks only its share (<output>.shards/worker-IIIII-of-NNNNN.lock). The first worker to
start writes the shard manifest; a worker given another --model, --data, --splits, --seed,
--strict, --resize_size or --shard_size is refused before it embeds anything, and deletes nothing.
With TF_CONFIG set and neither flag, the cluster's chief and worker tasks are the N workers: the
chief (if any) is index 0 and worker j is j + the number of chiefs (flags that disagree with
TF_CONFIG are refused). --merge takes the output lock and builds the index once every shard is
finished; otherwise it names the missing shards and the --shard_index that owes them (with
--num_shards, or TF_CONFIG) and embeds nothing. The plain command, without worker flags, also
builds from the workers' shards, embedding any that are missing itself.
"""

from __future__ import annotations

import os
import shutil

from absl import app, flags, logging

from tfmir.files import LockedError, exclusive_lock

_MODEL = flags.DEFINE_string(
    "model", None, "SavedModel directory from `tfmir export` (base or version directory) or a "
    ".keras checkpoint from `tfmir train`.", required=True)
_DATA = flags.DEFINE_multi_string(
    "data", None, "Dataset spec(s) `[source=]location`, as in `tfmir train` (sample, "
    "medmnist:NAME[@SIZE], a MedMNIST .npz, a CSV manifest, a class-per-folder directory), or a "
    "plain folder of images without class sub-folders (indexed without labels). Repeatable.",
    required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Index directory to write.", required=True)
_SPLITS = flags.DEFINE_list("splits", ["train", "val", "test"],
                            "Splits of each spec to index (default: all of them).")
_KIND = flags.DEFINE_enum(
    "kind", "auto", ["auto", "exact", "scann", "hamming", "style"],
    "Index kind; auto is ScaNN when it imports, else exact, hamming for a model that outputs "
    "hash codes, and style for a model with Gram matrix outputs (paper 003). hamming stores the "
    "sign of each embedding component as one bit (D-bit codes for D-dimensional embeddings) and "
    "searches by Hamming distance; `tfmir search` and `tfmir serve` binarize queries the same "
    "way. A hashing model's codes need hamming (or auto); a style model's outputs need style "
    "(or auto).")
_METRIC = flags.DEFINE_enum("metric", "cosine", ["cosine", "dot", "l2"],
                            "Similarity metric of an exact or scann index (a hamming index "
                            "always uses the Hamming distance).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Images per model call.", lower_bound=1)
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 4096, "Embeddings per shard file (the unit of "
                                   "resumption).", lower_bound=1)
_RESIZE_SIZE = flags.DEFINE_integer(
    "resize_size", None, "Resize side for a .keras --model (default: config.json beside it).",
    lower_bound=1)
_STRICT = flags.DEFINE_bool("strict", False, "Refuse unreadable image files instead of skipping.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder of MedMNIST .npz files.")
_DOWNLOAD = flags.DEFINE_bool("download", False, "Download missing MedMNIST files.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the 2:1:1 split of folders and manifests.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace an existing index at --output (without it, an existing index is "
    "refused, as tfmir export does), and discard shards left in <output>.shards by another "
    "model, preprocessing, shard size or data.")
_NUM_SHARDS = flags.DEFINE_integer(
    "num_shards", None, "Embed as one of this many workers (with --shard_index); with --merge, "
    "how many workers embedded the shards, to name those that owe missing ones. Default: the "
    "chief and worker tasks of TF_CONFIG when it is set.")
_SHARD_INDEX = flags.DEFINE_integer(
    "shard_index", None, "This worker's index in [0, --num_shards): it embeds the shard files "
    "whose number modulo --num_shards is this index into <output>.shards/ and exits without "
    "building the index. Default: this task's place in TF_CONFIG when it is set.")
_MERGE = flags.DEFINE_bool(
    "merge", False, "Build the index from the shards the workers finished, embedding nothing: "
    "missing shards are named and refused. (Without --merge and worker flags, missing shards "
    "are embedded here.)")

# Style models (paper 003; see tfmir.cli.style_index).
_SEGMENTER = flags.DEFINE_string(
    "segmenter", None, "Style models only: a .keras segmenter (pixels -> (B, S, S, 1) lesion "
    "probabilities) whose masks the database stores for the Dice measures.")
_MASK_SIZE = flags.DEFINE_integer(
    "mask_size", 64, "Style models only: side of the grid the masks are stored (bit-packed) and "
    "compared on.", lower_bound=1)
_LAYER_WEIGHTS = flags.DEFINE_list(
    "layer_weights", None, "Style models only: the style loss weight beta_l of each Gram layer "
    "(default: all 1), folded into the stored Grams.")
_PROJECTION_DIM = flags.DEFINE_integer(
    "projection_dim", 256, "Style models only: PCA dimensions of the packed Grams kept for fast "
    "search.", lower_bound=1)

# What the merge command that a worker prints repeats (the rest does not change the shards).
_MERGE_FLAGS = (_MODEL, _DATA, _OUTPUT, _SPLITS, _KIND, _METRIC, _SHARD_SIZE, _RESIZE_SIZE,
                _STRICT, _DATA_DIR, _SEED, _OVERWRITE)

SPLITS = ("train", "val", "test")


class IndexCommandError(Exception):
    """A problem with the command's inputs, reported as one line without a traceback."""


def _is_plain_folder(location: str) -> bool:
    """A folder with image files directly inside and no (visible) sub-folders."""
    if not os.path.isdir(location):
        return False
    entries = [entry for entry in os.listdir(location) if not entry.startswith(".")]
    return not any(os.path.isdir(os.path.join(location, entry)) for entry in entries)


def load_plain_folder(root: str, *, source: str | None, strict: bool):
    """The images directly in `root` as unlabelled `Examples` (ids: file names)."""
    import numpy as np

    from tfmir.data.datasets import IMAGE_EXTENSIONS, Examples, find_unreadable

    root = os.path.abspath(root)
    names = sorted(entry for entry in os.listdir(root)
                   if not entry.startswith(".") and entry.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise IndexCommandError(f"{root} has no image files (expected files ending in "
                                f"{IMAGE_EXTENSIONS}) and no class sub-folders.")
    paths = [os.path.join(root, name) for name in names]
    unreadable = find_unreadable(paths)
    if unreadable and strict:
        path, reason = unreadable[0]
        raise IndexCommandError(f"{path} is not a readable image ({reason}); {len(unreadable)} "
                                f"of {len(paths)} files under {root} are unreadable.")
    for path, reason in unreadable:
        logging.warning("skipping %s: %s", path, reason)
    bad = {path for path, _ in unreadable}
    keep = [index for index, path in enumerate(paths) if path not in bad]
    if not keep:
        raise IndexCommandError(f"none of the {len(paths)} image files under {root} is readable.")
    return Examples(labels=np.zeros(len(keep), np.int64), sources=source or os.path.basename(root),
                    ids=np.array(names)[keep], class_names=("",), paths=np.array(paths)[keep])


def load_parts(specs, splits) -> list[tuple]:
    """(Examples, labels as class names or None per row) for the specs, in --data order.

    Each spec is its own part and is embedded on its own, so parts in memory (MedMNIST) and on
    disk (folders, manifests) can share one index. With several labelled specs, a label is
    "source/class" (as `tfmir train` names the classes of several sources), so the majority
    vote of an unfiltered search never merges two sources' classes of the same name.
    """
    from tfmir.data.datasets import concatenate
    from tfmir.data.specs import load_spec

    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or not splits:
        raise IndexCommandError(f"--splits must name some of {list(SPLITS)}. Received: "
                                f"{','.join(splits)}")
    entries = [(spec, *_source_and_location(spec)) for spec in specs]
    num_labelled = sum(not _is_plain_folder(location) for _, _, location in entries)
    parts = []
    for spec, source, location in entries:
        if _is_plain_folder(location):
            examples = load_plain_folder(location, source=source, strict=_STRICT.value)
            parts.append((examples, [None] * len(examples)))
            continue
        try:
            loaded = load_spec(spec, data_dir=_DATA_DIR.value, download=_DOWNLOAD.value,
                               strict=_STRICT.value, seed=_SEED.value)
            examples = concatenate([loaded[split] for split in splits], separate_classes=False)
        except (ValueError, FileNotFoundError) as error:
            raise IndexCommandError(str(error)) from error
        names = list(examples.class_names)
        if num_labelled > 1:
            names = [f"{'+'.join(examples.source_names)}/{name}" for name in names]
        parts.append((examples, [names[label] for label in examples.labels]))
    return parts


def _source_and_location(spec: str) -> tuple[str | None, str]:
    source, separator, location = spec.partition("=")
    if not separator or os.sep in source or ":" in source:
        return None, spec
    return source, location


def make_index(kind: str, metric: str, dimension: int, fingerprint: str, preprocessing: dict):
    """An empty index of `kind` ("auto": ScaNN when it imports, else exact)."""
    from tfmir.index import ExactIndex, HammingIndex, ScannIndex

    identity = {"model_fingerprint": fingerprint, "preprocessing": preprocessing}
    if kind == "hamming":
        return HammingIndex(dimension=dimension, **identity)
    if kind == "auto":
        try:
            import scann  # noqa: F401
            kind = "scann"
        except ImportError:
            kind = "exact"
    index_class = ScannIndex if kind == "scann" else ExactIndex
    return index_class(metric=metric, dimension=dimension, **identity)


def tf_config_worker(text: str) -> tuple[int, int, str]:
    """(number of workers, this process's index, its task) from a `TF_CONFIG` value.

    The chief and worker tasks all embed: the chief, if any, is index 0 and worker j follows it
    (the numbering of `MultiWorkerMirroredStrategy`, where the chief is a worker too).
    """
    from tfmir.training.strategy import check_tf_config

    try:
        config = check_tf_config(text)
    except ValueError as error:
        raise IndexCommandError(str(error)) from error
    cluster, task = config["cluster"], config["task"]
    num_chiefs, num_workers = len(cluster.get("chief") or []), len(cluster.get("worker") or [])
    kind, index = task["type"], task.get("index", 0)
    if kind not in ("chief", "worker"):
        raise IndexCommandError(f"TF_CONFIG makes this process a {kind} task; only chief and "
                                f"worker tasks embed shards. Received: task={task!r}")
    return (num_chiefs + num_workers, index + (num_chiefs if kind == "worker" else 0),
            f"{kind} {index}")


def worker_slice(num_shards: int | None, shard_index: int | None, merge: bool,
                 tf_config: str | None) -> tuple[int | None, int | None]:
    """(number of workers, this worker's index) from --num_shards/--shard_index or TF_CONFIG.

    (None, None) for one process that does everything; (number of workers or None, None) for
    --merge; (N, i) for worker i of N, which only embeds its shards.
    """
    if num_shards is not None and num_shards < 1:
        raise IndexCommandError(f"--num_shards must be at least 1. Received: "
                                f"--num_shards={num_shards}")
    if merge and shard_index is not None:
        raise IndexCommandError("--merge builds the index from every worker's shards; drop "
                                f"--shard_index={shard_index}.")
    if tf_config:
        count, index, task = tf_config_worker(tf_config)
        if num_shards is not None and num_shards != count:
            raise IndexCommandError(f"--num_shards={num_shards} disagrees with TF_CONFIG, whose "
                                    f"cluster has {count} chief and worker tasks; drop "
                                    "--num_shards or unset TF_CONFIG.")
        if shard_index is not None and shard_index != index:
            raise IndexCommandError(f"--shard_index={shard_index} disagrees with TF_CONFIG, "
                                    f"which makes this process ({task}) shard index {index} of "
                                    f"{count}; drop --shard_index or unset TF_CONFIG.")
        return (count, None) if merge else (count, index)
    if merge:
        return num_shards, None
    if num_shards is None:
        if shard_index is not None:
            raise IndexCommandError(f"--shard_index={shard_index} needs --num_shards (the number "
                                    "of workers).")
        return None, None
    if shard_index is None:
        raise IndexCommandError(f"--num_shards={num_shards} needs --shard_index (this worker's "
                                f"index, 0 to {num_shards - 1}), or --merge to build the index "
                                "from the workers' shards.")
    if not 0 <= shard_index < num_shards:
        raise IndexCommandError(f"--shard_index must lie in [0, {num_shards}) for "
                                f"--num_shards={num_shards}. Received: "
                                f"--shard_index={shard_index}")
    return num_shards, shard_index


def unwritable_reason(path: str) -> str | None:
    """Why nothing can be created at `path`: a file where a folder should be, or a folder that
    is not writable; None when it can."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


def merge_command(num_workers: int) -> str:
    """This command as the merge step: the flags that decide the shards, and --merge."""
    import shlex

    arguments = []
    for holder in _MERGE_FLAGS:
        if holder.present:
            arguments += flags.FLAGS[holder.name].serialize().split("\n")
    return shlex.join(["tfmir", "index", *arguments, "--merge", f"--num_shards={num_workers}"])


def build_index(model: str, specs, output: str) -> None:
    if _build_style_database(model, specs, output):
        return
    if _KIND.value == "hamming" and _METRIC.present:
        raise IndexCommandError("--metric does not apply to --kind=hamming: a hamming index "
                                "always uses the Hamming distance.")
    num_workers, worker_index = worker_slice(_NUM_SHARDS.value, _SHARD_INDEX.value,
                                             _MERGE.value, os.environ.get("TF_CONFIG"))
    output = os.path.abspath(output)
    reason = unwritable_reason(output)
    if reason:
        raise IndexCommandError(f"--output={output} cannot be written: {reason}.")
    if worker_index is not None:
        embed_worker_slice(model, specs, output, num_workers, worker_index)
        return
    try:
        with exclusive_lock(output, "tfmir index"):
            _build_index(model, specs, output, num_workers)
    except LockedError as error:
        raise IndexCommandError(str(error)) from error


def _build_style_database(model: str, specs, output: str) -> bool:
    """Builds a style database when --model has Gram outputs (or --kind=style); else False."""
    from tfmir.cli import style_index
    from tfmir.index.embedding import ShardMismatchError

    try:
        loaded = style_index.load_style_model(model)
    except ValueError as error:
        raise IndexCommandError(str(error)) from error
    if loaded is None and _KIND.value != "style":
        if _SEGMENTER.value is not None:
            raise IndexCommandError(f"--segmenter applies to style models (with Gram outputs) "
                                    f"only; {model} has none.")
        return False
    if loaded is not None and _KIND.value not in ("auto", "style"):
        raise IndexCommandError(f"--kind={_KIND.value} does not fit {model}: it is a style model "
                                "(Gram matrix outputs), indexed as a style database; use "
                                "--kind=style (or --kind=auto).")
    worker_flags = [f"--{holder.name}" for holder in (_NUM_SHARDS, _SHARD_INDEX, _MERGE)
                    if holder.present]
    if worker_flags or os.environ.get("TF_CONFIG"):
        raise IndexCommandError(f"{' '.join(worker_flags) or 'TF_CONFIG'}: several workers are "
                                "not supported for a style database yet; run one `tfmir index` "
                                "(it is resumable).")
    if _METRIC.present:
        raise IndexCommandError("--metric does not apply to a style database: it ranks by the "
                                "measure `tfmir search --measure` names.")
    output = os.path.abspath(output)
    reason = unwritable_reason(output)
    if reason:
        raise IndexCommandError(f"--output={output} cannot be written: {reason}.")
    try:
        with exclusive_lock(output, "tfmir index"):
            _refuse_existing_output(output)
            parts = load_parts(specs, _SPLITS.value)
            summary = style_index.build_style_database(
                parts, output, model=model, segmenter=_SEGMENTER.value,
                resize_size=_RESIZE_SIZE.value, batch_size=_BATCH_SIZE.value,
                shard_size=(_SHARD_SIZE.value if _SHARD_SIZE.present
                            else style_index.DEFAULT_STYLE_SHARD_SIZE),
                overwrite=_OVERWRITE.value,
                layer_weights=style_index.parse_layer_weights(_LAYER_WEIGHTS.value),
                mask_size=_MASK_SIZE.value, projection_dim=_PROJECTION_DIM.value,
                loaded_model=loaded)
    except ShardMismatchError as error:
        raise IndexCommandError(f"{error}; pass --overwrite to discard them, or remove "
                                f"{output}.shards.") from error
    except (LockedError, ValueError) as error:
        raise IndexCommandError(str(error)) from error
    print(summary)
    return True


def _refuse_existing_output(output: str) -> None:
    if os.path.exists(output) and not os.path.isfile(os.path.join(output, "manifest.json")) \
            and (not os.path.isdir(output) or os.listdir(output)):
        raise IndexCommandError(f"--output={output} exists and is not an index directory; "
                                "choose another path.")
    if os.path.isfile(os.path.join(output, "manifest.json")) and not _OVERWRITE.value:
        raise IndexCommandError(f"--output={output} already holds an index; pass --overwrite "
                                "to replace it, or choose another path.")


def _load_inputs(model: str, specs):
    """(parts as `load_parts` returns them, the `EmbeddingFunction` of --model, the index kind).

    The kind is resolved from --kind and the model's output before anything is embedded: a
    hashing model's codes go into a hamming index, and a float index kind is refused for them.
    """
    from tfmir.index.embedding import index_kind_for, load_embedding_function

    parts = load_parts(specs, _SPLITS.value)
    try:
        embed = load_embedding_function(model, resize_size=_RESIZE_SIZE.value,
                                        batch_size=_BATCH_SIZE.value)
        kind = index_kind_for(_KIND.value, embed)
    except ValueError as error:
        raise IndexCommandError(str(error)) from error
    if kind == "hamming" and _METRIC.present:
        raise IndexCommandError(f"--metric does not apply to {embed.description}: "
                                f"{embed.describe_output()} is searched by Hamming distance.")
    return parts, embed, kind


def _owners(numbers, num_workers: int | None) -> str:
    """Which workers owe the shards `numbers`, and what to do about them."""
    from tfmir.index.embedding import number_ranges

    remedy = "or run without --merge to embed them here"
    if num_workers is None:
        return ("shard n belongs to the worker with --shard_index = n modulo --num_shards (give "
                "--merge the workers' --num_shards to name them): run it again (its finished "
                f"shards are reused), {remedy}")
    owners = sorted({number % num_workers for number in numbers})
    if len(owners) == 1:
        return (f"with --num_shards={num_workers} they belong to --shard_index={owners[0]}: run "
                f"that worker again (its finished shards are reused), {remedy}")
    return (f"with --num_shards={num_workers} they belong to the workers with --shard_index "
            f"{number_ranges(owners)}: run them again (their finished shards are reused), "
            f"{remedy}")


def embed_worker_slice(model: str, specs, output: str, num_workers: int,
                       worker_index: int) -> None:
    """Worker `worker_index` of `num_workers`: embeds its shards into <output>.shards/."""
    from tfmir.index.embedding import (ShardMismatchError, embed_worker_shards,
                                       worker_shard_numbers)

    _refuse_existing_output(output)
    parts, embed, _ = _load_inputs(model, specs)
    total = sum(len(examples) for examples, _ in parts)
    num_shards = -(-total // _SHARD_SIZE.value)
    numbers = worker_shard_numbers(num_shards, num_workers, worker_index)
    shards = output + ".shards"
    print(f"Worker {worker_index} of {num_workers}: embedding {len(numbers)} of the {num_shards} "
          f"shards of {total} images into {shards} with {embed.description} (fingerprint "
          f"{embed.fingerprint[:16]}...)")
    try:
        embedded, reused = embed_worker_shards(
            embed, [examples for examples, _ in parts], shards, num_workers=num_workers,
            worker_index=worker_index, fingerprint=embed.fingerprint,
            preprocessing=embed.preprocessing, shard_size=_SHARD_SIZE.value,
            batch_size=_BATCH_SIZE.value)
    except ShardMismatchError as error:
        raise IndexCommandError(
            f"{error}; every worker needs the same --model, --data, --splits, --seed, --strict, "
            f"--resize_size and --shard_size (to start over, remove {shards} once no worker "
            "runs).") from error
    except LockedError as error:
        raise IndexCommandError(str(error)) from error
    print(f"Worker {worker_index} of {num_workers} finished its {len(numbers)} shards in "
          f"{shards} ({len(embedded)} embedded, {len(reused)} reused).")
    print(f"Once all {num_workers} workers have finished, build the index with:\n"
          f"  {merge_command(num_workers)}")


def _build_index(model: str, specs, output: str, num_workers: int | None) -> None:
    import numpy as np

    from tfmir.index import sign_codes
    from tfmir.index.embedding import (MissingShardsError, ShardMismatchError, embed_in_shards,
                                       read_shards)

    _refuse_existing_output(output)
    parts, embed, kind = _load_inputs(model, specs)
    total = sum(len(examples) for examples, _ in parts)
    shards = output + ".shards"
    items = [examples for examples, _ in parts]
    job = dict(fingerprint=embed.fingerprint, preprocessing=embed.preprocessing,
               shard_size=_SHARD_SIZE.value)
    try:
        if _MERGE.value:
            print(f"Merging the shards of {total} images in {shards} (embedded by "
                  f"{embed.description}, fingerprint {embed.fingerprint[:16]}...)")
            vectors = read_shards(items, shards, **job)
        else:
            print(f"Embedding {total} images with {embed.description} "
                  f"(fingerprint {embed.fingerprint[:16]}...)")
            vectors = embed_in_shards(embed, items, shards, batch_size=_BATCH_SIZE.value,
                                      overwrite=_OVERWRITE.value, **job)
    except MissingShardsError as error:
        raise IndexCommandError(f"{error}; {_owners(error.numbers, num_workers)}.") from error
    except ShardMismatchError as error:
        remedy = ("--merge needs the workers' --model, --data, --splits, --seed, --strict, "
                  "--resize_size and --shard_size" if _MERGE.value else
                  f"pass --overwrite to discard them, or remove {shards}")
        raise IndexCommandError(f"{error}; {remedy}.") from error
    index = make_index(kind, _METRIC.value, vectors.shape[1], embed.fingerprint,
                       embed.preprocessing)
    if index.kind == "hamming":
        vectors = sign_codes(vectors)
    ids = np.concatenate([examples.ids for examples, _ in parts])
    sources = np.concatenate([examples.sources for examples, _ in parts])
    if len(np.unique(ids)) != len(ids):  # as tfmir.data.concatenate: "source/id" when ids repeat
        ids = np.char.add(np.char.add(sources.astype(str), "/"), ids.astype(str))
    try:
        index.build(
            vectors,
            ids=ids.tolist(),
            labels=[label for _, labels in parts for label in labels],
            sources=sources.tolist(),
            paths=[path for examples, _ in parts
                   for path in (examples.paths.tolist() if examples.paths is not None
                                else [""] * len(examples))])
        path = index.save(output)
    except ValueError as error:
        raise IndexCommandError(str(error)) from error
    shutil.rmtree(shards, ignore_errors=True)
    print(f"Wrote an index of {len(index)} items ({index.kind}, {index.metric}, dimension "
          f"{index.dimension}, sources {', '.join(sorted(set(sources.tolist())))}) to {path}")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        build_index(_MODEL.value, _DATA.value, _OUTPUT.value)
    except IndexCommandError as error:
        raise SystemExit(f"tfmir index: error: {error}") from None
