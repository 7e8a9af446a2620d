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
`tfmir serve` turn query embeddings into codes the same way.

An existing index at --output is replaced only with --overwrite (atomically: a reader sees the
old index or the new one), and a second `tfmir index` on the same --output while one runs is
refused (a lock on <output>.lock, released by the system when the first exits). Embeddings are
written in shards to <output>.shards/ as they are computed; after an interruption, run the same
command again and the finished shards are reused (checked against their ids, the model
fingerprint and the preprocessing). Once the index is saved (atomically) the shards are removed.
The manifest records the model fingerprint and the query preprocessing (resize side, crop,
input size); `tfmir search` and `tfmir serve` refuse a model or resize side that differ.
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
    "kind", "auto", ["auto", "exact", "scann", "hamming"],
    "Index kind; auto is ScaNN when it imports, else exact. hamming stores the sign of each "
    "embedding component as one bit (D-bit codes for D-dimensional embeddings) and searches by "
    "Hamming distance; `tfmir search` and `tfmir serve` binarize queries the same way.")
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
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing index at --output "
                               "(without it, an existing index is refused, as tfmir export does).")

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


def build_index(model: str, specs, output: str) -> None:
    if _KIND.value == "hamming" and _METRIC.present:
        raise IndexCommandError("--metric does not apply to --kind=hamming: a hamming index "
                                "always uses the Hamming distance.")
    output = os.path.abspath(output)
    try:
        with exclusive_lock(output, "tfmir index"):
            _build_index(model, specs, output)
    except LockedError as error:
        raise IndexCommandError(str(error)) from error


def _build_index(model: str, specs, output: str) -> None:
    import numpy as np

    from tfmir.index import sign_codes
    from tfmir.index.embedding import embed_in_shards, load_embedding_function

    if os.path.exists(output) and not os.path.isfile(os.path.join(output, "manifest.json")) \
            and (not os.path.isdir(output) or os.listdir(output)):
        raise IndexCommandError(f"--output={output} exists and is not an index directory; "
                                "choose another path.")
    if os.path.isfile(os.path.join(output, "manifest.json")) and not _OVERWRITE.value:
        raise IndexCommandError(f"--output={output} already holds an index; pass --overwrite "
                                "to replace it, or choose another path.")
    parts = load_parts(specs, _SPLITS.value)
    total = sum(len(examples) for examples, _ in parts)
    try:
        embed = load_embedding_function(model, resize_size=_RESIZE_SIZE.value,
                                        batch_size=_BATCH_SIZE.value)
    except ValueError as error:
        raise IndexCommandError(str(error)) from error
    print(f"Embedding {total} images with {embed.description} "
          f"(fingerprint {embed.fingerprint[:16]}...)")
    shards = output + ".shards"
    vectors = embed_in_shards(embed, [examples for examples, _ in parts], shards,
                              fingerprint=embed.fingerprint, preprocessing=embed.preprocessing,
                              shard_size=_SHARD_SIZE.value,
                              batch_size=_BATCH_SIZE.value)
    index = make_index(_KIND.value, _METRIC.value, vectors.shape[1], embed.fingerprint,
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
