"""Throughput of tfmir's input pipeline and model, mixed_bfloat16, and the backbones compared.

    python benchmarks/embed_throughput.py                    # cpu preset, all (~30 min, 2 cores)
    python benchmarks/embed_throughput.py --compare_backbones=false   # sections 1-3 (~5 min)
    python benchmarks/embed_throughput.py --recall=false --compare_backbones=false  # 1-2 only
    python benchmarks/embed_throughput.py --preset=paper --recall=false --jit=false \
        --compare_backbones=false --num_images=256 --classes_per_batch=6 --train_steps=3 \
        --repeats=3                                          # ResNet50 at 224
    python benchmarks/embed_throughput.py --embed=false --train=false --recall=false \
        --output_json=backbones.json                         # section 4 only (~25 min, estimated)

In one run, for every precision policy (float32, mixed_bfloat16):

1. Embedding: images/s of `make_dataset(training=False)` feeding the model (one `tf.function`,
   as `tfmir.training.embed_examples` does) against the same model on the same batches already
   decoded, resized and cropped in memory; the input pipeline alone; the pipeline overhead
   1 - pipeline/model-only (the target is <= 10 %).
2. Training: steps/s of the compiled train step `model.fit` runs, fed by the sampler-driven
   `make_dataset(training=True)` (as `tfmir.training.train_embedder` builds it), against the same
   model fed one in-memory batch repeated; for `jit_compile` False and True. One untimed `fit`
   epoch traces each model; then each run of --train_steps steps is one repeat, the runs of the
   feeds interleaved.
3. Recall@1 (--recall): `train_embedder` on the data with --recall_preset, float32 and
   mixed_bfloat16 from the same seed, then per-source test Recall@1 of the final model via
   `evaluate_retrieval`.
4. Backbones (--compare_backbones): for every backbone of --backbones at every side of
   --backbone_sizes (96 px is the cpu preset's input, 224 px the paper's), the
   `Embedder(backbone, image_size=size, weights=None)` (backbone -> Dense(128) -> L2) alone:
   embedding images/s on one in-memory batch of --backbone_batch_size images (the traced
   function of 1.), and train steps/s of its compiled Multi-Similarity train step on one
   in-memory c x k batch (the in-memory feed of 2., jit_compile off). Images are the data's,
   resized to the side without cropping. Every timed run lasts about --backbone_run_seconds: one
   timed batch (step), after untimed warm-up calls, sets how many batches (steps) a run has.
   The runs of one (backbone, size), embedding and training in both precisions, are
   interleaved; the (backbone, size) pairs are measured one after another, each with new models
   (`compare_backbones` says why). One Markdown row per (backbone, size) gives both precisions
   and mixed_bfloat16 / float32. Estimated, not measured: about 25 min on 2 cores with bf16
   instructions (RESULTS.md's machine) for the default 5 backbones x 2 sizes, most of it
   ResNet50 and the traces of the train steps. Where the CPU has none (AVX2 only), bf16 is
   emulated: small_resnet's mixed_bfloat16 train step took 9x its float32 time in a smoke run,
   so the run lasts far longer; --precisions=float32 leaves mixed_bfloat16 out.

Models are built with random weights (`weights=None`): speed does not depend on them, and the
paper preset then needs no download. Every figure is the median of --repeats timed runs
(`time.perf_counter`, warm-up excluded). The machine may be shared: the CPU time other processes
took during each run is measured (from /proc/stat), a run during which they used more than
--max_others cores is timed again, and a figure that could not get --repeats undisturbed runs is
marked "(disturbed)". Embedding runs of all variants, and training runs of one precision, are
interleaved. Reads the shipped MedMNIST
sample, or --data (the `tfmir train --data` specs). Prints the tables; --output_json gets every
figure, including each run. --embed, --train, --recall and --compare_backbones turn sections
1-4 on and off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import measure  # noqa: E402  (benchmarks/measure.py, beside this script)
from tfmir.data import ClassBalancedSampler, make_dataset  # noqa: E402
from tfmir.losses import MultiSimilarity  # noqa: E402
from tfmir.configs import get_config  # noqa: E402
from tfmir.models import Embedder  # noqa: E402
from tfmir.models.backbones import BACKBONES  # noqa: E402
from tfmir.training import evaluate_retrieval, train_embedder  # noqa: E402

PRESET_DEFAULTS = {
    # preset: (num_images, embedding batch_size, train_steps per timed epoch)
    "tiny": (512, 128, 20),
    # 32 batches per timed run: with 8 (2048 images) the start of each run's dataset iterator
    # made the pipeline figure jump between two levels (about 3,250 and 4,200 images/s).
    "cpu": (8192, 256, 30),
    "paper": (256, 32, 3),
}
PRECISIONS = ("float32", "mixed_bfloat16")

_DATA = flags.DEFINE_multi_string(
    "data", None, "Dataset spec(s) as for `tfmir train --data` (default: the shipped sample).")
_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESET_DEFAULTS), "Model and input sizes.")
_NUM_IMAGES = flags.DEFINE_integer(
    "num_images", None, "Images embedded per timed run (default: 8192, paper: 256); the training "
    "split is cycled when it is smaller.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None,
                                   "Embedding batch size (default: 256, paper: 32).")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", None,
                                    "Train steps per timed epoch (default: 30, paper: 3).")
_CLASSES = flags.DEFINE_integer("classes_per_batch", None,
                                "c, classes per training batch (default: the preset's).")
_PER_CLASS = flags.DEFINE_integer("per_class", None,
                                  "k, images per class per training batch (default: preset's).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per figure (the median is reported).")
_PRECISIONS = flags.DEFINE_list("precisions", list(PRECISIONS), "Keras dtype policies to compare.")
_JIT = flags.DEFINE_bool("jit", True, "Also time the train step with "
                         "`model.compile(jit_compile=True)` (on one in-memory batch).")
_EMBED = flags.DEFINE_bool("embed", True, "Measure embedding throughput, make_dataset → model "
                           "against the model alone (section 1).")
_TRAIN = flags.DEFINE_bool("train", True, "Measure training throughput.")
_RECALL = flags.DEFINE_bool("recall", True, "Train twice (float32, mixed_bfloat16) and compare "
                            "test Recall@1 (takes minutes).")
_RECALL_PRESET = flags.DEFINE_enum("recall_preset", "cpu", list(PRESET_DEFAULTS),
                                   "Preset trained for the Recall@1 comparison.")
_RECALL_EPOCHS = flags.DEFINE_integer("recall_epochs", 3, "Epochs of each Recall@1 training.")
_RECALL_STEPS = flags.DEFINE_integer("recall_steps_per_epoch", 100,
                                     "Steps per epoch of each Recall@1 training.")
_RECALL_SEEDS = flags.DEFINE_list("recall_seeds", ["0"], "Seeds of the Recall@1 trainings; "
                                  "each seed trains every precision.")
_COMPARE_BACKBONES = flags.DEFINE_bool(
    "compare_backbones", True, "Compare the embedding and training speed of --backbones at "
    "--backbone_sizes, model alone on in-memory batches (takes about 25 minutes).")
_BACKBONES = flags.DEFINE_list(
    "backbones", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                  "efficientnet_b0", "resnet50"], f"Backbones compared, among {BACKBONES}.")
flags.register_validator("backbones", lambda names: set(names) <= set(BACKBONES),
                         f"--backbones must be among {BACKBONES}")
_BACKBONE_SIZES = flags.DEFINE_list("backbone_sizes", ["96", "224"],
                                    "Input sides (px) at which every backbone is compared.")
_BACKBONE_BATCH_SIZE = flags.DEFINE_integer("backbone_batch_size", 64,
                                            "Embedding batch size of the backbone comparison.")
_BACKBONE_RUN_SECONDS = flags.DEFINE_float(
    "backbone_run_seconds", 2.0, "About how long one timed run of the backbone comparison lasts "
    "(at least one batch or step).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights, sampling and augmentation.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Also write every figure here.")


# --- Measuring --------------------------------------------------------------------------------

@contextlib.contextmanager
def _policy(name: str):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _cycled(examples, num_items: int):
    """The first num_items items, cycling through `examples` when it has fewer."""
    order = np.arange(num_items) % len(examples)
    if num_items <= len(examples):
        return examples.subset(order)
    stored = ({"images": examples.images[order], "paths": None} if examples.in_memory
              else {"images": None, "paths": examples.paths[order]})
    return dataclasses.replace(
        examples, labels=examples.labels[order], sources=examples.sources[order],
        ids=[f"{index}:{examples.ids[position]}" for index, position in enumerate(order)],
        mask_paths=None, splits=None, **stored)


# --- The three measurements -------------------------------------------------------------------

def _warm_round_robin(runs: dict, repeats: int) -> dict:
    """`measure.round_robin` after one untimed warm-up call of each run."""
    for run in runs.values():
        run()
    return measure.round_robin(runs, repeats)


def _embed_function(model):
    # What embed_examples does: one traced function, shape-relaxed for the last partial batch.
    return tf.function(lambda images: model(images, training=False), reduce_retracing=True)


def _embed_all(embed, batches):
    def run():
        for element in batches:
            np.asarray(embed(element["image"]))
    return run


def _training_dataset(train, *, image_size: int, resize_size: int, num_classes_per_batch: int,
                      num_per_class: int, seed: int):
    """The sampler-driven training pipeline of `train_embedder`, as (images, labels) batches."""
    sampler = ClassBalancedSampler(train.labels, num_classes_per_batch=num_classes_per_batch,
                                   num_per_class=num_per_class, seed=seed)
    dataset = make_dataset(train, training=True, sampler=sampler, image_size=image_size,
                           resize_size=resize_size, seed=seed)
    # The Embedder compiled with a MultiSimilarity loss trains on (images, labels) pairs.
    return dataset.map(lambda inputs, targets: (inputs["image"], targets["label"]))


def _train_steps(train_step, iterator, steps: int):
    """A run of `steps` calls of a model's compiled train function on one live iterator."""
    def run():
        for _ in range(steps):
            logs = train_step(iterator)
        float(logs["loss"])  # waits for the last step
    return run


