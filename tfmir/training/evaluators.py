"""Evaluators: what a task measures on the validation split after every epoch.

A task declares a list of evaluators (instances, registry names or `{"name": ..., **kwargs}`
specs); one `Evaluation` callback runs them all on the task's deployable model and adds their
metrics to the epoch logs as `val_<key>`, so `ModelCheckpoint`, `CSVLogger` and `TensorBoard`
placed after it see them, and the task's monitor can name any of them. `check_monitor` validates
that monitor before training starts.

Each evaluator is a thin wrapper over the pure functions of `tfmir.metrics`; what it adds is
which model output it needs, which split is the gallery and which keys it logs. Retrieval
evaluators read the model's retrieval output (`tfmir.models.retrieval_output`): the embedding,
or a hashing model's "code", whose items they rank by Hamming distance; `SegmentationOverlap`
reads the "mask" output.

Example:

```python
evaluators = ["recall", {"name": "knn", "num_neighbors": (1, 5)}]
check_monitor("val_knn@5_accuracy", evaluators, splits["val"])
callback = Evaluation(evaluators, splits["val"], resize_size=256, train=splits["train"])
task.fit(dataset, epochs=10, callbacks=[callback, keras.callbacks.CSVLogger("log.csv")])
```
"""

from __future__ import annotations

import abc
import inspect
import numbers
from typing import Any, Mapping, Sequence

import keras
import numpy as np

from tfmir.data import Examples, make_dataset
from tfmir.index.exact import METRICS, ExactIndex, exact_search
from tfmir.metrics import (dice_score, find_smallest_class, iou_score, knn_classification,
                           map_at_k, positive_class_index, roc_auc)
from tfmir.models.outputs import MASK, PROBABILITY, output_names
from tfmir.training.evaluation import (_embed_function, embed_examples, evaluate_retrieval,
                                       ranking_vectors)

DEFAULT_BATCH_SIZE = 256


