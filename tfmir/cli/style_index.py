"""The style path of `tfmir index`, `tfmir search` and `tfmir serve`: paper 003's RIS database.

    tfmir index --model=ensemble.keras --segmenter=segmenter.keras --data=isic=path/to/folder \
        --output=indexes/isic
    tfmir search --index=indexes/isic --model=ensemble.keras --segmenter=segmenter.keras \
        --measure=style --mode=exact --k=5 query.jpg

A model with Gram matrix outputs ("gram_1", ...; `tfmir.models.gram_outputs`), such as
`tfmir.models.StyleEnsemble`, makes `tfmir index` (with --kind=auto or --kind=style) write a
`tfmir.index.StyleDatabase`: per image the feature vector, the packed Gram matrices and, with
--segmenter, the predicted lesion mask (bit-packed at --mask_size). Other kinds are refused for a
style model. Style models and segmenters are read from `.keras` files (not SavedModel exports).

Resumable like every index: rows [vector | packed Grams (float16 values, held as float32) |
mask bits (as float32)] go to <output>.shards/ in shards of --shard_size rows (256 by default
for a style model: a row of EfficientNet-Lite0 Grams is ~320 KB), and an interrupted run reuses
the finished shards. The shard job's fingerprint covers the style model, the segmenter, the
layer weights and the mask size. Building the database holds all rows in memory once (N × row
bytes, ~3.3 GB for 10,000 Lite0 images). Several workers (--num_shards / --shard_index /
--merge) are not supported for style models yet.

This module defines no flags (each command defines its own); the commands call it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile

import numpy as np

STYLE = "style"
# A style model writes at least this many rows per shard unless --shard_size says otherwise.
DEFAULT_STYLE_SHARD_SIZE = 256
_GRAM_OUTPUT = re.compile(r'"gram_[0-9]+"')


def may_be_style_model(path: str) -> bool:
    """Whether a `.keras` file may hold a style model, read from its config without loading it.

    Loading a checkpoint takes seconds (minutes for a 5-member EfficientNet-B6 ensemble), so
    `tfmir index` does not load every model twice: only one whose config names a Gram output
    or a `StyleEnsemble` is loaded to look at its outputs (`tfmir.models.gram_outputs`).
    """
    if not str(path).endswith(".keras") or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            config = archive.read("config.json").decode("utf-8", "replace")
    except (OSError, KeyError, zipfile.BadZipFile):
        return False
    return "StyleEnsemble" in config or bool(_GRAM_OUTPUT.search(config))


def load_style_model(path: str):
    """The loaded `.keras` model when it has Gram outputs, else None."""
    if not may_be_style_model(path):
        return None
    from tfmir.index.style import load_keras_model
    from tfmir.models import gram_outputs

    model = load_keras_model(str(path))
    return model if gram_outputs(model) else None


def check_measure(measure: str) -> None:
    """Refuses an unknown measure with the similarity module's own one-line error."""
    from tfmir.similarity import MEASURES, similarity_scores

    if measure not in MEASURES:
        similarity_scores(measure, {}, {})


def parse_layer_weights(values) -> list[float] | None:
    if not values:
        return None
    try:
        return [float(value) for value in values]
    except ValueError:
        raise ValueError(f"--layer_weights must be numbers, one per Gram layer. Received: "
                         f"{','.join(values)}") from None


def shard_job_fingerprint(extractor, layer_weights, mask_size: int) -> str:
    """Names everything a shard row depends on: both models, the layer weights, the mask grid."""
    job = {"layout": "vector|packed_grams(float16)|mask_bits", "model": extractor.fingerprint,
           "segmenter": extractor.segmenter_fingerprint, "layer_weights": layer_weights,
           "mask_size": mask_size}
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode("utf-8")).hexdigest()


def style_rows(fields: dict, layer_weights, mask_size: int) -> np.ndarray:
    """One float32 shard row per image: [vector | packed Grams | mask bits].

    float16 packed values and uint8 mask bytes are exact in float32, so `split_rows` gives
    back exactly what the database stores.
    """
    from tfmir.index.style import mask_bits
    from tfmir.similarity import pack_grams

    pieces = [fields["vector"].astype(np.float32),
              pack_grams(fields["grams"], layer_weights, "float16").astype(np.float32)]
    if fields["mask"] is not None:
        pieces.append(mask_bits(fields["mask"], mask_size).astype(np.float32))
    return np.concatenate(pieces, axis=1)


def split_rows(rows: np.ndarray, dimension: int, packed_size: int, has_masks: bool):
    """(vectors float32, packed Grams float16, mask bits uint8 or None) from `style_rows`."""
    vectors = np.ascontiguousarray(rows[:, :dimension])
    packed = rows[:, dimension:dimension + packed_size].astype(np.float16)
    bits = rows[:, dimension + packed_size:].astype(np.uint8) if has_masks else None
    return vectors, packed, bits