def _sized_run(make_run, seconds: float):
    """`make_run(count)` with the count of units (batches, steps) that lasts about `seconds`.

    The count comes from one timed `make_run(1)`, after an untimed one (warm-up). Returns the
    run and the count.
    """
    once = make_run(1)
    once()
    timing, _ = measure.timed(once)
    count = max(1, round(seconds / timing.seconds))
    return make_run(count), count


def measure_embedding(examples, *, preset: str, precisions, batch_size: int, image_size: int,
                      resize_size: int, repeats: int, seed: int) -> dict:
    """Images/s of the eval pipeline + model, the model on in-memory batches, the pipeline alone."""
    build_seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        dataset = make_dataset(examples, training=False, batch_size=batch_size,
                               image_size=image_size, resize_size=resize_size, fields=("image",))
        build_seconds.append(time.perf_counter() - start)
    batches = list(dataset)  # decoded, resized and cropped, in memory: the model-only input

    def pipeline_only():
        for _ in dataset:
            pass

    runs = {}
    for precision in precisions:
        keras.utils.set_random_seed(seed)
        with _policy(precision):
            embed = _embed_function(Embedder.from_preset(preset, weights=None))
        runs[precision, "model_only"] = _embed_all(embed, batches)
        runs[precision, "pipeline_and_model"] = _embed_all(embed, dataset)
    runs[None, "pipeline_only"] = pipeline_only
    timings = _warm_round_robin(runs, repeats)

    def summary(name):
        return measure.summary(timings[name], len(examples), "images/s", repeats)

    result = {"make_dataset_seconds": statistics.median(build_seconds),
              "pipeline_only": summary((None, "pipeline_only"))}
    for precision in precisions:
        figures = {variant: summary((precision, variant))
                   for variant in ("model_only", "pipeline_and_model")}
        figures["overhead"] = (1 - figures["pipeline_and_model"]["median"]
                               / figures["model_only"]["median"])
        result[precision] = figures
    return result


