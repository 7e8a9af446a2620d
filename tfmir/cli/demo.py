"""`tfmir demo`: fine-tune the pretrained cpu config on the shipped sample and show what it retrieves.

    tfmir demo --output_dir=demo_output

Loads the sample in `tfmir/samples/` (RetinaMNIST and a PneumoniaMNIST subset, CC BY 4.0) and
prints Recall@1/2/4/8 on each domain's test split for three embeddings of the same images:
raw pixels (the centre-cropped input flattened, cosine similarity), the starting point (the
pooled features of the config's backbone before training: ImageNet EfficientNet-Lite0 for `cpu`,
a random network for `tiny`) and the embedder trained on both domains (class-balanced c × k
batches drawn from the classes of both domains, Multi-Similarity). Each gain of the trained
model comes with a paired bootstrap interval over the test queries, per domain and for the
average over domains (a stratified bootstrap), and a domain where training did not measurably
help is named in the output.
Writes table.md, results.json, gallery.png (per domain, queries with their top-8; green frame =
same class, red = different) and the training run (run/) under --output_dir.
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import flags

from tfmir.configs.universal import SETTINGS

_OUTPUT = flags.DEFINE_string("output_dir", "demo_output", "Where the demo writes its results.")
_PRESET = flags.DEFINE_enum("preset", "cpu", list(SETTINGS), "The setting of the "
                            "specialist config (tfmir.configs): model and schedule.")
# Row names of the results table; the starting point's is "ImageNet features" or "untrained
# features" by the config's weights.
RAW, TRAINED = "raw pixels", "trained"
_EPOCHS = flags.DEFINE_integer("epochs", None, "Epochs (default: the preset's).")
_STEPS = flags.DEFINE_integer("steps_per_epoch", None, "Batches per epoch (default: the preset's).")
_QUERIES = flags.DEFINE_integer("queries_per_domain", 3, "Gallery rows per domain.")
_TOP_K = flags.DEFINE_integer("top_k", 8, "Results shown per query in the gallery.")
_SAMPLING = flags.DEFINE_enum(
    "sampling", "class", ["source", "class"], "`class`: batches may mix the two domains; `source`: "
    "one domain per batch (paper 000's source-specific sampling).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")


def gallery_rows(examples, embeddings, *, queries_per_source: int, top_k: int, seed: int):
    """Picks queries per source and their top-k neighbours within the same source's split."""
    from tfmir.index import exact_search

    rng = np.random.default_rng(seed)
    rows = []
    for source in examples.source_names:
        members = np.flatnonzero(examples.sources == source)
        # One query per class first, so every class shows up when there are enough rows.
        labels = examples.labels[members]
        picks = [rng.choice(members[labels == label]) for label in rng.permutation(np.unique(labels))]
        picks = (picks + list(rng.choice(members, queries_per_source, replace=False)))[:queries_per_source]
        _, neighbours = exact_search(embeddings[members], embeddings[members], top_k, exclude_self=True)
        position = {index: row for row, index in enumerate(members)}
        for query in picks:
            rows.append((source, query, members[neighbours[position[query]]]))
    return rows


def recall_gains(examples, baseline, trained, *, seed: int) -> dict:
    """The Recall@1 gain of `trained` over `baseline` per source and on average over sources.

    Both embeddings are scored on the same queries (each source's split, query excluded), so the
    intervals come from a paired bootstrap of the per-query outcomes; the average's resamples
    each source's queries within that source (`paired_bootstrap(groups=...)`).

    Returns:
        {source: paired_bootstrap result, ..., "average": ...}.
    """
    from tfmir.metrics import paired_bootstrap
    from tfmir.training import recall_hits_per_source

    first = recall_hits_per_source(examples, baseline)
    second = recall_hits_per_source(examples, trained)
    gains = {source: paired_bootstrap(first[examples.sources == source],
                                      second[examples.sources == source], seed=seed)
             for source in examples.source_names}
    gains["average"] = paired_bootstrap(first, second, groups=examples.sources, seed=seed)
    return gains


def raw_pixel_model(image_size: int):
    """(B, S, S, 3) pixels -> the flattened pixels at unit length (cosine similarity)."""
    import keras

    pixels = keras.Input((image_size, image_size, 3))
    flat = keras.layers.UnitNormalization()(keras.layers.Flatten()(pixels))
    return keras.Model(pixels, flat, name="raw_pixels")