class OutputCache:
    """Model outputs of one evaluation round, computed once and shared by the evaluators.

    Keys are `(id(model), id(examples), resize_size)`: a cache lives for one round only (the
    model's weights change between epochs), while its model and splits are alive, so ids are
    unique within it.

    Example:

    ```python
    cache = OutputCache()
    RecallAtK().evaluate(model, val, resize_size=256, cache=cache)
    MeanAveragePrecision(k=10).evaluate(model, val, resize_size=256, cache=cache)  # no re-embedding
    ```
    """

    def __init__(self):
        self._outputs: dict[tuple, np.ndarray] = {}

    def embeddings(self, model, examples: Examples, *, resize_size: int,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
        """`embed_examples(model, examples, ...)`, computed on the first request only.

        Args:
            model: the deployable model: (B, S, S, 3) pixels in [0, 255] -> (B, D), or a dict
                whose retrieval output (`tfmir.models.retrieval_output`) is returned.
            examples: the split to embed.
            resize_size: resize side before the centre crop.
            batch_size: images per batch.

        Returns:
            float32 array (len(examples), D).
        """
        key = (id(model), id(examples), resize_size)
        if key not in self._outputs:
            self._outputs[key] = embed_examples(model, examples, resize_size=resize_size,
                                                batch_size=batch_size)
        return self._outputs[key]


class Evaluator(abc.ABC):
    """One measurement of a deployable model on an evaluation split.

    Subclasses implement `metric_names` (the keys `evaluate` returns, known before training so a
    monitor can be validated), `check` (fail before training when the split cannot be scored) and
    `evaluate`.
    """

    @abc.abstractmethod
    def metric_names(self, examples: Examples) -> list[str]:
        """The keys `evaluate` returns for this split, without the `val_` prefix.

        Args:
            examples: the evaluation split.

        Returns:
            The metric keys, in the order `evaluate` returns them.
        """

    def check(self, examples: Examples, train: Examples | None = None) -> None:
        """Raises ValueError when `examples` (with `train`) cannot be evaluated.

        Args:
            examples: the evaluation split.
            train: the training split, for evaluators whose gallery it is.
        """

    @abc.abstractmethod
    def evaluate(self, model, examples: Examples, *, resize_size: int,
                 train: Examples | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 cache: OutputCache | None = None) -> dict[str, float]:
        """Scores `model` on `examples`.

        Args:
            model: the deployable model, taking (B, S, S, 3) pixels in [0, 255] and giving
                embeddings, real-valued codes or mask probabilities (or a dict of them, see
                `tfmir.models.outputs`).
            examples: the evaluation split.
            resize_size: resize side before the centre crop.
            train: the training split (the gallery of kNN classification).
            batch_size: images per inference batch.
            cache: shares model outputs with the other evaluators of this round; a fresh one
                when None.

        Returns:
            `{key: value}` for every key of `metric_names(examples)`.
        """

    def __repr__(self) -> str:
        arguments = ", ".join(f"{name}={value!r}" for name, value in vars(self).items())
        return f"{type(self).__name__}({arguments})"


class RecallAtK(Evaluator):
    """Recall@K per source (each source's split is its own query and gallery set) and their mean.

    Keys: `recall@K`, the unweighted mean over sources, and, when the split has several sources,
    `recall@K_<source>`. Embeddings are compared by cosine similarity, a hashing model's codes
    by Hamming distance.

    Args:
        ks: the K values.

    Example:

    ```python
    RecallAtK(ks=(1, 4)).evaluate(embedder, val, resize_size=256)  # {"recall@1": ..., ...}
    ```

    Reference:
        Song et al., "Deep Metric Learning via Lifted Structured Feature Embedding", CVPR 2016,
        https://arxiv.org/abs/1511.06452 — the protocol of Feng et al., "Universal Model for
        Multi-Domain Medical Image Retrieval", https://arxiv.org/abs/2007.08628, Sec. IV.
    """

    def __init__(self, ks: Sequence[int] = (1, 2, 4, 8)):
        self.ks = _positive_integers(ks, "ks")

    def metric_names(self, examples: Examples) -> list[str]:
        names = [f"recall@{k}" for k in self.ks]
        if len(examples.source_names) > 1:
            names += [f"recall@{k}_{source}" for source in examples.source_names for k in self.ks]
        return names

    def check(self, examples: Examples, train: Examples | None = None) -> None:
        for source in examples.source_names:
            count = int((examples.sources == source).sum())
            if count <= max(self.ks):
                raise ValueError(
                    f"validation source {source!r} has {count} images; Recall@{max(self.ks)} "
                    f"needs at least {max(self.ks) + 1} (each query is excluded from its own "
                    "gallery)."
                )

    def evaluate(self, model, examples: Examples, *, resize_size: int,
                 train: Examples | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 cache: OutputCache | None = None) -> dict[str, float]:
        embeddings = (cache or OutputCache()).embeddings(model, examples, resize_size=resize_size,
                                                         batch_size=batch_size)
        results = evaluate_retrieval(model, examples, resize_size=resize_size, ks=self.ks,
                                     embeddings=embeddings)
        metrics = dict(results["average"])
        if len(examples.source_names) > 1:
            for source in examples.source_names:
                metrics.update({f"{key}_{source}": value
                                for key, value in results[source].items()})
        return metrics


class KNNClassification(Evaluator):
    """kNN classification of the evaluation split against the training split: Acc, MCR, RS.

    Each evaluation embedding is classified by the majority label of its `num_neighbors` nearest
    training embeddings (`tfmir.metrics.knn_classification` over one `ExactIndex` of the training
    split; a hashing model's codes by Hamming distance, ties in index order). Keys:
    `knn_accuracy`, `knn_mcr` (mean class recall) and `knn_rs` (recall of the smallest class);
    with several neighbour counts, `knn@K_accuracy`, `knn@K_mcr`, `knn@K_rs` for each K.

    Args:
        num_neighbors: the paper's K_p, or a tuple of them.
        smallest_class: the class whose recall is RS. By default the class with the fewest
            TRAINING items (the lowest label among equally small ones): the minority class is a
            property of the data set, not of the validation sample.
        metric: search metric, one of `tfmir.index.exact.METRICS`; unused for a hashing model.

    Example:

    ```python
    KNNClassification(num_neighbors=(1, 5)).evaluate(embedder, val, resize_size=256, train=train)
    ```

    Reference:
        Zhuang et al., "Deep kNN for Medical Image Classification", MICCAI 2020,
        https://doi.org/10.1007/978-3-030-59710-8_13 (kNN classification; Acc, MCR, RS).
    """

    def __init__(self, num_neighbors: int | Sequence[int] = 1, smallest_class: int | None = None,
                 metric: str = "cosine"):
        self.num_neighbors = _positive_integers(num_neighbors, "num_neighbors")
        if smallest_class is not None and not _is_int(smallest_class):
            raise ValueError("smallest_class must be a class index or None. "
                             f"Received: smallest_class={smallest_class!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}. Received: metric={metric!r}")
        self.smallest_class = smallest_class
        self.metric = metric

    def _prefix(self, k):
        return "knn" if len(self.num_neighbors) == 1 else f"knn@{k}"

    def metric_names(self, examples: Examples) -> list[str]:
        return [f"{self._prefix(k)}_{name}" for k in self.num_neighbors
                for name in ("accuracy", "mcr", "rs")]

    def check(self, examples: Examples, train: Examples | None = None) -> None:
        if train is None:
            raise ValueError("KNNClassification needs the training split as its gallery. "
                             "Received: train=None")
        if len(train) < max(self.num_neighbors):
            raise ValueError(
                f"the training split has {len(train)} items; kNN classification with "
                f"num_neighbors={max(self.num_neighbors)} needs at least that many."
            )
        if len(examples) == 0:
            raise ValueError("the evaluation split is empty; kNN classification needs items")
        smallest_class = self._smallest_class(train)
        if smallest_class not in set(examples.labels.tolist()):
            origin = ("given" if self.smallest_class is not None
                      else "the training split's smallest")
            raise ValueError(
                f"smallest_class {smallest_class} ({origin}) has no item in the evaluation "
                "split, so its recall (RS) is undefined. Pass smallest_class= a class present "
                f"there: {sorted(set(examples.labels.tolist()))}"
            )

    def _smallest_class(self, train):
        if self.smallest_class is not None:
            return self.smallest_class
        return find_smallest_class(train.labels)

    def evaluate(self, model, examples: Examples, *, resize_size: int,
                 train: Examples | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 cache: OutputCache | None = None) -> dict[str, float]:
        self.check(examples, train)
        cache = cache or OutputCache()
        test_embeddings = cache.embeddings(model, examples, resize_size=resize_size,
                                           batch_size=batch_size)
        train_embeddings = cache.embeddings(model, train, resize_size=resize_size,
                                            batch_size=batch_size)
        test_embeddings, _ = ranking_vectors(model, test_embeddings, self.metric)
        train_embeddings, metric = ranking_vectors(model, train_embeddings, self.metric)
        # One index over the training split serves every K_p; RS is the training split's
        # smallest class unless one was given (see knn_classification).
        index = ExactIndex(metric=metric, dimension=train_embeddings.shape[1])
        index.build(train_embeddings, ids=np.arange(len(train)))
        smallest_class = self._smallest_class(train)
        metrics = {}
        for k in self.num_neighbors:
            scores = knn_classification(None, train.labels, test_embeddings, examples.labels,
                                        k=k, index=index, smallest_class=smallest_class)
            prefix = self._prefix(k)
            metrics[f"{prefix}_accuracy"] = scores["accuracy"]
            metrics[f"{prefix}_mcr"] = scores["mean_class_recall"]
            metrics[f"{prefix}_rs"] = scores["smallest_class_recall"]
        return metrics


class MeanAveragePrecision(Evaluator):
    """mAP@k of the evaluation split searched against itself, each query excluded.

    Per query, AP@k = Σ_{i≤k} P(i)·rel(i) / Σ_{i≤k} rel(i) (0 when no item of the query's class is
    in the top k), averaged over queries; the whole split (all sources together) is query set and
    gallery. Key: `map@k`.

    A hashing model (a "code" output, `tfmir.models.retrieval_output`) is ranked by Hamming
    distance: its real values' signs are the hash bits (positive -> 1, zero or negative -> 0),
    equal distances in index order. `codes=True` ranks any model's outputs that way, and
    `codes=False` ranks even a hashing model's real values by `metric`.

    Args:
        k: the number of retrieved items scored (the paper reports top-10 by default).
        codes: rank binary codes by Hamming distance (True) or outputs by `metric` (False);
            None (the default): Hamming distance for a hashing model, `metric` otherwise.
        metric: search metric of real-valued embeddings, one of `tfmir.index.exact.METRICS`;
            unused for codes.

    Example:

    ```python
    MeanAveragePrecision(k=10).evaluate(hasher, val, resize_size=256)  # {"map@10"}, Hamming
    ```

    Reference:
        Fang et al., "Combating Ambiguity for Hash-code Learning in Medical Instance Retrieval",
        eq. 3 (mAP@top-k).
    """

    def __init__(self, k: int = 10, codes: bool | None = None, metric: str = "cosine"):
        if not _is_int(k) or k < 1:
            raise ValueError(f"k must be a positive integer. Received: k={k!r}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}. Received: metric={metric!r}")
        self.k = k
        self.codes = None if codes is None else bool(codes)
        self.metric = metric

    def metric_names(self, examples: Examples) -> list[str]:
        return [f"map@{self.k}"]

    def check(self, examples: Examples, train: Examples | None = None) -> None:
        if len(examples) <= self.k:
            raise ValueError(
                f"the evaluation split has {len(examples)} images; mAP@{self.k} needs at least "
                f"{self.k + 1} (each query is excluded from its own gallery)."
            )

    def evaluate(self, model, examples: Examples, *, resize_size: int,
                 train: Examples | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 cache: OutputCache | None = None) -> dict[str, float]:
        outputs = (cache or OutputCache()).embeddings(model, examples, resize_size=resize_size,
                                                      batch_size=batch_size)
        # exact_search breaks ties by index and excludes each query itself.
        vectors, metric = ranking_vectors(model, outputs, self.metric, codes=self.codes)
        _, indices = exact_search(vectors, vectors, self.k, metric=metric, exclude_self=True)
        return {f"map@{self.k}": map_at_k(examples.labels, examples.labels[indices], self.k)}


class SegmentationOverlap(Evaluator):
    """Dice and IoU of the model's thresholded mask probabilities against the true masks.

    The model maps (B, S, S, 3) pixels to (B, S, S, 1) foreground probabilities (its "mask"
    output when it returns a dict, e.g. a Y-Net hasher; else its one output); a pixel is
    predicted foreground when its probability exceeds `threshold`. Ground-truth masks come from
    `make_dataset(..., fields=("image", "mask"))`, resized and cropped like the images (0.0 or
    1.0; a pixel is true foreground above 0.5). Both scores are per image, then averaged; an
    image whose true and predicted masks are both empty scores 1.0 (see
    `tfmir.metrics.segmentation`). Keys: `dice`, `iou`.

    Args:
        threshold: probability above which a pixel is predicted foreground, in (0, 1).

    Example:

    ```python
    SegmentationOverlap().evaluate(segmenter, val, resize_size=256)  # {"dice": ..., "iou": ...}
    ```

    Reference:
        Dice, Ecology 26(3), 1945 (Sørensen-Dice, Sec. 2.4 of "Exploring Content Based Image
        Retrieval for Highly Imbalanced Melanoma Data using Style Transfer, Semantic Image
        Segmentation and Ensemble Learning"); Jaccard, New Phytologist 11(2), 1912 (IoU).
    """

    def __init__(self, threshold: float = 0.5):
        if not isinstance(threshold, numbers.Real) or not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1). Received: threshold={threshold!r}")
        self.threshold = float(threshold)

    def metric_names(self, examples: Examples) -> list[str]:
        return ["dice", "iou"]

    def check(self, examples: Examples, train: Examples | None = None) -> None:
        if len(examples) == 0:
            raise ValueError("the evaluation split is empty; Dice and IoU need items")
        # make_dataset reads in-memory images' masks from `masks`, files' from `mask_paths`.
        if examples.in_memory:
            if examples.masks is None:
                raise ValueError("SegmentationOverlap needs ground-truth masks. Received an "
                                 "in-memory evaluation split without masks")
            return
        if examples.mask_paths is None:
            raise ValueError("SegmentationOverlap needs ground-truth masks. Received an "
                             "evaluation split on disk without mask_paths")
        missing = examples.mask_paths == ""
        if missing.any():
            raise ValueError(
                f"SegmentationOverlap needs a mask for every item. Received {int(missing.sum())} "
                f"item(s) without one, e.g. ids {examples.ids[missing][:3].tolist()}"
            )

    def evaluate(self, model, examples: Examples, *, resize_size: int,
                 train: Examples | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 cache: OutputCache | None = None) -> dict[str, float]:
        names = output_names(model)
        if names and MASK not in names:
            raise ValueError(f"SegmentationOverlap needs the model's {MASK!r} output. Received a "
                             f"model with outputs {list(names)}")
        image_size = getattr(model, "image_size", None) or int(model.inputs[0].shape[1])
        dataset = make_dataset(examples, training=False, batch_size=batch_size,
                               image_size=image_size, resize_size=resize_size,
                               fields=("image", "mask"))
        # The shared traced function: calling the model eagerly per batch is much slower, and a
        # fresh tf.function would retrace every epoch.
        predict = _embed_function(model, image_size, MASK)
        totals = {"dice": 0.0, "iou": 0.0}
        num_images = 0
        for features, targets in dataset:
            predicted = np.asarray(predict(features["image"])) > self.threshold
            true = np.asarray(targets["mask"]) > 0.5
            count = true.shape[0]
            # (B, S, S) and (B, S, S, 1) hold the same pixels; only the pixel count must agree.
            predicted, true = predicted.reshape(count, -1), true.reshape(count, -1)
            # Per-image means weighted by batch size give the mean over all images.
            totals["dice"] += dice_score(true, predicted) * count
            totals["iou"] += iou_score(true, predicted) * count
            num_images += count
        if num_images == 0:
            raise ValueError("the evaluation split is empty; Dice and IoU need items")
        return {key: total / num_images for key, total in totals.items()}


