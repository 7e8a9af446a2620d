"""Tables I-III and Figs. 6/7 of the Y-Net hash-code paper, on PH2 dermoscopy images with masks.

Command (from the repository root; the data folder defaults to `../shared/data` beside it):

    python experiments/ynet_tables.py --config=cpu --workdir=runs/ynet_tables

`--config=cpu` trains each Y-Net from scratch at 128 px (crops of 144 px images) for the epochs
of `tfmir.configs.ynet`'s "cpu" schedule; `--config=paper` is the paper's 256 px, 500 epochs.
`--smoke` runs the whole pipeline with the tiny config on 40 images per class (train 96 / val 12
/ test 12: the validation mAP@10 needs at least 11 images).
`--folds=5` replaces the single seeded 9:1 split by 5-fold cross-validation (every image is a
test query once; intervals are then over all 200 queries).

Rerunning with the same `--workdir` skips every finished run (its `final.keras` and `task.keras`
exist), resumes an interrupted one, and reuses the features cached beside each checkpoint;
tables and figures are always redone. To redo a run, delete its folder.

Data: `ph2/labels.csv` (PH2: 200 dermoscopy images, 256 x 192, with lesion masks; classes common
nevus 80, atypical nevus 80, melanoma 40). PH2 has no official split; a seeded stratified split
gives train 160 / val 20 / test 20 (the paper's 9:1 train:test, with a validation share carved
from the training part to pick the checkpoint; `tfmir.data.split_examples`, ratios 8:1:1). The
paper's data are Fundus (650 images, 2 classes, optic disc/cup masks) and JSRT (154 nodules, 2
classes): like PH2, small sets with class labels and masks, but other images, so the paper's
numbers below are context, not targets.

What it trains per fold, each in `<workdir>/fold<i>/<run>/` (`tfmir.training.fit` with the
"ynet" config; the best epoch by validation mAP@10 of the 64-bit codes is kept, the deployable
model as best.keras and the whole Y-Net with both branches as task.keras):

- `ynet`: Y-Net with the coupled loss, ω = 0.5 fixed (the paper's setting).
- `learnable`: ω learned from 0.5 (ω = sigmoid(θ); `tfmir.losses.LossWeight`).
- `sum`: the plain sum L_circle + L_CE (the paper's comparison, Sec. IV-C RQ3).
- `no_fpn`, `no_rmac`, `no_branches`: Table III's ablations (`YNet(branches=...)`).
- `cross_entropy`: the R-MAC branch trained with softmax cross-entropy instead of circle loss
  (Table III's "w/o Circle loss").

Evaluation on the test split, queries searched against the training split (the paper indexes its
training set and queries its test set): mAP@5/10/20/50 (eq. 3 with R = the relevant items among
the first k; 0 when none), each with a 95 % percentile bootstrap interval over the test queries
(`tfmir.metrics.bootstrap_mean` of per-query AP), and paired bootstrap differences of Y-Net
against every other row on the same queries:

- Table I: Y-Net's mAP@10 with 36-, 64-, 128- and 256-bit codes, one trained model (the hash
  projection is fixed and not trained, so the code length is chosen after training), Hamming
  ranking (`tfmir.index.HammingIndex`, ties in index order).
- Table II (pooling baselines): R-MAC, SPoC, GeM, CroW and CAM-weighted pooling
  (`tfmir.layers`) over the same features, the 512-channel maps of the trained Y-Net's R-MAC
  branch (CAM with its class layer's weights), compared as float descriptors by cosine, beside
  Y-Net's 64-bit codes. (The paper's baselines are other networks; ours isolate the pooling.)
- Table III: the ablations and the loss variants above, 64-bit codes.
- Dice and IoU of the FPN branch's masks on the test images (at the model's input crop).
- RQ4 timing: codes per second over the training split (decoding included), the Hamming index
  build time and the latency of the test queries (top-10).
- `fig_top5.png` (the paper's Figs. 6/7): the top-5 of a few test queries, Y-Net's 64-bit codes
  against the no-branch network's, frames green when the class matches.

Writes into `--workdir`: `table.md`, `results.json` (every number, intervals, wall time per run,
data counts, flags), `flags.txt`, `fig_top5.png`.

The paper's numbers (mAP, top-10 unless named):

| | Fundus | JSRT |
|---|---|---|
| Table I, 36 / 64 / 128 / 256 bits | 0.5903 / 0.6102 / 0.6266 / 0.6308 | 0.5361 / 0.5518 / 0.5732 / 0.5809 |
| Table II, R-MAC (512-d), top-5/10/20/50 | 0.5016 / 0.4884 / 0.4585 / 0.4528 | 0.4682 / 0.4191 / 0.3965 / 0.3812 |
| Table II, CroW (512-d) | 0.5223 / 0.4681 / 0.4471 / 0.4366 | 0.4993 / 0.4705 / 0.4396 / 0.4189 |
| Table II, CAM (2048-d) | 0.5917 / 0.5488 / 0.4982 / 0.4609 | 0.5611 / 0.5124 / 0.4497 / 0.4187 |
| Table II/III, Y-Net (64 bits) | 0.6367 / 0.6102 / 0.5820 / 0.5581 | 0.6013 / 0.5518 / 0.5284 / 0.4976 |
| Table III, w/o FPN and R-MAC | 0.5001 / 0.4871 / 0.4679 / 0.4575 | 0.5324 / 0.4856 / 0.4509 / 0.4297 |
| Table III, w/o FPN | 0.5881 / 0.5656 / 0.5443 / 0.5033 | 0.5325 / 0.5114 / 0.4831 / 0.4501 |
| Table III, w/o R-MAC | 0.5561 / 0.5179 / 0.4854 / 0.4536 | 0.5210 / 0.4914 / 0.4597 / 0.4285 |
| Table III, w/o circle loss | 0.6061 / 0.5879 / 0.5554 / 0.5136 | 0.5684 / 0.5291 / 0.4976 / 0.4703 |

The paper also says the coupled loss beats the plain sum by about 2 % mAP on average (no table).

Our numbers (`--config=cpu`, seed 0, one 8:1:1 split: 160 / 20 / 20; 2-core AMD EPYC (AVX2);
mAP@10 of the 20 test queries against the 160 training images, 95 % bootstrap intervals):

| row | mAP@10 | row | mAP@10 |
|---|---|---|---|
| Y-Net, 36 bits | 0.559 [0.438, 0.676] | w/o FPN and R-MAC | 0.504 [0.384, 0.624] |
| Y-Net, 64 bits | 0.648 [0.567, 0.730] | w/o FPN | 0.545 [0.414, 0.673] |
| Y-Net, 128 bits | 0.478 [0.360, 0.599] | w/o R-MAC | 0.556 [0.441, 0.676] |
| Y-Net, 256 bits | 0.520 [0.409, 0.636] | w/o circle loss (CE) | 0.616 [0.527, 0.700] |
| R-MAC (512-d float) | 0.518 [0.384, 0.653] | plain sum of the losses | 0.468 [0.376, 0.554] |
| CroW | 0.514 [0.392, 0.648] | learnable ω | 0.511 [0.379, 0.634] |
| CAM-weighted | 0.546 [0.396, 0.694] | SPoC / GeM | 0.483 / 0.514 |

Dice of the FPN masks on the test images: 0.816 (Y-Net), 0.910 (learnable ω), 0.849 (sum),
0.877 (w/o R-MAC), 0.833 (CE). RQ4: 92.6 codes/s over the 160 training images (decoding
included), Hamming index built in 0.42 ms, the 20 test queries' top-10 in 0.20 ms. Wall time 44
minutes: Y-Net 462 s, learnable 452 s, sum 394 s, w/o FPN 328 s, w/o R-MAC 327 s, w/o both
217 s, CE 388 s, evaluation about 40 s.

What this says (paired bootstrap of Y-Net 64 bits minus each row on the same 20 queries):

- Y-Net beats the network without both branches (+0.144 [0.021, 0.268]) and R-MAC, SPoC, GeM
  and CroW pooling of its own R-MAC-branch maps (+0.10 to +0.17, intervals above 0); against
  w/o FPN (+0.103 [-0.019, 0.221]), w/o R-MAC (+0.092 [-0.064, 0.243]), CAM (+0.103
  [-0.025, 0.230]) and cross-entropy instead of circle loss (+0.032 [-0.095, 0.158]) the
  differences point the paper's way but are inside the noise of 20 queries.
- The coupled loss beats the plain sum by +0.180 [0.069, 0.297] (the paper: about 2 points).
- A learnable ω does not work as eq. 2 is written: ω fell from 0.5 to 0.0018 (it is pulled
  toward the smaller loss), so the R-MAC branch stopped training; the masks got the best Dice
  (0.910) and retrieval fell to 0.511.
- mAP does not grow with the code length here, unlike Table I: 64 bits beat 128 (+0.170
  [0.049, 0.285]) and 256 (+0.129 [0.032, 0.222]). Two reasons we can name: the checkpoint was
  chosen by the validation mAP@10 of the 64-bit codes (20 images, an optimistic choice for 64
  bits only), and at 128 px the core node is 4 x 4, so 128 and 256 bits are 8 and 16 random
  1 x 1 projections of 256 channels per cell, not more spatial detail.
- Our mAP sits near the paper's Fundus and JSRT values, but on other data, with 20 queries:
  context, not a reproduction.

Why ours differs from the paper: PH2 (200 dermoscopy images, 3 classes) instead of Fundus/JSRT;
128 px and 500 steps instead of 256 px and 500 epochs; one 8:1:1 split (20 test queries) unless
`--folds=5`; checkpoint chosen on a 20-image validation split; our pooling baselines pool the
trained Y-Net's own feature maps instead of the paper's separately trained networks.

Reference:
    Fang, Fu, Zeng, Yan, Yan, Liu, "Combating Ambiguity for Hash-code Learning in Medical
    Instance Retrieval", IEEE Journal of Biomedical and Health Informatics, 2021, Tables I-III,
    Figs. 6-7; PH2: Mendonça et al., IEEE EMBC 2013.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import numpy as np
from absl import app, flags

from run_cache import (DEFAULT_DATA_ROOT, best_task_checkpoint, cached_outputs, cap_per_class,
                       checkpoint, describe, file_fingerprint, run_once, run_settings)

DATA_FILE = "ph2/labels.csv"
COLUMNS = {"path": "image", "label": "diagnosis_name", "mask": "mask", "source": None}
SETTINGS = ("tiny", "cpu", "paper")
SPLIT_RATIOS = (8, 1, 1)  # train / val / test: the paper's 9:1, val taken from the 9
# run name -> (title, config overrides)
RUNS = {
    "ynet": ("Y-Net (coupled loss, omega = 0.5)", {}),
    "learnable": ("Y-Net, learnable omega", {"task.args.loss_weighting": "learnable"}),
    "sum": ("Y-Net, plain sum of the losses", {"task.args.loss_weighting": "sum"}),
    "no_fpn": ("Y-Net w/o FPN branch", {"task.model.branches": "rmac"}),
    "no_rmac": ("Y-Net w/o R-MAC branch", {"task.model.branches": "fpn"}),
    "no_branches": ("Y-Net w/o FPN and R-MAC branch", {"task.model.branches": "none"}),
    "cross_entropy": ("Y-Net w/o circle loss (cross-entropy)",
                      {"task.args.classification_loss": "cross_entropy"}),
}
CODE_LENGTHS = (36, 64, 128, 256)
TOP_K = (5, 10, 20, 50)
POOLINGS = ("rmac", "spoc", "gem", "crow", "cam")
POOLING_TITLES = {"rmac": "R-MAC", "spoc": "SPoC", "gem": "GeM (p = 3)", "crow": "CroW",
                  "cam": "CAM-weighted"}
SMOKE = {"epochs": 2, "steps_per_epoch": 2, "per_class": 40, "num_resamples": 1000}
FIGURE = "fig_top5.png"
FIGURE_QUERIES = 4

# The paper's mAP (Fundus, JSRT); Table II/III at top-5/10/20/50, Table I at top-10 per bits.
PAPER = {
    "table1": {"fundus": dict(zip(CODE_LENGTHS, (0.5903, 0.6102, 0.6266, 0.6308))),
               "jsrt": dict(zip(CODE_LENGTHS, (0.5361, 0.5518, 0.5732, 0.5809)))},
    "ynet": {"fundus": (0.6367, 0.6102, 0.5820, 0.5581), "jsrt": (0.6013, 0.5518, 0.5284, 0.4976)},
    "no_branches": {"fundus": (0.5001, 0.4871, 0.4679, 0.4575),
                    "jsrt": (0.5324, 0.4856, 0.4509, 0.4297)},
    "no_fpn": {"fundus": (0.5881, 0.5656, 0.5443, 0.5033),
               "jsrt": (0.5325, 0.5114, 0.4831, 0.4501)},
    "no_rmac": {"fundus": (0.5561, 0.5179, 0.4854, 0.4536),
                "jsrt": (0.5210, 0.4914, 0.4597, 0.4285)},
    "cross_entropy": {"fundus": (0.6061, 0.5879, 0.5554, 0.5136),
                      "jsrt": (0.5684, 0.5291, 0.4976, 0.4703)},
    "rmac": {"fundus": (0.5016, 0.4884, 0.4585, 0.4528), "jsrt": (0.4682, 0.4191, 0.3965, 0.3812)},
    "crow": {"fundus": (0.5223, 0.4681, 0.4471, 0.4366), "jsrt": (0.4993, 0.4705, 0.4396, 0.4189)},
    "cam": {"fundus": (0.5917, 0.5488, 0.4982, 0.4609), "jsrt": (0.5611, 0.5124, 0.4497, 0.4187)},
}

_CONFIG = flags.DEFINE_enum("config", "cpu", list(SETTINGS),
                            "Setting of tfmir.configs.ynet: cpu (2-core CPU, 128 px), paper "
                            "(256 px, 500 epochs), tiny.")
_SMOKE = flags.DEFINE_bool("smoke", False, f"Tiny config (unless --config is given), "
                           f"{SMOKE['epochs']} epochs of {SMOKE['steps_per_epoch']} steps, "
                           f"{SMOKE['per_class']} images per class: a pipeline check.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; rerun with it to resume.",
                               required=True)
_DATA_ROOT = flags.DEFINE_string("data_root", str(DEFAULT_DATA_ROOT), "Folder holding ph2/.")
_FOLDS = flags.DEFINE_integer("folds", 0, "0: one seeded 8:1:1 train/val/test split (the "
                              "paper's 9:1); k >= 2: k-fold cross-validation.")
_RUNS = flags.DEFINE_list("runs", list(RUNS), f"Runs among {list(RUNS)} (ynet is always run).")
_EPOCHS = flags.DEFINE_integer("epochs", None, "Epochs per run (default: the config's).")
_STEPS = flags.DEFINE_integer("steps_per_epoch", None, "Batches per epoch (default: one pass "
                              "over the training split).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the split, training and the bootstrap.")
_RESAMPLES = flags.DEFINE_integer("num_resamples", 10_000, "Bootstrap resamples (1000 with "
                                  "--smoke unless given).")


# --- Data ---------------------------------------------------------------------------------------


def load_ph2(path: str):
    from tfmir.data import load_csv_manifest

    return load_csv_manifest(path, source="ph2", columns=COLUMNS, strict=True)


def fold_splits(examples, folds: int, seed: int) -> list[dict]:
    """[{train, val, test}] per fold: one seeded 8:1:1 split, or k folds (test = fold i, val = a
    seeded eighth of the rest)."""
    from tfmir.data import concatenate, split_examples

    if folds == 0:
        return [split_examples(examples, SPLIT_RATIOS, seed=seed, names=("train", "val", "test"))]
    names = tuple(f"fold{i}" for i in range(folds))
    parts = split_examples(examples, (1,) * folds, seed=seed, names=names)
    result = []
    for index, name in enumerate(names):
        rest = concatenate([parts[other] for other in names if other != name],
                           separate_classes=False)
        split = split_examples(rest, (7, 1), seed=seed + index, names=("train", "val"))
        result.append({**split, "test": parts[name]})
    return result


# --- Runs ---------------------------------------------------------------------------------------


def run_config(run: str, *, setting: str, train, seed: int, epochs, steps):
    from tfmir.configs import get_config, override

    config = get_config(f"ynet:{setting}")
    values = {"seed": seed, **RUNS[run][1]}
    if steps is None:
        steps = max(1, round(len(train) / config.sampler.batch_size))  # one pass per epoch
    values["steps_per_epoch"] = steps
    if epochs is not None:
        values["epochs"] = epochs
    if RUNS[run][1].get("task.model.branches") in ("rmac", "none"):
        # Without the FPN branch there are no masks to score.
        values["evaluators"] = [{"name": "map", "k": 10, "codes": True}]
    return override(config, values)


def train_runs(fold_dir: pathlib.Path, splits: dict, runs, *, setting, seed, epochs, steps,
               verbose) -> dict:
    from tfmir.training import fit

    records = {}
    for run in runs:
        run_dir = fold_dir / run
        config = run_config(run, setting=setting, train=splits["train"], seed=seed,
                            epochs=epochs, steps=steps)
        callbacks = [best_task_checkpoint(run_dir / "task.keras", config, run_dir / "log.csv")]

        def train(config=config, run_dir=run_dir, callbacks=callbacks):
            return fit(config, {"train": splits["train"], "val": splits["val"]}, run_dir,
                       callbacks=callbacks, verbose=verbose).initial_epoch

        records[run] = {**run_once(run_dir, train, ("final.keras", "task.keras")),
                        "epochs": config.epochs, "steps_per_epoch": config.steps_per_epoch,
                        "batch_size": config.sampler.batch_size}
    return records


# --- Features -----------------------------------------------------------------------------------


def core_features(run_dir: pathlib.Path, splits: dict, resize_size: int) -> dict:
    """{train, test}: the core node's feature maps of the run's best checkpoint (what the hash
    projection reads), cached in `core.npz`."""
    import keras

    from tfmir.training import embed_examples

    path = checkpoint(run_dir)

    def compute(examples):
        model = keras.saving.load_model(path, compile=False)
        core = keras.Model(model.inputs, model.get_layer("hash").input)
        core.image_size = int(model.inputs[0].shape[1])
        return embed_examples(core, examples, resize_size=resize_size)

    return cached_outputs(run_dir / "core.npz", file_fingerprint(path),
                          {split: splits[split] for split in ("train", "test")}, compute)


def hash_codes(core: np.ndarray, num_bits: int) -> np.ndarray:
    """±1 codes of `num_bits` from core feature maps (the deployable model's fixed projection,
    seed 0)."""
    from tfmir.layers import HashProjection

    values = np.asarray(HashProjection(num_bits, seed=0)(core.astype(np.float32)))
    return np.where(values > 0, 1, -1).astype(np.int8)


def branch_features(run_dir: pathlib.Path, splits: dict, resize_size: int):
    """({train, test} R-MAC-branch feature maps, the class layer's (512, C) weights) of the
    run's task checkpoint, cached in `branch.npz`."""
    import keras

    from tfmir.training import embed_examples

    path = run_dir / "task.keras"
    task = keras.saving.load_model(path, compile=False)
    ynet = task.ynet
    weights = np.asarray(ynet.get_layer("classifier").kernel)

    def compute(examples):
        features = keras.Model(ynet.inputs, ynet.get_layer("rmac_bn").output)
        features.image_size = ynet.image_size
        return embed_examples(features, examples, resize_size=resize_size)

    outputs = cached_outputs(run_dir / "branch.npz", file_fingerprint(path),
                             {split: splits[split] for split in ("train", "test")}, compute)
    return outputs, weights


def pooled(name: str, maps: np.ndarray, class_weights: np.ndarray) -> np.ndarray:
    """(N, C) unit descriptors of feature maps (N, H, W, C) by one of POOLINGS; CAM weights the
    maps with every class of the Y-Net's class layer (`class_weights`, (C, num_classes))."""
    from tfmir.layers import CAMPooling, CroW, GeM, RMAC, SPoC

    maps = maps.astype(np.float32)
    if name == "cam":
        layer = CAMPooling(num_classes=class_weights.shape[1])
        layer.build(maps.shape)
        layer.class_weights.assign(class_weights)
    else:
        layer = {"rmac": RMAC, "spoc": SPoC, "gem": GeM, "crow": CroW}[name]()
    return np.asarray(layer(maps), dtype=np.float32)


# --- Scores -------------------------------------------------------------------------------------


def neighbors_hamming(train_codes, test_codes, k: int) -> np.ndarray:
    from tfmir.index import HammingIndex

    index = HammingIndex(dimension=train_codes.shape[1])
    index.build(train_codes, ids=np.arange(len(train_codes)))
    return index.search_arrays(test_codes, k)[1]


def neighbors_cosine(train_vectors, test_vectors, k: int) -> np.ndarray:
    from tfmir.index import ExactIndex

    index = ExactIndex(metric="cosine", dimension=train_vectors.shape[1])
    index.build(train_vectors, ids=np.arange(len(train_vectors)))
    return index.search_arrays(test_vectors, k)[1]


def per_query_ap(rows: np.ndarray, train_labels, test_labels) -> dict:
    """{k: per-query AP@k} for every k of TOP_K that the gallery allows."""
    from tfmir.metrics import average_precisions

    neighbor_labels = np.asarray(train_labels)[rows]
    return {k: average_precisions(test_labels, neighbor_labels, k) for k in TOP_K
            if k <= rows.shape[1]}


def summarize(aps: dict, *, num_resamples: int, seed: int) -> dict:
    from tfmir.metrics import bootstrap_mean

    summary = {}
    for k, values in aps.items():
        interval = bootstrap_mean(values, num_resamples=num_resamples, seed=seed)
        summary[f"map@{k}"] = {"value": interval["mean"], "low": interval["low"],
                               "high": interval["high"]}
    return summary


# --- Main ---------------------------------------------------------------------------------------


def evaluate_fold(fold_dir, splits, runs, *, resize_size) -> dict:
    """Per-query APs of every row, Dice/IoU per run, timing: raw material for the tables."""
    import keras

    from tfmir.models import has_mask
    from tfmir.training.evaluators import make_evaluator

    train, test = splits["train"], splits["test"]
    max_k = min(max(TOP_K), len(train))
    rows, dice, timing, figure_neighbors = {}, {}, {}, {}
    for run in runs:
        run_dir = fold_dir / run
        core = core_features(run_dir, splits, resize_size)
        lengths = CODE_LENGTHS if run == "ynet" else (64,)
        for bits in lengths:
            codes = {split: hash_codes(core[split], bits) for split in ("train", "test")}
            neighbors = neighbors_hamming(codes["train"], codes["test"], max_k)
            rows[f"{run}@{bits}"] = per_query_ap(neighbors, train.labels, test.labels)
            if bits == 64:
                figure_neighbors[run] = neighbors[:, :5]
        model = keras.saving.load_model(checkpoint(run_dir), compile=False)
        if has_mask(model):
            dice[run] = make_evaluator("segmentation").evaluate(model, test,
                                                                resize_size=resize_size)
        if run == "ynet":
            maps, class_weights = branch_features(run_dir, splits, resize_size)
            for name in POOLINGS:
                vectors = {split: pooled(name, maps[split], class_weights)
                           for split in ("train", "test")}
                neighbors = neighbors_cosine(vectors["train"], vectors["test"], max_k)
                rows[f"pool_{name}"] = per_query_ap(neighbors, train.labels, test.labels)
            timing = cached_timing(run_dir, lambda: rq4_timing(model, train, test, resize_size))
    return {"rows": rows, "dice": dice, "timing": timing, "neighbors": figure_neighbors}


def cached_timing(run_dir: pathlib.Path, measure) -> dict:
    """RQ4 timing of a run's checkpoint, measured once (`rq4.json`): a rerun reports the same."""
    import json

    path = run_dir / "rq4.json"
    fingerprint = file_fingerprint(checkpoint(run_dir))
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") == fingerprint:
            return stored["timing"]
    timing = measure()
    path.write_text(json.dumps({"fingerprint": fingerprint, "timing": timing}, indent=2) + "\n")
    return timing


def rq4_timing(model, train, test, resize_size) -> dict:
    """Codes per second over the training split, index build and query latency (RQ4)."""
    from tfmir.index import HammingIndex
    from tfmir.training import embed_examples

    start = time.perf_counter()
    outputs = embed_examples(model, train, resize_size=resize_size)
    seconds = time.perf_counter() - start
    codes = np.where(outputs > 0, 1, -1).astype(np.int8)
    test_codes = np.where(embed_examples(model, test, resize_size=resize_size) > 0, 1, -1)
    start = time.perf_counter()
    index = HammingIndex(dimension=codes.shape[1])
    index.build(codes, ids=np.arange(len(codes)))
    build = time.perf_counter() - start
    start = time.perf_counter()
    index.search_arrays(test_codes, min(10, len(codes)))
    search = time.perf_counter() - start
    return {"codes_per_second": len(train) / seconds, "images": len(train),
            "index_build_ms": 1000 * build, "queries": len(test),
            "search_ms_all_queries": 1000 * search}


def merge_folds(evaluations: list) -> dict:
    """Per-query APs of every row over all folds (each image is a test query in one fold)."""
    rows = {}
    for evaluation in evaluations:
        for row, aps in evaluation["rows"].items():
            for k, values in aps.items():
                rows.setdefault(row, {}).setdefault(k, []).append(values)
    return {row: {k: np.concatenate(parts) for k, parts in aps.items()}
            for row, aps in rows.items()}


def row_titles(runs) -> dict:
    titles = {f"ynet@{bits}": f"Y-Net, {bits}-bit codes" for bits in CODE_LENGTHS}
    titles.update({f"{run}@64": f"{RUNS[run][0]}, 64-bit codes" for run in runs if run != "ynet"})
    titles.update({f"pool_{name}": f"{POOLING_TITLES[name]} over Y-Net's R-MAC-branch maps "
                   "(512-d float, cosine)" for name in POOLINGS})
    return titles


def paper_values(row: str) -> dict | None:
    """The paper's mAP at top-5/10/20/50 for a row, per data set, or None."""
    key = {"ynet@64": "ynet", "pool_rmac": "rmac", "pool_crow": "crow",
           "pool_cam": "cam"}.get(row, row.removesuffix("@64"))
    if key not in PAPER or key == "table1":
        return None
    return {dataset: dict(zip((f"map@{k}" for k in TOP_K), values))
            for dataset, values in PAPER[key].items()}


def _cell(metric: dict | None) -> str:
    if metric is None:
        return "–"
    return f"{metric['value']:.3f} [{metric['low']:.3f}, {metric['high']:.3f}]"


def tables_markdown(results: dict, runs) -> str:
    rows, gains = results["rows"], results["gains"]
    titles = row_titles(runs)
    header = "| method | " + " | ".join(f"mAP@{k}" for k in TOP_K) + " | paper (Fundus, top-10) |"
    rule = "|---" * (len(TOP_K) + 2) + "|"

    def line(row):
        paper = rows[row].get("paper")
        paper_cell = f"{paper['fundus']['map@10']:.4f}" if paper else "–"
        return (f"| {titles[row]} | " + " | ".join(_cell(rows[row]["metrics"].get(f"map@{k}"))
                                                   for k in TOP_K) + f" | {paper_cell} |")

    table1 = ["**Table I** (Y-Net's mAP@10 by code length; paper: Fundus / JSRT)", "",
              "| bits | ours mAP@10 | paper Fundus | paper JSRT |", "|---|---|---|---|"]
    for bits in CODE_LENGTHS:
        metric = rows.get(f"ynet@{bits}", {}).get("metrics", {}).get("map@10")
        table1.append(f"| {bits} | {_cell(metric)} | {PAPER['table1']['fundus'][bits]:.4f} | "
                      f"{PAPER['table1']['jsrt'][bits]:.4f} |")
    table2 = ["**Table II** (pooling baselines over the same trained features)", "", header, rule]
    table2 += [line(f"pool_{name}") for name in POOLINGS if f"pool_{name}" in rows]
    table2.append(line("ynet@64"))
    table3 = ["**Table III** (ablations and losses, 64-bit codes)", "", header, rule]
    table3 += [line(f"{run}@64") for run in ("no_branches", "no_fpn", "no_rmac", "cross_entropy",
                                             "sum", "learnable") if f"{run}@64" in rows]
    table3.append(line("ynet@64"))
    gain_lines = ["**Y-Net (64 bits) minus each row, mAP@10, paired bootstrap over the same "
                  "queries** (an interval containing 0: inside the noise)", "",
                  "| other row | difference [95 % interval] |", "|---|---|"]
    gain_lines += [f"| {titles[row]} | {gain['difference']:+.3f} [{gain['low']:+.3f}, "
                   f"{gain['high']:+.3f}] |" for row, gain in gains.items()]
    segmentation = ["**FPN masks on the test images** (Dice / IoU at the model's input crop)", "",
                    "| run | Dice | IoU |", "|---|---|---|"]
    segmentation += [f"| {RUNS[run][0]} | {scores['dice']:.3f} | {scores['iou']:.3f} |"
                     for run, scores in results["segmentation"].items()]
    timing = results["timing"]
    rq4 = ["**RQ4 timing** (this machine; the paper: 585 codes in 4 s on a GPU, index in 1 s, "
           "65 queries top-10 in 34 ms)", "",
           f"- codes: {timing['codes_per_second']:.1f} images/s over {timing['images']} training "
           "images (decoding and resizing included)",
           f"- Hamming index build: {timing['index_build_ms']:.2f} ms",
           f"- {timing['queries']} test queries, top-10: {timing['search_ms_all_queries']:.2f} ms"]
    return "\n".join(table1 + [""] + table2 + [""] + table3 + [""] + gain_lines + [""] +
                     segmentation + [""] + rq4)


def thumbnails(examples, indices, size: int = 96) -> np.ndarray:
    from PIL import Image

    images = []
    for index in indices:
        with Image.open(examples.paths[index]) as image:
            images.append(np.asarray(image.convert("RGB").resize((size, size))))
    return np.stack(images)


def write_figure(workdir: pathlib.Path, splits: dict, neighbors: dict) -> None:
    from tfmir.visualization import save_retrieval_comparison

    train, test = splits["train"], splits["test"]
    # The first test image of each class, then the next ones, up to FIGURE_QUERIES.
    firsts = [int(np.flatnonzero(test.labels == label)[0]) for label in np.unique(test.labels)]
    queries = (firsts + [q for q in range(len(test)) if q not in firsts])[:FIGURE_QUERIES]
    results = {}
    for run, rows in neighbors.items():
        top = rows[queries, :5]
        results[RUNS[run][0]] = (np.stack([thumbnails(train, row) for row in top]),
                                 train.labels[top])
    save_retrieval_comparison(workdir / FIGURE, thumbnails(test, queries), test.labels[queries],
                              results, class_names=list(test.class_names), tile_size=96,
                              query_titles=[f"test query {q + 1}" for q in queries])


def main(argv) -> None:
    del argv
    from tfmir.configs import get_config
    from tfmir.files import write_atomic, write_json
    from tfmir.metrics import paired_bootstrap

    start = time.time()
    smoke, setting, seed, epochs, steps, num_resamples = run_settings(SMOKE)
    unknown = sorted(set(_RUNS.value) - set(RUNS))
    if unknown:
        raise app.UsageError(f"--runs must name some of {list(RUNS)}. Received: {unknown}")
    runs = ["ynet"] + [run for run in RUNS if run in _RUNS.value and run != "ynet"]
    if _FOLDS.value == 1 or _FOLDS.value < 0:
        raise app.UsageError(f"--folds must be 0 (one split) or at least 2. "
                             f"Received: {_FOLDS.value}")
    path = os.path.join(_DATA_ROOT.value, DATA_FILE)
    if not os.path.exists(path):
        raise app.UsageError(f"data not found: {path}. Point --data_root at the folder holding "
                             "ph2/.")
    workdir = pathlib.Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomic(workdir / "flags.txt", flags.FLAGS.flags_into_string())

    config = get_config(f"ynet:{setting}")
    resize_size = config.data.resize_size
    examples = load_ph2(path)
    if smoke:
        examples = cap_per_class(examples, SMOKE["per_class"], np.random.default_rng(seed))
    folds = fold_splits(examples, _FOLDS.value, seed)
    verbose = 0 if smoke else 2
    evaluations, records, counts = [], {}, {}
    for index, splits in enumerate(folds):
        fold_dir = workdir / f"fold{index}"
        counts[f"fold{index}"] = describe(splits)
        print(f"fold {index}: " + " / ".join(str(len(splits[name])) for name in
                                             ("train", "val", "test")) + " (train / val / test)",
              flush=True)
        records[f"fold{index}"] = train_runs(fold_dir, splits, runs, setting=setting, seed=seed,
                                             epochs=epochs, steps=steps, verbose=verbose)
        print(f"Evaluating fold {index} ...", flush=True)
        evaluations.append(evaluate_fold(fold_dir, splits, runs, resize_size=resize_size))

    merged = merge_folds(evaluations)
    results_rows = {}
    for row, aps in merged.items():
        results_rows[row] = {"metrics": summarize(aps, num_resamples=num_resamples, seed=seed),
                             "paper": paper_values(row), "num_queries": int(len(aps[10]))
                             if 10 in aps else None}
    gains = {row: paired_bootstrap(merged[row][10], merged["ynet@64"][10],
                                   num_resamples=num_resamples, seed=seed)
             for row in merged if row != "ynet@64" and 10 in merged[row]}
    segmentation = {run: {key: float(np.mean([evaluation["dice"][run][key]
                                              for evaluation in evaluations]))
                          for key in ("dice", "iou")}
                    for run in runs if run in evaluations[0]["dice"]}
    results = {"rows": results_rows, "gains": gains, "segmentation": segmentation,
               "timing": evaluations[0]["timing"]}
    write_figure(workdir, folds[0], {run: evaluations[0]["neighbors"][run]
                                     for run in ("ynet", "no_branches") if run in runs})

    note = (f"Y-Net on PH2 with config `{setting}` ({config.task.model['image_size']} px, "
            f"{len(folds)} fold(s)){', SMOKE RUN (tiny subsets)' if smoke else ''}: test queries "
            "searched against the training split, mAP@k with R = relevant items in the top k, "
            "95 % bootstrap intervals over the test queries. Paper columns are Fundus / JSRT "
            "(other data), context only.")
    tables = tables_markdown(results, runs)
    write_atomic(workdir / "table.md", f"{note}\n\n{tables}\n")
    write_json(workdir / "results.json", {
        **results,
        "paper": {key: {dataset: ({str(bits): value for bits, value in values.items()}
                                  if isinstance(values, dict) else list(values))
                        for dataset, values in by_dataset.items()}
                  for key, by_dataset in PAPER.items()},
        "runs": records,
        "data": {"path": path, "counts": counts,
                 "smoke_per_class": SMOKE["per_class"] if smoke else None},
        "settings": {"config": setting, "model": config.task.model, "resize_size": resize_size,
                     "seed": seed, "smoke": smoke, "folds": _FOLDS.value,
                     "num_resamples": num_resamples},
        "flags": {name: flags.FLAGS[name].value for name in
                  ("config", "smoke", "workdir", "data_root", "folds", "runs", "epochs",
                   "steps_per_epoch", "seed", "num_resamples")},
        "total_seconds": round(time.time() - start, 1),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
    })
    print(f"\n{note}\n\n{tables}\n\nWrote {workdir}/table.md, results.json and {FIGURE} in "
          f"{time.time() - start:.0f} s.", flush=True)


if __name__ == "__main__":
    app.run(main)