def gain_lines(gains: dict, baseline: str) -> list[str]:
    """The printed lines of one comparison, ending with a plain verdict on each domain."""
    lines = [f"Recall@1 gain of the trained model over {baseline} (paired bootstrap over "
             "queries, 95 % interval):"]
    for source, gain in gains.items():
        lines.append(
            f"  {source}: {100 * gain['difference']:+.1f} points, [{100 * gain['low']:+.1f}, "
            f"{100 * gain['high']:+.1f}] over {gain['num_queries']} queries")
    unclear = [source for source, gain in gains.items() if gain["low"] <= 0]
    if unclear:
        lines.append(f"  Not measurably better than {baseline} on: {', '.join(unclear)} "
                     "(the interval reaches zero or below).")
    return lines


def main(argv) -> None:
    del argv
    import keras

    from tfmir.cli.report import recall_table, write_atomic, write_json
    from tfmir.configs import get_config
    from tfmir.models import build_backbone
    from tfmir.samples import load_sample
    from tfmir.training import embed_examples, evaluate_retrieval, train_embedder
    from tfmir.visualization import save_gallery

    start = time.time()
    output_dir = _OUTPUT.value
    os.makedirs(output_dir, exist_ok=True)
    splits = load_sample()
    test = splits["test"]
    print(f"Sample: {len(splits['train'])} train / {len(splits['val'])} val / {len(test)} test "
          f"images from {', '.join(test.source_names)} (MedMNIST v2, CC BY 4.0).")

    config = get_config(f"specialist:{_PRESET.value}")
    model, resize_size = config.task.model, config.data.resize_size
    keras.utils.set_random_seed(_SEED.value)
    START = "ImageNet features" if model["weights"] == "imagenet" else "untrained features"
    # The starting point: the backbone's pooled features before any training.
    start_model = build_backbone(model["backbone"], model["image_size"], weights=model["weights"],
                                 widths=model["backbone_widths"])
    embeddings = {RAW: embed_examples(raw_pixel_model(model["image_size"]), test,
                                      resize_size=resize_size),
                  START: embed_examples(start_model, test, resize_size=resize_size)}

    print(f"Training the {_PRESET.value!r} config ({model['backbone']}, weights="
          f"{model['weights']}) on both domains ...")
    run = train_embedder(splits["train"], splits["val"], workdir=os.path.join(output_dir, "run"),
                         preset=_PRESET.value, epochs=_EPOCHS.value,
                         steps_per_epoch=_STEPS.value, sampling=_SAMPLING.value,
                         seed=_SEED.value, verbose=2)
    trained = keras.saving.load_model(run.best_path)
    embeddings[TRAINED] = embed_examples(trained, test, resize_size=run.resize_size)
    results = {name: evaluate_retrieval(None, test, resize_size=resize_size, embeddings=values)
               for name, values in embeddings.items()}

    table = recall_table(results)
    gains = {baseline: recall_gains(test, embeddings[baseline], embeddings[TRAINED],
                                    seed=_SEED.value) for baseline in (START, RAW)}
    lines = [line for baseline in (START, RAW) for line in gain_lines(gains[baseline], baseline)]
    write_atomic(os.path.join(output_dir, "table.md"), table + "\n\n" + "\n".join(lines) + "\n")
    write_json(os.path.join(output_dir, "results.json"), {
        "test_recall": results, "recall@1_gain": gains, "preset": _PRESET.value,
        "model": model, "seconds": round(time.time() - start, 1),
        "best_checkpoint": os.path.relpath(run.best_path, output_dir)})

    rows = gallery_rows(test, embeddings[TRAINED], queries_per_source=_QUERIES.value, top_k=_TOP_K.value,
                        seed=_SEED.value)
    gallery_path = save_gallery(
        os.path.join(output_dir, "gallery.png"),
        [test.images[query] for _, query, _ in rows], [test.labels[query] for _, query, _ in rows],
        [test.images[results_] for _, _, results_ in rows],
        np.stack([test.labels[results_] for _, _, results_ in rows]),
        # The row title names the domain, so tiles show the bare class name.
        class_names=[name.split("/", 1)[-1] for name in test.class_names], row_titles=[source for source, _, _ in rows])

    print(f"\nRecall@K on the test split of each domain (percent):\n{table}\n")
    print("\n".join(lines) + "\n")
    print(f"Gallery: {gallery_path}\nResults: {os.path.join(output_dir, 'results.json')}\n"
          f"Took {time.time() - start:.0f} s.")
