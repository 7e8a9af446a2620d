"""`tfmir train`: train a retrieval embedder with Multi-Similarity (paper 000's specialist).

    tfmir train --data=sample --preset=cpu --workdir=runs/sample
    tfmir train --data=skin=path/to/folder --data=xray=path/to/manifest.csv --workdir=runs/two

Writes into --workdir: best.keras (best validation Recall@1), final.keras, log.csv, tensorboard/,
config.json, flags.txt and results.json / table.md with the best model's test Recall@K per source.
Run the same command again after an interruption: it resumes from workdir/backup.
"""

from __future__ import annotations

import os

from absl import flags, logging

from tfmir.models import PRESETS
from tfmir.training import STRATEGIES

_DATA = flags.DEFINE_multi_string(
    "data", None, "Dataset spec(s) `[source=]location`: sample, sample:retina, medmnist:NAME[@SIZE], "
    "a MedMNIST .npz, a CSV manifest (path,label[,source][,mask][,split]) or a class-per-folder "
    "directory. Repeat the flag for several sources.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (resumes when it holds a backup).",
                               required=True)
_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Model and schedule preset.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Epochs (default: the preset's).")
_STEPS = flags.DEFINE_integer("steps_per_epoch", None, "Batches per epoch (default: the preset's).")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", None, "Adam learning rate (default: preset's).")
_CLASSES = flags.DEFINE_integer("classes_per_batch", None, "c: classes per batch (default: preset's).")
_PER_CLASS = flags.DEFINE_integer("per_class", None, "k: images per class per batch (paper: 5).")
_SOURCE_WEIGHTS = flags.DEFINE_string(
    "source_weights", "size", "With several sources: pick a batch's source by `size`, `uniform`, "
    "or weights such as `retina:1,xray:2`.")
_SAMPLING = flags.DEFINE_enum(
    "sampling", "source", ["source", "class"], "With several sources: `source` gives every batch "
    "one source (paper 000's source-specific sampling); `class` lets a batch mix sources.")
_BACKBONE = flags.DEFINE_string("backbone", None, "Backbone override (resnet50, small_resnet, ...).")
_WEIGHTS = flags.DEFINE_string("weights", None, "Backbone weights: none, imagenet or a file path.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Input side override.")
_STRATEGY = flags.DEFINE_enum("strategy", "auto", list(STRATEGIES), "tf.distribute strategy; "
                              "multi_worker reads TF_CONFIG.")
_MIXED = flags.DEFINE_bool("mixed_precision", False, "Train under mixed_bfloat16.")
_STRICT = flags.DEFINE_bool("strict", False, "Refuse unreadable image files instead of skipping.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder of MedMNIST .npz files.")
_DOWNLOAD = flags.DEFINE_bool("download", False, "Download missing MedMNIST files.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")


def parse_source_weights(text: str):
    if text in ("size", "uniform"):
        return text
    try:
        return {name: float(value) for name, value in (item.split(":") for item in text.split(","))}
    except ValueError as error:
        raise ValueError(
            f"--source_weights must be size, uniform or name:weight[,name:weight]. Received: {text!r}"
        ) from error


def model_overrides() -> dict:
    overrides = {}
    if _BACKBONE.value:
        overrides["backbone"] = _BACKBONE.value
        if _BACKBONE.value != "small_resnet":
            overrides["backbone_widths"] = None
    if _WEIGHTS.value:
        overrides["weights"] = None if _WEIGHTS.value.lower() == "none" else _WEIGHTS.value
    if _IMAGE_SIZE.value:
        overrides["image_size"] = _IMAGE_SIZE.value
    return overrides


def main(argv) -> None:
    del argv
    import keras

    from tfmir.cli.report import recall_table, write_atomic, write_json
    from tfmir.data.specs import load_specs
    from tfmir.training import evaluate_retrieval, train_embedder

    splits = load_specs(_DATA.value, data_dir=_DATA_DIR.value, download=_DOWNLOAD.value,
                        strict=_STRICT.value, seed=_SEED.value)
    for split, examples in splits.items():
        logging.info("%s: %d images, sources %s", split, len(examples), examples.source_names)
    os.makedirs(_WORKDIR.value, exist_ok=True)
    write_atomic(os.path.join(_WORKDIR.value, "flags.txt"), flags.FLAGS.flags_into_string())
    result = train_embedder(
        splits["train"], splits["val"], workdir=_WORKDIR.value, preset=_PRESET.value,
        epochs=_EPOCHS.value, steps_per_epoch=_STEPS.value, learning_rate=_LEARNING_RATE.value,
        num_classes_per_batch=_CLASSES.value, num_per_class=_PER_CLASS.value,
        source_weights=parse_source_weights(_SOURCE_WEIGHTS.value), sampling=_SAMPLING.value,
        strategy=_STRATEGY.value,
        mixed_precision=_MIXED.value, seed=_SEED.value, model_overrides=model_overrides())
    best = keras.saving.load_model(result.best_path) if result.best_path.exists() else result.model
    test = evaluate_retrieval(best, splits["test"], resize_size=result.resize_size)
    table = recall_table({"best": test})
    write_json(os.path.join(_WORKDIR.value, "results.json"),
               {"test": test, "epochs_run": len(result.history.get("epoch", [])),
                "resumed_from_epoch": result.initial_epoch})
    write_atomic(os.path.join(_WORKDIR.value, "table.md"), table + "\n")
    print(f"\nTest Recall@K of {result.best_path}:\n{table}")