def measure_training(train, *, preset: str, precisions, jit: bool, steps: int, repeats: int,
                     image_size: int, resize_size: int, num_classes_per_batch: int,
                     num_per_class: int, learning_rate: float, seed: int) -> dict:
    """Train steps/s on the sampler-driven pipeline and on one in-memory batch, interleaved.

    Every (precision, jit_compile, feed) gets its own model, compiled as `train_embedder` does
    (plus jit_compile). One untimed `fit` epoch of `steps` steps traces and compiles it (its
    time is reported as the first epoch); then one dataset iterator per feed lives on, as in
    `fit`, and a timed run is `steps` calls of the model's compiled train function (the step
    `fit` runs) on it. The runs of one precision are timed round robin, so that the feeds
    compared see the same machine: timed one after the other, the figures of two identical
    configurations differed by up to 15 % here.
    """
    def training_dataset():
        return _training_dataset(train, image_size=image_size, resize_size=resize_size,
                                 num_classes_per_batch=num_classes_per_batch,
                                 num_per_class=num_per_class, seed=seed)

    first_batch = next(iter(training_dataset()))
    configs = [(False, "in_memory"), (False, "pipeline")] + ([(True, "in_memory")] if jit else [])
    result = {"batch_size": num_classes_per_batch * num_per_class}
    for precision in precisions:
        runs, first_epochs = {}, {}
        for jit_compile, feed in configs:
            keras.utils.set_random_seed(seed)
            dataset = (training_dataset() if feed == "pipeline"
                       else tf.data.Dataset.from_tensors(first_batch).repeat())
            key = (f"jit_compile={jit_compile}", feed)
            try:
                with _policy(precision):
                    model = Embedder.from_preset(preset, weights=None)
                    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                                  loss=MultiSimilarity(), jit_compile=jit_compile)
                    first_epochs[key], _ = measure.timed(lambda: model.fit(
                        dataset, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False))
                run = _train_steps(model.make_train_function(), iter(dataset), steps)
                run()  # warm-up: the iterator's first batches
                runs[key] = run
            except Exception as error:  # noqa: BLE001 - e.g. XLA failing: report it, go on
                result.setdefault(key[0], {}).setdefault(precision, {})[feed] = {
                    "error": f"{type(error).__name__}: {error}"[:500]}
                print(f"  train {precision} {key[0]} {feed}: {error}", flush=True)
        timings = measure.round_robin(runs, repeats)
        for key, run_timings in timings.items():
            figure = {**measure.summary(run_timings, steps, "steps/s", repeats),
                      "warmup_epoch_seconds": first_epochs[key].seconds}
            result.setdefault(key[0], {}).setdefault(precision, {})[key[1]] = figure
            print(f"  train {precision} {key[0]} {key[1]}: {figure['median']:.2f} steps/s, "
                  f"first epoch {figure['warmup_epoch_seconds']:.1f} s, others up to "
                  f"{figure['others_cores']:.2f} cores ({measure.load_average()})", flush=True)
        runs.clear()
        keras.backend.clear_session()
        figures = result["jit_compile=False"][precision]
        if "error" not in figures["in_memory"] and "error" not in figures["pipeline"]:
            figures["overhead"] = 1 - figures["pipeline"]["median"] / figures["in_memory"]["median"]

    # The input pipeline alone: one iterator (as fit keeps one), its start timed apart.
    dataset = training_dataset()
    starts = []
    for _ in range(repeats):
        start = time.perf_counter()
        iterator = iter(dataset)
        next(iterator)
        starts.append(time.perf_counter() - start)

    def next_batches():
        for _ in range(steps):
            next(iterator)

    timings = _warm_round_robin({"next_batches": next_batches}, repeats)["next_batches"]
    result["pipeline_only"] = {**measure.summary(timings, steps, "batches/s", repeats),
                               "first_batch_seconds": statistics.median(starts)}
    return result


