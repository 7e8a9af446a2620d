"""Keras callbacks for retrieval training."""

from __future__ import annotations

import keras

from tfmir.training.evaluation import evaluate_retrieval


class RetrievalEvaluation(keras.callbacks.Callback):
    """Scores Recall@K on a validation split at the end of every epoch and adds it to the logs.

    Adds `val_recall@K` (the mean over sources) and, when there are several sources,
    `val_recall@K_<source>` for each, so `ModelCheckpoint`, `CSVLogger` and `TensorBoard` placed
    after this callback see them.

    Args:
        examples: the validation split.
        resize_size: resize side before the centre crop.
        ks: the K values.
        batch_size: images per embedding batch.
    """

    def __init__(self, examples, *, resize_size: int, ks=(1, 2, 4, 8), batch_size: int = 256):
        super().__init__()
        # Fail before training, not after the first epoch, when a source is too small for max(ks).
        for source in examples.source_names:
            count = int((examples.sources == source).sum())
            if count <= max(ks):
                raise ValueError(
                    f"validation source {source!r} has {count} images; Recall@{max(ks)} needs at "
                    f"least {max(ks) + 1} (each query is excluded from its own gallery)."
                )
        self.examples = examples
        self.resize_size = resize_size
        self.ks = tuple(ks)
        self.batch_size = batch_size

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        results = evaluate_retrieval(self.model, self.examples, resize_size=self.resize_size,
                                     ks=self.ks, batch_size=self.batch_size)
        for key, value in results["average"].items():
            logs[f"val_{key}"] = value
        if len(self.examples.source_names) > 1:
            for source in self.examples.source_names:
                for key, value in results[source].items():
                    logs[f"val_{key}_{source}"] = value
