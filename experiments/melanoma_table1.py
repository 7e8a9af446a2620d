"""Paper 003, Table 1: top-5 success rate of nine similarity measures for melanoma image search.

    python experiments/melanoma_table1.py --config=cpu --workdir=runs/melanoma_table1
    python experiments/melanoma_table1.py --smoke --workdir=/tmp/melanoma_smoke   # ~2 minutes

What it does, every step cached in --workdir (rerun the same command to resume):

1. Classification module on `ham10000_subset` (melanoma "mel" against the six other
   diagnoses; the `split` column's train / val / test): `NUM_MEMBERS` ensemble members
   (`melanoma_member:<config>`, seeds seed .. seed + N - 1) trained with the focal loss, then
   the ensemble head on the frozen members (`melanoma_ensemble:<config>`). Test ROC AUC of every
   member and of the ensemble, with bootstrap intervals over the test images.
2. Segmentation module: U-Net, RU-Net and R2U-Net (`segmenter:<config>`, focal Tversky loss)
   on PH2's lesion masks (a seeded 8:1:1 split), Dice on the PH2 test images; and the same
   three on DRIVE (`segmenter_drive:<config>`, trained on patches of the 20 training images, 2 of
   them for validation), scored on DRIVE's 20 official test images inside the field of view
   (F1 = Dice of the thresholded vessel map, accuracy, ROC AUC) beside the R2U-Net paper's own
   DRIVE figures.
3. The RIS database: the HAM10000 train + val images (5,984) through the ensemble (1024-d vector
   and 7 Gram matrices, packed as upper triangles) and the PH2-trained R2U-Net (masks on a
   64 x 64 grid); queries are `--num_queries` seeded random test images (the paper: 50).
4. Table 1: for each of the nine measures the top-5 success rate: the share of the 5 results
   whose diagnosis (the 7 HAM10000 classes) equals the query's. The paper judged similarity by
   eye (colour, spread, texture, ...); label agreement stands in for that judgement here, so the
   two columns measure related but different things. Paired bootstrap differences answer the
   paper's claims: does style beat Euclidean and cosine, do the Dice-based I1 scores lose?
   Scores are exact (the paper's normalisation by the database maximum, per query); every query's
   scores are computed with matrix products and checked against `tfmir.similarity` on the first
   queries.
5. Database memory and latency (`tfmir.index.StyleDatabase`): a 10,000-image database (all
   7,496 HAM10000 images plus horizontally flipped copies of the first 2,504), exact against
   fast mode: bytes per image, median query latency, and fast mode's top-5 agreement with exact.
6. `fig_top5.png`: the top 5 of every measure for a few queries (HAM10000 is CC BY-NC 4.0: the
   figure stays in --workdir, it is not committed).

Writes table.md, results.json, flags.txt and fig_top5.png into --workdir.

Measured with --config=cpu on 2 AVX2 cores (AMD EPYC), shared with other jobs: 76 minutes (3
members 329-399 s, ensemble head 243 s, PH2 segmenters 90-220 s, DRIVE segmenters 150-342 s,
then embedding, scoring, the benchmark). 500 test queries against 5,984 train + val images:

| measure | ours % [95 %] | paper % |     | measure | ours % [95 %] | paper % |
|---|---|---|---|---|---|---|
| euclidean | 60.8 [57.5, 64.0] | 40.8 | | I1_ED | 58.3 [54.9, 61.7] | 18.0 |
| cosine | 61.5 [58.2, 64.8] | 34.0 | | I1_CD | 58.0 [54.6, 61.4] | 10.0 |
| style | 60.4 [57.0, 63.6] | 61.2 | | I1_ECD | 59.2 [55.7, 62.5] | 18.4 |
| I1_SE | 61.7 [58.4, 64.9] | 44.4 | | I1_SD | 58.9 [55.6, 62.3] | 6.0 |
| I1_SC | 61.6 [58.3, 64.9] | 46.4 | | chance (5 random images) | 45.8 [43.0, 48.5] | — |

Paired differences: style - euclidean -0.4 [-2.2, 1.4], style - cosine -1.2 [-3.0, 0.6];
I1_ED - euclidean -2.4 [-4.6, -0.4], I1_CD - euclidean -2.7 [-5.0, -0.6], I1_ECD -1.6
[-3.7, 0.4], I1_SD -1.8 [-4.0, 0.3]; I1_SE and I1_SC +0.9 [-0.7, 2.4]. Test ROC AUC (171 of
1,512 melanomas): members 0.841, 0.824, 0.843, ensemble 0.837 [0.805, 0.866]. PH2 test Dice
U-Net 0.840, RU-Net 0.816, R2U-Net 0.840 (20 images, intervals about +-0.06). DRIVE test F1 /
accuracy / AUC: U-Net 0.488 / 0.767 / 0.906, RU-Net 0.544 / 0.810 / 0.923, R2U-Net 0.403 /
0.728 / 0.790 (Alom et al.: 0.814-0.817 / 0.953-0.956 / 0.976-0.978). Style database of 10,000
images: 167,060 bytes per image (161,424 of them float16 Gram triangles); median query 3.3-3.6 s
exact, 0.14-0.22 s fast for the style measures with identical top 5 in all 90 query-measure
pairs, 35-128 ms in both modes for the others.

Why ours differ from the paper's:
- Success here is label agreement, a proxy the paper did not use: the paper's judge weighed
  colour, spread and texture, which the Gram matrices encode and a diagnosis does not require,
  while the feature vector is trained on exactly the label that success counts. Every measure
  sits 12-16 points above chance, and none is far ahead: with labels as the judge, style
  gains nothing over the vector (the paper's +20 points are not reproduced) and the Dice terms
  cost 2-3 points (not the paper's 20-35).
- The data: HAM10000 at 128 px (dermoscopy from two sites, two thirds nevi), not the paper's
  ISIC 2017-2020 mix at 384 px; masks come from a segmenter trained on PH2's 160 images and
  are compared on a 64 x 64 grid.
- The model: 3 EfficientNet-Lite0 members at 112 px with frozen batch norm, 240 steps each,
  not 5 EfficientNet-B6 at 384 px; members that differ only by seed gain nothing from
  ensembling here (0.837 against 0.824-0.843). Style layer weights are all 1 (the paper gives
  none), so the largest Gram matrices (block7, 320 channels) dominate the style loss.
- DRIVE: 200 steps of 16 patches of 64 px (a few minutes on a CPU) against Alom et al.'s
  190,000 patches per epoch; the numbers show the pipeline works, not the architecture's ceiling.

Reference:
    Mehta, "Exploring Content Based Image Retrieval for Highly Imbalanced Melanoma Data using
    Style Transfer, Semantic Image Segmentation and Ensemble Learning", 2021,
    https://arxiv.org/abs/2110.06331, Table 1; Alom et al.,
    "Recurrent Residual Convolutional Neural Network based on U-Net (R2U-Net) for Medical Image
    Segmentation", 2018, https://arxiv.org/abs/1802.06955 (DRIVE results).
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import numpy as np
from absl import app, flags

from run_cache import (DEFAULT_DATA_ROOT, cached_outputs, cap_per_class, checkpoint, describe,
                       file_fingerprint, run_once, run_settings)

SETTINGS = ("tiny", "cpu", "paper")
HAM_FILE = "ham10000_subset/labels.csv"
HAM_COLUMNS = {"path": "image", "label": "dx", "source": None, "split": "split"}
PH2_FILE = "ph2/labels.csv"
PH2_COLUMNS = {"path": "image", "label": "diagnosis_name", "mask": "mask", "source": None}
DRIVE_FILE = "drive/index.csv"
VARIANTS = ("unet", "runet", "r2unet")
VARIANT_TITLES = {"unet": "U-Net", "runet": "RU-Net", "r2unet": "R2U-Net"}
TOP_K = 5
MASK_SIZE = 64
DATABASE_SIZE = 10_000
BENCHMARK_QUERIES = 10
SMOKE = {"epochs": 2, "steps_per_epoch": 2, "num_resamples": 1000, "per_class": 6,
         "num_queries": 12, "database_size": 200, "benchmark_queries": 3, "variants": ["r2unet"]}
FIGURE = "fig_top5.png"
FIGURE_QUERIES = 3
# Alom et al. 2018, DRIVE table: F1-score, accuracy, AUC (their U-Net, RU-Net and R2U-Net).
R2UNET_PAPER_DRIVE = {"unet": (0.8142, 0.9531, 0.9755), "runet": (0.8155, 0.9556, 0.9782),
                      "r2unet": (0.8171, 0.9556, 0.9784)}

flags.DEFINE_enum("config", "cpu", list(SETTINGS),
                  "Config setting of every training: tiny (tests), cpu (2 cores), paper.")
flags.DEFINE_bool("smoke", False, "Tiny config (unless --config is given), a few images per "
                  "class, 2 epochs of 2 steps: checks the pipeline end to end.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder; rerun with it to resume.",
                               required=True)
_DATA_ROOT = flags.DEFINE_string("data_root", str(DEFAULT_DATA_ROOT),
                                 "Folder holding ham10000_subset/, ph2/ and drive/.")
flags.DEFINE_integer("epochs", None, "Epochs of every training (default: the configs').")
flags.DEFINE_integer("steps_per_epoch", None, "Batches per epoch (default: the configs').")
flags.DEFINE_integer("seed", 0, "Seed of splits, training, queries and the bootstrap.")
flags.DEFINE_integer("num_resamples", 10_000, "Bootstrap resamples (1000 with --smoke).")
_NUM_QUERIES = flags.DEFINE_integer("num_queries", 500, "Random test images used as queries "
                                    "(the paper: 50).", lower_bound=1)
_MEMBERS = flags.DEFINE_integer("members", None, "Ensemble members (default: the config's "
                                "NUM_MEMBERS: tiny 2, cpu 3, paper 5).", lower_bound=1)
_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Segmenters among {list(VARIANTS)} "
                              "(r2unet, whose PH2 masks fill the database, is always trained; "
                              "--smoke: r2unet only).")
_DRIVE = flags.DEFINE_bool("drive", True, "Train and score the segmenters on DRIVE too.")
_BENCHMARK = flags.DEFINE_bool("benchmark", True, "Measure the 10,000-image database's memory "
                               "and latency, exact vs fast.")


# --- Data ---------------------------------------------------------------------------------------


def load_ham(path: str, smoke: bool, seed: int) -> dict:
    from tfmir.data import load_csv_manifest, split_by_column

    splits = split_by_column(load_csv_manifest(path, columns=HAM_COLUMNS, source="ham10000",
                                               strict=True))
    if smoke:
        rng = np.random.default_rng(seed)
        splits = {name: cap_per_class(examples, SMOKE["per_class"], rng)
                  for name, examples in splits.items()}
    return splits


def load_ph2(path: str, smoke: bool, seed: int) -> dict:
    from tfmir.data import load_csv_manifest, split_examples

    examples = load_csv_manifest(path, columns=PH2_COLUMNS, source="ph2", strict=True)
    if smoke:
        examples = cap_per_class(examples, SMOKE["per_class"], np.random.default_rng(seed))
    return split_examples(examples, (8, 1, 1), seed=seed, names=("train", "val", "test"))


def load_drive(path: str, smoke: bool) -> dict:
    """DRIVE's official split as Examples on disk (label "retina"; masks = vessel maps), the
    last 2 training images held out for validation; plus the test images' FOV masks."""
    import csv

    from tfmir.data import Examples

    folder = os.path.dirname(path)
    with open(path, newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    parts = {}
    for split in ("training", "test"):
        chosen = [row for row in rows if row["split"] == split]
        if smoke:
            chosen = chosen[:6]
        parts[split] = (Examples(
            labels=np.zeros(len(chosen), np.int64), sources="drive",
            ids=[f"drive/{split}/{row['image_id']}" for row in chosen], class_names=("retina",),
            paths=[os.path.join(folder, row["image"]) for row in chosen],
            mask_paths=[os.path.join(folder, row["vessel_mask"]) for row in chosen]),
            [os.path.join(folder, row["fov_mask"]) for row in chosen])
    training, _ = parts["training"]
    count = len(training)
    return {"train": training.subset(np.arange(count - 2)),
            "val": training.subset(np.arange(count - 2, count)),
            "test": parts["test"][0], "test_fov": parts["test"][1]}


# --- Training -----------------------------------------------------------------------------------


def scheduled(config, seed: int, epochs, steps):
    from tfmir.configs import override

    values = {"seed": seed}
    if epochs is not None:
        values["epochs"] = epochs
    if steps is not None:
        values["steps_per_epoch"] = steps
    return override(config, values)


def train(run_dir: pathlib.Path, config, splits: dict, verbose: int) -> dict:
    from tfmir.training import fit

    def train_function():
        return fit(config, {"train": splits["train"], "val": splits["val"]}, run_dir,
                   verbose=verbose).initial_epoch

    return {**run_once(run_dir, train_function), "epochs": config.epochs,
            "steps_per_epoch": config.steps_per_epoch, "batch_size": config.sampler.batch_size}


def train_classifiers(workdir, ham, *, setting, num_members, seed, epochs, steps, verbose):
    from tfmir.configs import get_config, override

    records, members = {}, []
    for index in range(num_members):
        run_dir = workdir / f"member{index}"
        config = scheduled(get_config(f"melanoma_member:{setting}"), seed + index, epochs, steps)
        records[f"member{index}"] = train(run_dir, config, ham, verbose)
        members.append(str(checkpoint(run_dir)))
    config = override(get_config(f"melanoma_ensemble:{setting}"),
                      {"task.model.members": members})
    config = scheduled(config, seed, epochs, steps)
    records["ensemble"] = train(workdir / "ensemble", config, ham, verbose)
    return records


def train_segmenters(workdir, name, splits, variants, *, setting, seed, epochs, steps, verbose):
    from tfmir.configs import get_config, override

    records = {}
    for variant in variants:
        config = override(get_config(f"{name}:{setting}"), {"task.model.variant": variant})
        config = scheduled(config, seed, epochs, steps)
        records[variant] = train(workdir / f"{name}_{variant}", config, splits, verbose)
    return records


# --- Evaluation ---------------------------------------------------------------------------------


def probabilities(model_path: pathlib.Path, examples, resize_size: int) -> np.ndarray:
    import keras

    from tfmir.models import PROBABILITY
    from tfmir.training.evaluation import embed_examples

    model = keras.saving.load_model(model_path, compile=False)
    return embed_examples(model, examples, resize_size=resize_size,
                          output=PROBABILITY).reshape(-1)


def auc_with_interval(labels, scores, num_resamples, seed) -> dict:
    from tfmir.metrics import bootstrap_statistic, roc_auc

    def statistic(labels, scores):
        if labels.all() or not labels.any():
            return float("nan")
        return roc_auc(labels, scores)

    return bootstrap_statistic(statistic, labels, scores, num_resamples=num_resamples, seed=seed)


def classification_aucs(workdir, ham, num_members, resize_size, num_resamples, seed) -> dict:
    from tfmir.metrics import positive_class_index

    test = ham["test"]
    labels = test.labels == positive_class_index(test.class_names, "mel")
    runs = [f"member{index}" for index in range(num_members)] + ["ensemble"]
    scores = {}
    for run in runs:
        path = checkpoint(workdir / run)
        scores[run] = cached_outputs(workdir / run / "test_probabilities.npz",
                                     file_fingerprint(path), {"test": test},
                                     lambda examples, path=path: probabilities(
                                         path, examples, resize_size))["test"]
    result = {run: auc_with_interval(labels, scores[run], num_resamples, seed) for run in runs}
    return {"auc": result, "num_positive": int(labels.sum()), "num_test": int(labels.size)}


def segmentation_dice(run_dir, examples, resize_size) -> np.ndarray:
    """Per-image Dice of the thresholded masks on the evaluation crop."""
    import keras

    from tfmir.data import make_dataset
    from tfmir.similarity import dice_coefficient

    model = keras.saving.load_model(checkpoint(run_dir), compile=False)
    image_size = int(model.inputs[0].shape[1])
    dataset = make_dataset(examples, training=False, batch_size=16, image_size=image_size,
                           resize_size=resize_size, fields=("image", "mask"))
    values = []
    for features, targets in dataset:
        predicted = np.asarray(model(features["image"], training=False))
        for prediction, truth in zip(predicted, np.asarray(targets["mask"])):
            values.append(float(dice_coefficient(truth[..., 0], prediction[None, ..., 0])[0]))
    return np.asarray(values)


def read_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def read_binary(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("L")) > 127


def drive_scores(run_dir, drive, resize_size: int) -> dict:
    """F1, accuracy and AUC inside the field of view of DRIVE's test images: each image resized
    as in training (square `resize_size`), predicted with overlapping patches, the probabilities
    resized back to the image's own size."""
    import keras
    import tensorflow as tf

    from tfmir.metrics import roc_auc
    from tfmir.models.tiling import segment_tiled

    model = keras.saving.load_model(checkpoint(run_dir), compile=False)
    patch = int(model.inputs[0].shape[1])
    truths, predictions = [], []
    for image_path, vessel_path, fov_path in zip(drive["test"].paths, drive["test"].mask_paths,
                                                  drive["test_fov"]):
        image = read_rgb(image_path)
        height, width = image.shape[:2]
        resized = tf.image.resize(image.astype("float32"), (resize_size, resize_size),
                                  antialias=True).numpy()
        probability = segment_tiled(model, resized, patch, stride=patch // 2)
        probability = tf.image.resize(probability, (height, width)).numpy()[..., 0]
        inside = read_binary(fov_path)
        truths.append(read_binary(vessel_path)[inside])
        predictions.append(probability[inside])
    truth, probability = np.concatenate(truths), np.concatenate(predictions)
    predicted = probability > 0.5
    overlap = np.sum(truth & predicted)
    return {"f1": float(2 * overlap / max(truth.sum() + predicted.sum(), 1)),
            "accuracy": float(np.mean(truth == predicted)),
            "auc": roc_auc(truth, probability), "num_pixels": int(truth.size)}


# --- The RIS database ---------------------------------------------------------------------------


def ris_outputs(ensemble_path, segmenter_path, examples, resize_size, segmenter_resize,
                flip: bool = False) -> dict:
    """{"vectors" (N, D) float32, "packed" (N, P) float16 upper-triangle Grams, "masks"
    (N, MASK_SIZE * MASK_SIZE) bool} of every item (mirrored left-right with `flip`)."""
    import keras
    import tensorflow as tf

    from tfmir.data import make_dataset
    from tfmir.models import EMBEDDING, gram_outputs
    from tfmir.similarity import pack_grams

    ensemble = keras.saving.load_model(ensemble_path, compile=False)
    segmenter = keras.saving.load_model(segmenter_path, compile=False)
    grams = gram_outputs(ensemble)
    size = int(ensemble.inputs[0].shape[1])
    mask_side = int(segmenter.inputs[0].shape[1])

    @tf.function
    def describe(images):
        if flip:
            images = tf.reverse(images, axis=[2])
        outputs = ensemble(images, training=False)
        return outputs[EMBEDDING], [outputs[name] for name in grams]

    @tf.function
    def segment(images):
        if flip:
            images = tf.reverse(images, axis=[2])
        masks = segmenter(images, training=False)
        return tf.image.resize(masks, (MASK_SIZE, MASK_SIZE))

    vectors, packed, masks = [], [], []
    for batch in make_dataset(examples, training=False, batch_size=32, image_size=size,
                              resize_size=resize_size, fields=("image",)):
        vector, gram_list = describe(batch["image"])
        vectors.append(np.asarray(vector, np.float32))
        packed.append(pack_grams([np.asarray(gram) for gram in gram_list], dtype="float16"))
    for batch in make_dataset(examples, training=False, batch_size=32, image_size=mask_side,
                              resize_size=segmenter_resize, fields=("image",)):
        masks.append(np.asarray(segment(batch["image"]))[..., 0].reshape(
            -1, MASK_SIZE * MASK_SIZE) > 0.5)
    return {"vectors": np.concatenate(vectors), "packed": np.concatenate(packed),
            "masks": np.concatenate(masks)}


def cached_ris(cache: pathlib.Path, fingerprint: str, examples, compute) -> dict:
    if cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            if str(stored["fingerprint"]) == fingerprint and np.array_equal(stored["ids"],
                                                                           examples.ids):
                return {key: stored[key] for key in ("vectors", "packed", "masks")}
    outputs = compute(examples)
    temporary = cache.with_suffix(".tmp.npz")
    np.savez(temporary, fingerprint=fingerprint, ids=examples.ids, **outputs)
    os.replace(temporary, cache)
    return outputs


def component_matrices(query: dict, database: dict) -> dict:
    """Every component score, (Q, N), with the paper's per-query normalisation.

    ES = 1 - ED / max ED, CS_new = (CS + 1) / 2, SS = 1 - LS / max LS (style loss = squared L2
    distance of the packed Gram vectors, from |a|^2 + |b|^2 - 2 a.b in float64), Dice of the
    masks (both empty: 1, one empty: 0, as `tfmir.similarity.dice_coefficient`).
    """
    def squared_distances(a, b):
        a, b = a.astype(np.float64), b.astype(np.float64)
        values = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return np.maximum(values, 0.0)

    def normalised(distances):
        maximum = distances.max(axis=1, keepdims=True)
        return np.where(maximum > 0, 1.0 - distances / np.where(maximum > 0, maximum, 1.0), 1.0)

    euclidean = np.sqrt(squared_distances(query["vectors"], database["vectors"]))
    norms_q = np.linalg.norm(query["vectors"].astype(np.float64), axis=1)[:, None]
    norms_d = np.linalg.norm(database["vectors"].astype(np.float64), axis=1)[None, :]
    products = query["vectors"].astype(np.float64) @ database["vectors"].astype(np.float64).T
    cosine = np.divide(products, norms_q * norms_d, out=np.zeros_like(products),
                       where=(norms_q * norms_d) > 0)
    style = squared_distances(query["packed"], database["packed"])
    query_masks = query["masks"].astype(np.float64)
    database_masks = database["masks"].astype(np.float64)
    overlap = query_masks @ database_masks.T
    sizes = query_masks.sum(1)[:, None] + database_masks.sum(1)[None, :]
    dice = np.where(sizes > 0, 2.0 * overlap / np.where(sizes > 0, sizes, 1.0), 1.0)
    return {"euclidean": normalised(euclidean), "cosine": np.clip((cosine + 1.0) / 2.0, 0, 1),
            "style": normalised(style), "dice": dice}


def measure_matrix(measure: str, components: dict) -> np.ndarray:
    from tfmir.similarity import COMPONENTS, harmonic_mean

    parts = COMPONENTS[measure]
    return harmonic_mean(*(components[part] for part in parts), names=list(parts))


def top_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """The k best database rows of every query, ties to the lower row (a stable sort)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def check_against_similarity(query, database, components, count: int = 3) -> None:
    """The matrix path must agree with `tfmir.similarity.similarity_scores` (the product's
    reference) on the first queries; a disagreement stops the run."""
    from tfmir.similarity import MEASURES, similarity_scores

    for row in range(min(count, len(query["vectors"]))):
        one = {"vector": query["vectors"][row], "packed_grams": query["packed"][row],
               "mask": query["masks"][row].reshape(MASK_SIZE, MASK_SIZE)}
        many = {"vector": database["vectors"], "packed_grams": database["packed"],
                "mask": database["masks"].reshape(-1, MASK_SIZE, MASK_SIZE)}
        for measure in MEASURES:
            expected = similarity_scores(measure, one, many)
            actual = measure_matrix(measure, components)[row]
            np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5,
                                       err_msg=f"{measure}, query {row}")


def table1(query, database, query_labels, database_labels, *, num_resamples, seed):
    from tfmir.metrics import bootstrap_mean, paired_bootstrap
    from tfmir.similarity import MEASURES, PAPER_TABLE1

    components = component_matrices(query, database)
    check_against_similarity(query, database, components)
    successes, rows = {}, {}
    for measure in MEASURES:
        top = top_rows(measure_matrix(measure, components), TOP_K)
        rows[measure] = top
        successes[measure] = np.mean(database_labels[top] == query_labels[:, None], axis=1)
    table = {measure: {**bootstrap_mean(100 * successes[measure], num_resamples=num_resamples,
                                        seed=seed),
                       "paper": PAPER_TABLE1[measure]}
             for measure in MEASURES}
    # What 5 random database images would score: a query's expected success is the share of
    # the database with its label (HAM10000 is 2/3 nevi, so this is far from 0).
    chance = np.array([np.mean(database_labels == label) for label in query_labels])
    table["chance"] = {**bootstrap_mean(100 * chance, num_resamples=num_resamples, seed=seed),
                       "paper": None}
    comparisons = {f"{second} - {first}": paired_bootstrap(
        100 * successes[first], 100 * successes[second], num_resamples=num_resamples, seed=seed)
        for first, second in [("euclidean", "style"), ("cosine", "style"),
                              ("cosine", "euclidean"), ("euclidean", "I1_SE"),
                              ("euclidean", "I1_SC"), ("euclidean", "I1_ED"),
                              ("euclidean", "I1_CD"), ("euclidean", "I1_ECD"),
                              ("euclidean", "I1_SD"), ("style", "I1_SD")]}
    return table, comparisons, rows


def benchmark_database(workdir, ensemble_path, segmenter_path, ham, query, *, resize_size,
                       segmenter_resize, size, num_queries) -> dict:
    """Memory and latency of a `size`-image `tfmir.index.StyleDatabase`, exact vs fast mode.

    The database holds every HAM10000 image (train, val and test) plus horizontally flipped
    copies of the first ones up to `size`; the first `num_queries` queries are searched with
    every measure in both modes. Agreement: the share of fast mode's top 5 that exact mode
    also returns.
    """
    import keras

    from tfmir.data import concatenate
    from tfmir.index import StyleDatabase
    from tfmir.models import gram_outputs
    from tfmir.similarity import MEASURES

    fingerprint = file_fingerprint(ensemble_path) + file_fingerprint(segmenter_path)
    everything = concatenate([ham["train"], ham["val"], ham["test"]], separate_classes=False)
    parts = [cached_ris(workdir / "database_all.npz", fingerprint, everything,
                        lambda examples: ris_outputs(ensemble_path, segmenter_path, examples,
                                                     resize_size, segmenter_resize))]
    extra = min(size - len(everything), len(everything))
    if extra > 0:
        flipped = everything.subset(np.arange(extra))
        parts.append(cached_ris(workdir / "database_flipped.npz", fingerprint, flipped,
                                lambda examples: ris_outputs(ensemble_path, segmenter_path,
                                                             examples, resize_size,
                                                             segmenter_resize, flip=True)))
    arrays = {key: np.concatenate([part[key] for part in parts])[:size]
              for key in ("vectors", "packed", "masks")}
    count = len(arrays["vectors"])
    ensemble = keras.saving.load_model(ensemble_path, compile=False)
    channels = [int(ensemble.output[name].shape[-1]) for name in gram_outputs(ensemble)]
    database = StyleDatabase(channels=channels, mask_size=MASK_SIZE,
                             model_fingerprint=file_fingerprint(ensemble_path),
                             segmenter_fingerprint=file_fingerprint(segmenter_path))
    started = time.perf_counter()
    database.build(arrays["vectors"], packed_grams=arrays["packed"],
                   masks=arrays["masks"].reshape(count, MASK_SIZE, MASK_SIZE),
                   ids=np.arange(count))
    build_seconds = time.perf_counter() - started
    del arrays
    measures = {}
    for measure in MEASURES:
        times = {"exact": [], "fast": []}
        agreement = []
        for row in range(min(num_queries, len(query["vectors"]))):
            fields = {"vector": query["vectors"][row], "packed_grams": query["packed"][row],
                      "mask": query["masks"][row].reshape(MASK_SIZE, MASK_SIZE)}
            found = {}
            for mode in ("exact", "fast"):
                started = time.perf_counter()
                found[mode] = {result["id"] for result in database.search(fields, TOP_K, measure,
                                                                          mode=mode)}
                times[mode].append(time.perf_counter() - started)
            agreement.append(len(found["exact"] & found["fast"]) / TOP_K)
        measures[measure] = {"exact_ms": 1000 * float(np.median(times["exact"])),
                             "fast_ms": 1000 * float(np.median(times["fast"])),
                             "top5_agreement": float(np.mean(agreement))}
    return {"size": count, "channels": channels, "bytes_per_image": database.bytes_per_image(),
            "build_seconds": round(build_seconds, 2), "num_queries": min(num_queries, count),
            "measures": measures}


# --- Output -------------------------------------------------------------------------------------


def _cell(metric: dict, key: str = "mean", digits: int = 1) -> str:
    return f"{metric[key]:.{digits}f} [{metric['low']:.{digits}f}, {metric['high']:.{digits}f}]"


def table_markdown(results: dict) -> str:
    from tfmir.similarity import MEASURES

    titles = {"euclidean": "Euclidean score", "cosine": "Cosine similarity",
              "style": "Style score"}
    lines = ["| similarity measure | top-5 success, ours (%) | paper (%) |", "|---|---|---|"]
    for measure in MEASURES:
        row = results["table1"][measure]
        lines.append(f"| {titles.get(measure, measure)} | {_cell(row)} | {row['paper']:.1f} |")
    if "chance" in results["table1"]:
        lines.append(f"| 5 random images (chance) | {_cell(results['table1']['chance'])} | — |")
    lines += ["", "| paired difference | points [95 % interval] |", "|---|---|"]
    for name, value in results["comparisons"].items():
        lines.append(f"| {name} | {_cell(value, 'difference')} |")
    lines += ["", "| classifier (test, mel vs rest) | ROC AUC [95 % interval] |", "|---|---|"]
    for run, value in results["classification"]["auc"].items():
        lines.append(f"| {run} | {value['value']:.3f} [{value['low']:.3f}, {value['high']:.3f}] |")
    lines += ["", "| segmenter | PH2 test Dice | DRIVE F1 / acc / AUC (ours) | "
              "DRIVE F1 / acc / AUC (Alom et al.) |", "|---|---|---|---|"]
    for variant in VARIANTS:
        dice = results["segmentation"]["ph2"].get(variant)
        drive = results["segmentation"].get("drive", {}).get(variant)
        ours = (f"{drive['f1']:.4f} / {drive['accuracy']:.4f} / {drive['auc']:.4f}"
                if drive else "not run")
        paper = " / ".join(f"{value:.4f}" for value in R2UNET_PAPER_DRIVE[variant])
        dice = _cell(dice, digits=3) if dice else "not run"
        lines.append(f"| {VARIANT_TITLES[variant]} | {dice} | {ours} | {paper} |")
    benchmark = results.get("benchmark")
    if benchmark:
        sizes = benchmark["bytes_per_image"]
        lines += ["", f"Style database of {benchmark['size']:,} images: {sizes['total']:,} bytes "
                  f"per image ({sizes['packed_grams']:,} of them packed Grams), built in "
                  f"{benchmark['build_seconds']} s; median of {benchmark['num_queries']} queries:",
                  "", "| measure | exact (ms) | fast (ms) | fast top-5 agreement with exact |",
                  "|---|---|---|---|"]
        for measure, value in benchmark["measures"].items():
            lines.append(f"| {measure} | {value['exact_ms']:.0f} | {value['fast_ms']:.0f} | "
                         f"{value['top5_agreement']:.2f} |")
    return "\n".join(lines)


def write_figure(workdir, database_examples, query_examples, rows) -> None:
    from tfmir.visualization import save_retrieval_comparison

    def thumbnails(examples, indices):
        import tensorflow as tf

        return np.stack([tf.image.resize(read_rgb(examples.paths[i]), (96, 96)).numpy()
                         .astype(np.uint8) for i in indices])

    queries = list(range(min(FIGURE_QUERIES, len(query_examples))))
    results = {measure: (np.stack([thumbnails(database_examples, top[q]) for q in queries]),
                         database_examples.labels[top[queries]])
               for measure, top in rows.items()}
    save_retrieval_comparison(workdir / FIGURE, thumbnails(query_examples, queries),
                              query_examples.labels[queries], results,
                              class_names=list(query_examples.class_names), tile_size=96,
                              query_titles=[f"test query {q + 1}" for q in queries])


def main(argv) -> None:
    del argv
    from tfmir.configs import get_config
    from tfmir.configs.melanoma import NUM_MEMBERS
    from tfmir.data import concatenate
    from tfmir.files import write_atomic, write_json
    from tfmir.metrics import bootstrap_mean

    start = time.time()
    smoke, setting, seed, epochs, steps, num_resamples = run_settings(SMOKE)
    paths = {name: os.path.join(_DATA_ROOT.value, file) for name, file in
             (("ham", HAM_FILE), ("ph2", PH2_FILE), ("drive", DRIVE_FILE))}
    for name, path in paths.items():
        if not os.path.exists(path) and (name != "drive" or _DRIVE.value):
            raise app.UsageError(f"data not found: {path}. Point --data_root at the folder "
                                 "holding ham10000_subset/, ph2/ and drive/.")
    workdir = pathlib.Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomic(workdir / "flags.txt", flags.FLAGS.flags_into_string())
    verbose = 0 if smoke else 2
    num_members = _MEMBERS.value or NUM_MEMBERS[setting]
    unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
    if unknown:
        raise app.UsageError(f"--variants must name some of {list(VARIANTS)}. Received: {unknown}")
    chosen = (SMOKE["variants"] if smoke and not flags.FLAGS["variants"].present
              else _VARIANTS.value)
    variants = [variant for variant in VARIANTS if variant in chosen or variant == "r2unet"]

    ham = load_ham(paths["ham"], smoke, seed)
    ph2 = load_ph2(paths["ph2"], smoke, seed)
    counts = {"ham10000": describe(ham), "ph2": describe(ph2)}
    print("HAM10000 " + " / ".join(f"{len(ham[name])}" for name in ("train", "val", "test"))
          + f", PH2 {len(ph2['train'])} / {len(ph2['val'])} / {len(ph2['test'])} "
          "(train / val / test)", flush=True)

    records = train_classifiers(workdir, ham, setting=setting, num_members=num_members,
                                seed=seed, epochs=epochs, steps=steps, verbose=verbose)
    records.update({f"ph2_{variant}": record for variant, record in train_segmenters(
        workdir, "segmenter", ph2, variants, setting=setting, seed=seed, epochs=epochs, steps=steps,
        verbose=verbose).items()})
    drive = None
    if _DRIVE.value:
        drive = load_drive(paths["drive"], smoke)
        records.update({f"drive_{variant}": record for variant, record in train_segmenters(
            workdir, "segmenter_drive", drive, variants, setting=setting, seed=seed, epochs=epochs,
            steps=steps, verbose=verbose).items()})

    print("Evaluating ...", flush=True)
    resize_size = get_config(f"melanoma_member:{setting}").data.resize_size
    segmenter_resize = get_config(f"segmenter:{setting}").data.resize_size
    classification = classification_aucs(workdir, ham, num_members, resize_size, num_resamples,
                                         seed)
    segmentation = {"ph2": {variant: bootstrap_mean(
        segmentation_dice(workdir / f"segmenter_{variant}", ph2["test"], segmenter_resize),
        num_resamples=num_resamples, seed=seed) for variant in variants}}
    if drive is not None:
        drive_resize = get_config(f"segmenter_drive:{setting}").data.resize_size
        segmentation["drive"] = {variant: drive_scores(workdir / f"segmenter_drive_{variant}",
                                                       drive, drive_resize)
                                 for variant in variants}

    ensemble_path = checkpoint(workdir / "ensemble")
    segmenter_path = checkpoint(workdir / "segmenter_r2unet")
    fingerprint = file_fingerprint(ensemble_path) + file_fingerprint(segmenter_path)
    database_examples = concatenate([ham["train"], ham["val"]], separate_classes=False)
    rng = np.random.default_rng(seed)
    num_queries = min(SMOKE["num_queries"] if smoke and not flags.FLAGS["num_queries"].present
                      else _NUM_QUERIES.value, len(ham["test"]))
    query_examples = ham["test"].subset(np.sort(rng.choice(len(ham["test"]), num_queries,
                                                           replace=False)))

    def compute(examples):
        return ris_outputs(ensemble_path, segmenter_path, examples, resize_size,
                           segmenter_resize)

    database = cached_ris(workdir / "database.npz", fingerprint, database_examples, compute)
    query = cached_ris(workdir / "queries.npz", fingerprint, query_examples, compute)
    table, comparisons, rows = table1(query, database, query_examples.labels,
                                      database_examples.labels, num_resamples=num_resamples,
                                      seed=seed)
    benchmark = None
    if _BENCHMARK.value:
        print("Benchmarking the style database ...", flush=True)
        benchmark = benchmark_database(
            workdir, ensemble_path, segmenter_path, ham, query, resize_size=resize_size,
            segmenter_resize=segmenter_resize,
            size=SMOKE["database_size"] if smoke else DATABASE_SIZE,
            num_queries=SMOKE["benchmark_queries"] if smoke else BENCHMARK_QUERIES)
    write_figure(workdir, database_examples, query_examples, rows)

    results = {"table1": table, "comparisons": comparisons, "classification": classification,
               "segmentation": segmentation, "benchmark": benchmark}
    note = (f"Paper 003 on HAM10000 / PH2 / DRIVE with config `{setting}`"
            f"{', SMOKE RUN (tiny subsets)' if smoke else ''}: {num_queries} random test "
            f"queries against the {len(database_examples)}-image train + val database; success = "
            "the result's diagnosis equals the query's (the paper judged by eye); 95 % bootstrap "
            "intervals over the queries.")
    write_atomic(workdir / "table.md", f"{note}\n\n{table_markdown(results)}\n")
    write_json(workdir / "results.json", {
        **results,
        "runs": records,
        "data": {"paths": paths, "counts": counts, "num_queries": num_queries,
                 "query_ids": query_examples.ids.tolist(),
                 "smoke_per_class": SMOKE["per_class"] if smoke else None},
        "settings": {"config": setting, "members": num_members, "variants": variants,
                     "resize_size": resize_size,
                     "mask_size": MASK_SIZE, "seed": seed, "smoke": smoke,
                     "num_resamples": num_resamples, "top_k": TOP_K},
        "total_seconds": round(time.time() - start, 1),
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
    })
    print((workdir / "table.md").read_text(), flush=True)


if __name__ == "__main__":
    app.run(main)