def measure_recall(splits, *, preset: str, precisions, seeds, epochs: int, steps_per_epoch: int):
    """Trains `preset` once per (seed, precision) and scores the final model on the test split."""
    runs = []
    for seed in seeds:
        for precision in precisions:
            with tempfile.TemporaryDirectory() as workdir:
                # timed() calls the lambda at once: the loop variables are current.
                timing, result = measure.timed(lambda: train_embedder(
                    splits["train"], splits["val"], workdir=workdir, preset=preset,
                    epochs=epochs, steps_per_epoch=steps_per_epoch,
                    mixed_precision=precision == "mixed_bfloat16", seed=seed, verbose=0))
            recall = evaluate_retrieval(result.model, splits["test"],
                                        resize_size=result.resize_size, ks=(1,))
            runs.append({"precision": precision, "seed": seed, "train_seconds": timing.seconds,
                         "others_cores": timing.others,
                         "recall@1": {source: values["recall@1"]
                                      for source, values in recall.items()}})
            print(f"  recall: {precision} seed={seed}: "
                  + ", ".join(f"{source} {100 * value:.1f}"
                              for source, value in runs[-1]["recall@1"].items())
                  + f" ({timing.seconds:.0f} s, others {timing.others:.2f} cores)", flush=True)
    return runs