class BinaryAUC(Evaluator):
    """The ROC AUC of a binary classifier's "probability" output for one positive class.

    The model maps (B, S, S, 3) pixels to a dict with a (B, 1) `"probability"` output (an
    `EnsembleMember` or a `StyleEnsemble`); an item is positive when its label is
    `positive_class`, every other class is negative (paper 003: melanoma against the rest). The
    AUC is exact (`tfmir.metrics.roc_auc`, mid-ranks for ties). Key: `auc`.

    Args:
        positive_class: the positive class's name (e.g. "mel") or label index.

    Example:

    ```python
    BinaryAUC("mel").evaluate(member, val, resize_size=144)  # {"auc": ...}
    ```
    """

    def __init__(self, positive_class: str | int = 1):
        self.positive_class = positive_class

    def metric_names(self, examples: Examples) -> list[str]:
        return ["auc"]

    def check(self, examples: Examples, train: Examples | None = None) -> None:
        positive = positive_class_index(examples.class_names, self.positive_class)
        labels = np.asarray(examples.labels) == positive
        if labels.all() or not labels.any():
            raise ValueError(f"BinaryAUC needs positive ({self.positive_class!r}) and negative "
                             f"items in the evaluation split. Received {int(labels.sum())} "
                             f"positive of {labels.size}")

    def evaluate(self, model, examples: Examples, *, resize_size: int,
                 train: Examples | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 cache: OutputCache | None = None) -> dict[str, float]:
        if PROBABILITY not in output_names(model):
            raise ValueError(f"BinaryAUC needs the model's {PROBABILITY!r} output. Received a "
                             f"model with outputs {list(output_names(model))}")
        image_size = getattr(model, "image_size", None) or int(model.inputs[0].shape[1])
        dataset = make_dataset(examples, training=False, batch_size=batch_size,
                               image_size=image_size, resize_size=resize_size, fields=("image",))
        predict = _embed_function(model, image_size, PROBABILITY)
        scores = np.concatenate([np.asarray(predict(features["image"])).reshape(-1)
                                 for features in dataset])
        positive = positive_class_index(examples.class_names, self.positive_class)
        return {"auc": roc_auc(np.asarray(examples.labels) == positive, scores)}