def build_style_database(parts, output: str, *, model: str, segmenter: str | None,
                         resize_size: int | None, batch_size: int, shard_size: int,
                         overwrite: bool, layer_weights, mask_size: int, projection_dim: int,
                         loaded_model=None) -> str:
    """Embeds `parts` (`tfmir.cli.index.load_parts`) in resumable shards and saves the database.

    Returns:
        A one-line summary of what was written.

    Raises:
        ValueError: an unusable model or segmenter, shards of another job, a bad layer weight.
    """
    from tfmir.index.embedding import embed_in_shards
    from tfmir.index.style import StyleDatabase, StyleFeatureExtractor
    from tfmir.similarity import packed_size

    extractor = StyleFeatureExtractor(model, segmenter, resize_size=resize_size,
                                      batch_size=batch_size, mask_size=mask_size,
                                      loaded_model=loaded_model)
    # The database checks the weights against the Gram layers before anything is embedded.
    database = StyleDatabase(channels=extractor.channels, layer_weights=layer_weights,
                             mask_size=mask_size, model_fingerprint=extractor.fingerprint,
                             segmenter_fingerprint=extractor.segmenter_fingerprint,
                             preprocessing=extractor.preprocessing,
                             projection_dim=projection_dim)
    items = [examples for examples, _ in parts]
    total = sum(len(examples) for examples in items)
    shards = output + ".shards"
    print(f"Embedding {total} images with {extractor.description} (fingerprint "
          f"{extractor.fingerprint[:16]}...) into a style database")
    rows = embed_in_shards(
        lambda examples: style_rows(extractor(examples), layer_weights, mask_size), items,
        shards, fingerprint=shard_job_fingerprint(extractor, layer_weights, mask_size),
        preprocessing=extractor.preprocessing, shard_size=shard_size, batch_size=batch_size,
        overwrite=overwrite)
    vectors, packed, bits = split_rows(rows, extractor.dimension,
                                       packed_size(extractor.channels),
                                       extractor.segmenter is not None)
    ids = np.concatenate([examples.ids for examples in items])
    sources = np.concatenate([examples.sources for examples in items])
    if len(np.unique(ids)) != len(ids):  # as tfmir.data.concatenate: "source/id" when ids repeat
        ids = np.char.add(np.char.add(sources.astype(str), "/"), ids.astype(str))
    database.build(
        vectors, packed_grams=packed, packed_masks=bits, ids=ids.tolist(),
        labels=[label for _, labels in parts for label in labels], sources=sources.tolist(),
        paths=[path for examples in items
               for path in (examples.paths.tolist() if examples.paths is not None
                            else [""] * len(examples))])
    path = database.save(output, overwrite=overwrite)
    shutil.rmtree(shards, ignore_errors=True)
    sizes = database.bytes_per_image()
    return (f"Wrote a style database of {len(database)} items (vectors {extractor.dimension}-d, "
            f"Gram channels {extractor.channels}, masks "
            f"{f'{mask_size}x{mask_size}' if database.has_masks else 'none'}, "
            f"{sizes['total']} bytes per image, sources "
            f"{', '.join(sorted(set(map(str, sources.tolist()))))}) to {path}")


def load_for_search(index: str, model: str, segmenter: str | None, measure: str, *,
                    resize_size: int | None = None, batch_size: int = 32):
    """(database, extractor) for `index`, checked against the models and the measure.

    The measure is checked first, then the database is refused (`FingerprintMismatchError`,
    before any query is embedded) when another style model, segmenter or preprocessing built
    it. A Dice measure needs masks in the database and a segmenter for the query.
    """
    from tfmir.index.style import StyleDatabase, StyleFeatureExtractor, read_manifest
    from tfmir.similarity import COMPONENTS

    check_measure(measure)
    manifest = read_manifest(index)
    needs_masks = "dice" in COMPONENTS[measure]
    if needs_masks and not manifest.get("has_masks"):
        raise ValueError(f"measure {measure!r} needs masks: the database was built without "
                         "--segmenter")
    if needs_masks and segmenter is None:
        raise ValueError(f"measure {measure!r} needs the query's mask: give --segmenter (the "
                         "segmenter that built the database, fingerprint "
                         f"{str(manifest.get('segmenter_fingerprint'))[:16]}...)")
    extractor = StyleFeatureExtractor(
        model, segmenter if manifest.get("has_masks") else None, resize_size=resize_size,
        batch_size=batch_size, mask_size=manifest.get("mask_size") or 64)
    database = StyleDatabase.load(
        index, expected_model_fingerprint=extractor.fingerprint,
        expected_segmenter_fingerprint=extractor.segmenter_fingerprint,
        expected_preprocessing=extractor.preprocessing)
    return database, extractor


def query_fields(extractor, paths) -> list[dict]:
    """One query dict per image file, as `StyleDatabase.search` takes it."""
    from tfmir.data import Examples

    examples = Examples(labels=np.zeros(len(paths), np.int64), sources="query",
                        ids=[str(number) for number in range(len(paths))], class_names=("",),
                        paths=[os.path.abspath(path) for path in paths])
    fields = extractor(examples)
    return [{"vector": fields["vector"][row], "grams": [gram[row] for gram in fields["grams"]],
             "mask": None if fields["mask"] is None else fields["mask"][row]}
            for row in range(len(paths))]


def search_entries(database, extractor, queries, *, k: int, measure: str, mode: str,
                   candidates: int) -> list[dict]:
    """`tfmir search`'s JSON entries for query files: the measure and mode named."""
    from tfmir.serving.retrieval import predicted_labels

    if k > len(database):
        raise ValueError(f"--k={k} is larger than the database ({len(database)} items).")
    results = [database.search(fields, k, measure, mode=mode, candidates=candidates,
                               query_name=f"query {query}")
               for query, fields in zip(queries, query_fields(extractor, queries))]
    return [{"query": query, "measure": measure, "mode": mode, "results": rows,
             "predicted_label": label}
            for query, rows, label in zip(queries, results, predicted_labels(results))]