def compare_backbones(train, *, backbones, sizes, precisions, batch_size: int,
                      run_seconds: float, repeats: int, num_classes_per_batch: int,
                      num_per_class: int, learning_rate: float, seed: int) -> list:
    """Embedding images/s and train steps/s of every (backbone, size, precision), in memory.

    Per size, one batch of `batch_size` images of `train` and one c x k training batch (the
    sampler-driven pipeline's first) are kept in memory, resized to the side without cropping.
    Per (backbone, size) and precision, one `Embedder(backbone, image_size=size, weights=None)`
    embeds the batch repeatedly through `_embed_function`, as the model-alone figure of
    `measure_embedding`, and another, compiled as `train_embedder` does, runs its compiled train
    step on the training batch repeated, as the in-memory feed of `measure_training`. The first
    call (tracing; for training one `fit` step) is untimed and reported.

    The runs of one (backbone, size), embedding and training in every precision, are timed
    round robin, after all of its models are built and warmed up: a model's first step after
    another model was built took 3.3 s here against 1.0 s (TF caches oneDNN primitives per
    thread). Interleaving all pairs at once would keep 40 models alive, whose primitives could
    overflow those caches (1024 per thread and data type). One row per (backbone, size).
    """
    rows = []
    for size in sizes:
        images = next(iter(make_dataset(
            _cycled(train, batch_size), training=False, batch_size=batch_size, image_size=size,
            resize_size=size, fields=("image",))))
        training_batches = tf.data.Dataset.from_tensors(next(iter(_training_dataset(
            train, image_size=size, resize_size=size, num_classes_per_batch=num_classes_per_batch,
            num_per_class=num_per_class, seed=seed)))).repeat()
        for backbone in backbones:
            make_runs, first_calls = {}, {}
            for precision in precisions:
                keras.utils.set_random_seed(seed)
                with _policy(precision):
                    embed = _embed_function(
                        Embedder(backbone=backbone, image_size=size, weights=None))
                    first_calls["embed", precision], _ = measure.timed(
                        _embed_all(embed, [images]))
                    model = Embedder(backbone=backbone, image_size=size, weights=None)
                    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                                  loss=MultiSimilarity())
                    first_calls["train", precision], _ = measure.timed(lambda: model.fit(
                        training_batches, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False))
                train_step, iterator = model.make_train_function(), iter(training_batches)
                make_runs["embed", precision] = (
                    lambda count, embed=embed: _embed_all(embed, [images] * count))
                make_runs["train", precision] = (
                    lambda count, train_step=train_step, iterator=iterator:
                    _train_steps(train_step, iterator, count))
            runs, counts = {}, {}
            for key, make_run in make_runs.items():
                runs[key], counts[key] = _sized_run(make_run, run_seconds)
            row = {"backbone": backbone, "image_size": size, "embed": {}, "train": {}}
            for key, timings in measure.round_robin(runs, repeats).items():
                section, precision = key
                work, unit, per_run = ((batch_size, "images/s", "batches_per_run")
                                       if section == "embed" else (1, "steps/s", "steps_per_run"))
                row[section][precision] = {
                    **measure.summary(timings, counts[key] * work, unit, repeats),
                    per_run: counts[key], "first_call_seconds": first_calls[key].seconds}
            rows.append(row)
            figures = [f"{section} {precision} {figure['median']:.2f} {figure['unit']}"
                       for section in ("embed", "train")
                       for precision, figure in row[section].items()]
            print(f"  {backbone} {size} px: " + ", ".join(figures)
                  + f" ({measure.load_average()})", flush=True)
            make_runs.clear()
            runs.clear()
            keras.backend.clear_session()
    return rows