class TrainingKNNClassification(KNNClassification):
    """Leave-one-out kNN classification of (a fixed sample of) the training split: Acc, MCR, RS.

    The training accuracy of paper 001's Fig. 2 (deep kNN against the triplet loss): each queried
    training item is classified by the majority label of its `num_neighbors` nearest training
    items, itself excluded. The gallery is the whole training split, whose embeddings the
    `OutputCache` shares with `KNNClassification` (so beside it this evaluator embeds nothing);
    the evaluation split is not used. Keys are those of `KNNClassification`, logged with the
    prefix `train_` instead of `val_`: `train_knn_accuracy`, `train_knn_mcr`, `train_knn_rs` (or
    `train_knn@K_...` for several K).

    With `max_items`, only a sample of the training items are queries, drawn once per training
    split (seeded; the same items every epoch): each class gets a share proportional to its
    size, at least min(its size, max K + 1) items, about `max_items` in all. RS is the recall of
    the training split's smallest class.

    Args:
        num_neighbors: K_p, or a tuple of them.
        max_items: about how many training items are queried; None: all of them.
        smallest_class: the class whose recall is RS (default: the training split's smallest).
        metric: search metric, one of `tfmir.index.exact.METRICS`; unused for a hashing model.
        seed: seed of the sample.

    Example:

    ```python
    TrainingKNNClassification((1, 5)).evaluate(embedder, val, resize_size=256, train=train)
    # {"knn@1_accuracy": ..., ...}, logged as train_knn@1_accuracy, ...
    ```

    Reference:
        Zhuang et al., "Deep kNN for Medical Image Classification", MICCAI 2020,
        https://doi.org/10.1007/978-3-030-59710-8_13, Fig. 2.
    """

    log_prefix = "train_"

    def __init__(self, num_neighbors: int | Sequence[int] = 1, max_items: int | None = None,
                 smallest_class: int | None = None, metric: str = "cosine", seed: int = 0):
        super().__init__(num_neighbors, smallest_class=smallest_class, metric=metric)
        if max_items is not None and (not _is_int(max_items) or max_items < 1):
            raise ValueError(f"max_items must be a positive integer or None. "
                             f"Received: max_items={max_items!r}")
        self.max_items = max_items
        self.seed = seed
        self._queries = (None, None)  # (training split, its query rows)

    def query_rows(self, train: Examples) -> np.ndarray:
        """The rows of `train` that are classified (the same ones on every call), sorted."""
        if self._queries[0] is train:
            return self._queries[1]
        if self.max_items is None or len(train) <= self.max_items:
            rows = np.arange(len(train))
        else:
            rng = np.random.default_rng(self.seed)
            floor = max(self.num_neighbors) + 1
            rows = []
            for label in np.unique(train.labels):
                members = np.flatnonzero(train.labels == label)
                share = max(min(len(members), floor),
                            int(round(self.max_items * len(members) / len(train))))
                rows.append(rng.choice(members, min(share, len(members)), replace=False))
            rows = np.sort(np.concatenate(rows))
        self._queries = (train, rows)
        return rows

    def check(self, examples: Examples, train: Examples | None = None) -> None:
        if train is None:
            raise ValueError("TrainingKNNClassification classifies the training split. "
                             "Received: train=None")
        if len(train) <= max(self.num_neighbors):
            raise ValueError(
                f"the training split has {len(train)} items; leave-one-out kNN with "
                f"num_neighbors={max(self.num_neighbors)} needs at least "
                f"{max(self.num_neighbors) + 1}."
            )

    def evaluate(self, model, examples: Examples, *, resize_size: int,
                 train: Examples | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 cache: OutputCache | None = None) -> dict[str, float]:
        self.check(examples, train)
        embeddings = (cache or OutputCache()).embeddings(model, train, resize_size=resize_size,
                                                         batch_size=batch_size)
        embeddings, metric = ranking_vectors(model, embeddings, self.metric)
        rows = self.query_rows(train)
        smallest_class = self._smallest_class(train)
        metrics = {}
        for k in self.num_neighbors:
            scores = knn_classification(embeddings, train.labels, embeddings[rows],
                                        train.labels[rows], k=k, metric=metric,
                                        smallest_class=smallest_class, exclude_rows=rows)
            prefix = self._prefix(k)
            metrics[f"{prefix}_accuracy"] = scores["accuracy"]
            metrics[f"{prefix}_mcr"] = scores["mean_class_recall"]
            metrics[f"{prefix}_rs"] = scores["smallest_class_recall"]
        return metrics


EVALUATORS = {
    "recall": RecallAtK,
    "knn": KNNClassification,
    "map": MeanAveragePrecision,
    "segmentation": SegmentationOverlap,
    "train_knn": TrainingKNNClassification,
    "auc": BinaryAUC,
}


def make_evaluator(spec: Evaluator | str | Mapping[str, Any]) -> Evaluator:
    """Builds an evaluator from an instance, a registry name or `{"name": ..., **kwargs}`.

    Args:
        spec: an `Evaluator` (returned as is), a key of `EVALUATORS`, or a mapping with a
            `"name"` key and the constructor's keyword arguments.

    Returns:
        The evaluator.

    Example:

    >>> make_evaluator({"name": "map", "k": 5, "codes": True})
    MeanAveragePrecision(k=5, codes=True, metric='cosine')
    """
    if isinstance(spec, Evaluator):
        return spec
    if isinstance(spec, str):
        name, kwargs = spec, {}
    elif isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError("an evaluator spec mapping needs a 'name' key. "
                             f"Received: spec={dict(spec)!r}")
        kwargs = dict(spec)
        name = kwargs.pop("name")
    else:
        raise ValueError("an evaluator spec must be an Evaluator, a name or a mapping with a "
                         f"'name'. Received: spec={spec!r}")
    if name not in EVALUATORS:
        raise ValueError(f"name must be one of {sorted(EVALUATORS)}. Received: name={name!r}")
    evaluator_class = EVALUATORS[name]
    accepted = list(inspect.signature(evaluator_class).parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        # A misspelt config key must not surface as a bare TypeError from deep in a run's setup.
        raise ValueError(f"evaluator {name!r} accepts {accepted}. Received unknown arguments "
                         f"{unknown}")
    return evaluator_class(**kwargs)


def check_monitor(monitor: str, evaluators: Sequence, examples: Examples,
                  prefix: str = "val_") -> None:
    """Raises ValueError unless one of `evaluators` logs `monitor` for this split.

    The training core calls it before training, so a misspelt monitor fails at once instead of
    after the first epoch (Keras' checkpoint would only warn). Keras' own keys (`loss`,
    `val_loss`) are not evaluator keys; the caller accepts those itself.

    Args:
        monitor: the log key, e.g. "val_recall@1".
        evaluators: evaluators or specs (see `make_evaluator`).
        examples: the evaluation split (some keys depend on its sources).
        prefix: the prefix `Evaluation` puts before every key.

    Example:

    >>> check_monitor("val_map@10", [{"name": "map", "k": 10}], examples)  # doctest: +SKIP
    """
    available = _log_keys([make_evaluator(spec) for spec in _as_list(evaluators)], examples,
                          prefix)
    if monitor not in available:
        raise ValueError(f"monitor {monitor!r} is produced by no evaluator; available: "
                         f"{available}")


class Evaluation(keras.callbacks.Callback):
    """Runs the task's evaluators after every epoch and adds their metrics to the logs.

    Every evaluator scores the deployable model on `examples`; model outputs are computed once
    per epoch and shared between evaluators. Each key is written as `logs[prefix + key]`, so
    `ModelCheckpoint`, `CSVLogger` and `TensorBoard` placed after this callback see them. Every
    evaluator's `check` runs here, so an unusable split fails before training.

    Args:
        evaluators: evaluators or specs (see `make_evaluator`).
        examples: the evaluation split.
        model: the model to evaluate; by default the trained model's `deployable_model` when it
            has one, else the trained model itself.
        resize_size: resize side before the centre crop.
        train: the training split (the gallery of kNN classification).
        prefix: the prefix of every log key.
        batch_size: images per inference batch.

    Example:

    ```python
    callback = Evaluation(["recall", "knn"], splits["val"], resize_size=256, train=splits["train"])
    task.fit(dataset, epochs=10, callbacks=[callback, keras.callbacks.ModelCheckpoint(
        "best.keras", monitor="val_recall@1", mode="max", save_best_only=True)])
    ```
    """

    def __init__(self, evaluators, examples: Examples, *, model=None, resize_size: int,
                 train: Examples | None = None, prefix: str = "val_",
                 batch_size: int = DEFAULT_BATCH_SIZE):
        super().__init__()
        self.evaluators = [make_evaluator(spec) for spec in _as_list(evaluators)]
        if not self.evaluators:
            raise ValueError("Evaluation needs at least one evaluator. Received: evaluators=[]")
        for evaluator in self.evaluators:
            evaluator.check(examples, train)
        keys = _log_keys(self.evaluators, examples, prefix)
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            # A later evaluator would silently overwrite an earlier one's value.
            raise ValueError(f"several evaluators log the same keys: {repeated}")
        self.examples = examples
        self.evaluation_model = model
        self.resize_size = resize_size
        self.train = train
        self.prefix = prefix
        self.batch_size = batch_size

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        model = self.evaluation_model
        if model is None:
            model = getattr(self.model, "deployable_model", self.model)
        cache = OutputCache()  # per epoch: the weights have changed since the last one
        for evaluator in self.evaluators:
            metrics = evaluator.evaluate(model, self.examples, resize_size=self.resize_size,
                                         train=self.train, batch_size=self.batch_size,
                                         cache=cache)
            for key, value in metrics.items():
                logs[_log_prefix(evaluator, self.prefix) + key] = float(value)


def _log_keys(evaluators, examples, prefix):
    return [_log_prefix(evaluator, prefix) + name for evaluator in evaluators
            for name in evaluator.metric_names(examples)]


def _log_prefix(evaluator, prefix):
    # An evaluator of another split than the evaluation one (the training split) names its own.
    return getattr(evaluator, "log_prefix", None) or prefix


def _as_list(evaluators):
    # A single spec is a list of one; a bare string must not be read as a list of characters.
    if isinstance(evaluators, (str, Mapping, Evaluator)):
        return [evaluators]
    return list(evaluators)


def _positive_integers(values, name):
    received = values
    if _is_int(values):
        values = (values,)
    elif not isinstance(values, str):
        try:
            values = tuple(values)
        except TypeError:
            pass
    if (not isinstance(values, tuple) or not values
            or not all(_is_int(value) and value > 0 for value in values)):
        raise ValueError(f"{name} must be a positive integer or a non-empty sequence of them. "
                         f"Received: {name}={received!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat a value. Received: {name}={received!r}")
    return values


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