# --- Report -----------------------------------------------------------------------------------

def _cell(figure: dict | None, digits: int = 1) -> str:
    if figure is None:
        return "—"
    if "error" in figure:
        return "failed"
    mark = " (disturbed)" if figure.get("disturbed") else ""
    return (f"{figure['median']:.{digits}f} [{figure['min']:.{digits}f}–{figure['max']:.{digits}f}]"
            + mark)


def _ratio(numerator: dict | None, denominator: dict | None) -> str:
    if not numerator or not denominator or "error" in numerator or "error" in denominator:
        return "—"
    return f"{numerator['median'] / denominator['median']:.2f}×"


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def throughput_table(results: dict, precisions) -> str:
    """Markdown: one row per measurement, one column per precision, and the speed-up."""
    reference, other = precisions[0], (precisions[1] if len(precisions) > 1 else None)
    columns = [*precisions] + ([f"{other} / {reference}"] if other else [])
    lines = ["| measurement | " + " | ".join(columns) + " |", "|---" * (1 + len(columns)) + "|"]

    def row(name, cells, speedup=""):
        lines.append(f"| {name} | " + " | ".join(cells) + (f" | {speedup}" if other else "") + " |")

    def same(figure, digits):
        return [_cell(figure, digits)] + ["(no model)"] * (len(precisions) - 1)

    embedding = results.get("embedding")
    if embedding:
        for key, name in (("model_only", "embed: model alone, batches in memory (images/s)"),
                          ("pipeline_and_model", "embed: make_dataset → model (images/s)")):
            figures = [embedding[p][key] for p in precisions]
            row(name, [_cell(f) for f in figures], _ratio(figures[-1], figures[0]))
        row("**embed: pipeline overhead**",
            [_percent(embedding[p]["overhead"]) for p in precisions])
        row("embed: make_dataset alone (images/s)", same(embedding["pipeline_only"], 0))
    training = results.get("training")
    if training:
        plain = training["jit_compile=False"]
        for feed, name in (("in_memory", "train: one batch in memory (steps/s)"),
                           ("pipeline", "train: sampler → make_dataset (steps/s)")):
            figures = [plain[p][feed] for p in precisions]
            row(name, [_cell(f, 2) for f in figures], _ratio(figures[-1], figures[0]))
        row("**train: pipeline overhead**", [_percent(plain[p].get("overhead")) for p in precisions])
        row("train: sampler → make_dataset alone, running iterator (batches/s)",
            same(training["pipeline_only"], 0))
        row("train: new iterator to first batch (ms)",
            [f"{1000 * training['pipeline_only']['first_batch_seconds']:.0f}"]
            + ["(no model)"] * (len(precisions) - 1))
        if "jit_compile=True" in training:
            figures = [training["jit_compile=True"][p]["in_memory"] for p in precisions]
            row("train, jit_compile=True: one batch in memory (steps/s)",
                [_cell(f, 2) for f in figures], _ratio(figures[-1], figures[0]))
            row("train: jit_compile=True / False (one batch in memory)",
                [_ratio(figure, plain[p]["in_memory"]) for figure, p in zip(figures, precisions)])
            row("train: first (untimed) epoch, jit_compile False → True (s)",
                [f"{plain[p]['in_memory'].get('warmup_epoch_seconds', float('nan')):.0f} → "
                 f"{figure.get('warmup_epoch_seconds', float('nan')):.0f}"
                 for figure, p in zip(figures, precisions)])
    return "\n".join(lines)


def backbone_table(rows, precisions) -> str:
    """Markdown: one row per (backbone, size); embed images/s and train steps/s per precision."""
    reference, other = precisions[0], (precisions[1] if len(precisions) > 1 else None)
    speedup = [f"{other} / {reference}"] if other else []
    columns = (["backbone", "size (px)"] + [f"embed {p} (images/s)" for p in precisions] + speedup
               + [f"train {p} (steps/s)" for p in precisions] + speedup)
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for row in rows:
        cells = [row["backbone"], str(row["image_size"])]
        for measurement, digits in (("embed", 1), ("train", 2)):
            figures = [row[measurement][p] for p in precisions]
            cells += [_cell(figure, digits) for figure in figures]
            cells += [_ratio(figures[1], figures[0])] if other else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recall_table(runs) -> str:
    sources = list(runs[0]["recall@1"])
    lines = ["| precision | seed | " + " | ".join(f"{s} R@1" for s in sources)
             + " | train + val time | others (cores) |", "|---" * (4 + len(sources)) + "|"]
    for run in runs:
        lines.append(f"| {run['precision']} | {run['seed']} | "
                     + " | ".join(f"{100 * run['recall@1'][s]:.1f}" for s in sources)
                     + f" | {run['train_seconds']:.0f} s | {run['others_cores']:.2f} |")
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    started = time.perf_counter()
    env = measure.environment()
    print("environment: " + ", ".join(f"{key}={value}" for key, value in env.items()))
    print(f"start: {time.strftime('%Y-%m-%d %H:%M:%S')}, {measure.load_average()}", flush=True)

    if _DATA.value:
        from tfmir.data.specs import load_specs

        splits = load_specs(_DATA.value, seed=_SEED.value)
    else:
        from tfmir.samples import load_sample

        splits = load_sample()
    preset = _PRESET.value
    config = get_config(f"specialist:{preset}")
    default_images, default_batch, default_steps = PRESET_DEFAULTS[preset]
    num_images = _NUM_IMAGES.value or default_images
    batch_size = _BATCH_SIZE.value or default_batch
    train_steps = _TRAIN_STEPS.value or default_steps
    image_size = config.task.model["image_size"]
    resize_size = config.data.resize_size
    num_classes_per_batch = _CLASSES.value or config.sampler.num_classes_per_batch
    num_per_class = _PER_CLASS.value or config.sampler.num_per_class
    precisions = list(_PRECISIONS.value)
    repeats = _REPEATS.value
    print(f"preset={preset}: image_size={image_size}, resize_size={resize_size}; embedding "
          f"{num_images} images in batches of {batch_size}; training batches of "
          f"{num_classes_per_batch}x{num_per_class}, {train_steps} steps per timed epoch; "
          f"median of {repeats} runs", flush=True)

    backbones, backbone_sizes = _BACKBONES.value, [int(size) for size in _BACKBONE_SIZES.value]
    results = {"environment": env, "preset": preset, "flags": {
        "num_images": num_images, "batch_size": batch_size, "train_steps": train_steps,
        "classes_per_batch": num_classes_per_batch, "per_class": num_per_class,
        "repeats": repeats, "precisions": precisions, "jit": _JIT.value,
        "seed": _SEED.value, "data": _DATA.value or ["sample"], "embed": _EMBED.value,
        "train": _TRAIN.value, "recall": _RECALL.value,
        "compare_backbones": _COMPARE_BACKBONES.value, "backbones": backbones,
        "backbone_sizes": backbone_sizes, "backbone_batch_size": _BACKBONE_BATCH_SIZE.value,
        "backbone_run_seconds": _BACKBONE_RUN_SECONDS.value}}

    if _EMBED.value:
        examples = _cycled(splits["train"], num_images)
        embedding = measure_embedding(examples, preset=preset, precisions=precisions,
                                      batch_size=batch_size, image_size=image_size,
                                      resize_size=resize_size, repeats=repeats, seed=_SEED.value)
        results["embedding"] = embedding
        for precision in precisions:
            figures = embedding[precision]
            print(f"  embed {precision}: model alone {figures['model_only']['median']:.1f}, "
                  f"make_dataset → model {figures['pipeline_and_model']['median']:.1f} images/s, "
                  f"overhead {_percent(figures['overhead'])}", flush=True)
        print(f"  embed: make_dataset alone {embedding['pipeline_only']['median']:.0f} images/s, "
              f"built in {1000 * embedding['make_dataset_seconds']:.0f} ms "
              f"({measure.load_average()})", flush=True)

    if _TRAIN.value:
        results["training"] = measure_training(
            splits["train"], preset=preset, precisions=precisions, jit=_JIT.value,
            steps=train_steps, repeats=repeats, image_size=image_size, resize_size=resize_size,
            num_classes_per_batch=num_classes_per_batch, num_per_class=num_per_class,
            learning_rate=config.optimizer.learning_rate, seed=_SEED.value)
        print(f"  training measured ({measure.load_average()})", flush=True)

    if _EMBED.value or _TRAIN.value:
        print(f"\nThroughput, preset={preset} (median [min–max] of {repeats} runs during which "
              f"other processes used at most {measure.max_others()} cores):\n")
        table = throughput_table(results, precisions)
        print(table)
        results["table"] = table

    if _COMPARE_BACKBONES.value:
        print(f"\nBackbones {', '.join(backbones)} at {', '.join(map(str, backbone_sizes))} px, "
              f"model alone: embedding batches of {_BACKBONE_BATCH_SIZE.value}, training batches "
              f"of {num_classes_per_batch}x{num_per_class} ({measure.load_average()})", flush=True)
        rows = compare_backbones(
            splits["train"], backbones=backbones, sizes=backbone_sizes, precisions=precisions,
            batch_size=_BACKBONE_BATCH_SIZE.value, run_seconds=_BACKBONE_RUN_SECONDS.value,
            repeats=repeats, num_classes_per_batch=num_classes_per_batch,
            num_per_class=num_per_class, learning_rate=config.optimizer.learning_rate,
            seed=_SEED.value)
        print(f"\nBackbones, model alone on in-memory batches (median [min–max] of {repeats} runs "
              f"of about {_BACKBONE_RUN_SECONDS.value:g} s during which other processes used at "
              f"most {measure.max_others()} cores):\n")
        table = backbone_table(rows, precisions)
        print(table)
        results["backbones"] = {"rows": rows, "table": table}

    if _RECALL.value:
        print(f"\nRecall@1: {_RECALL_PRESET.value} preset, {_RECALL_EPOCHS.value} epochs x "
              f"{_RECALL_STEPS.value} steps, final model, test split", flush=True)
        runs = measure_recall(splits, preset=_RECALL_PRESET.value, precisions=precisions,
                              seeds=[int(seed) for seed in _RECALL_SEEDS.value],
                              epochs=_RECALL_EPOCHS.value, steps_per_epoch=_RECALL_STEPS.value)
        results["recall"] = {"preset": _RECALL_PRESET.value, "epochs": _RECALL_EPOCHS.value,
                             "steps_per_epoch": _RECALL_STEPS.value, "runs": runs}
        print("\n" + recall_table(runs))

    results["wall_seconds"] = time.perf_counter() - started
    print(f"\nend: {time.strftime('%Y-%m-%d %H:%M:%S')}, {measure.load_average()}; wall time "
          f"{results['wall_seconds']:.0f} s; TF intra/inter-op threads "
          f"{tf.config.threading.get_intra_op_parallelism_threads()}/"
          f"{tf.config.threading.get_inter_op_parallelism_threads()} (0 = one per core)")
    measure.write_json(_OUTPUT_JSON.value, results)


if __name__ == "__main__":
    sys.exit(app.run(main))
