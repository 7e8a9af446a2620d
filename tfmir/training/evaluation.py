"""Embedding a split and scoring retrieval on it, per source."""

from __future__ import annotations

import weakref

import numpy as np
import tensorflow as tf

from tfmir.data import Examples, make_dataset
from tfmir.metrics import retrieval_metrics


# One traced inference function per model, with a batch-agnostic signature: Keras' predict() would
# retrace for every new final-batch size, i.e. every split and every epoch.
_EMBED_FUNCTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _embed_function(model, image_size: int):
    if model not in _EMBED_FUNCTIONS:
        signature = [tf.TensorSpec([None, image_size, image_size, 3], tf.float32)]
        reference = weakref.ref(model)  # the cache must not keep the model alive
        _EMBED_FUNCTIONS[model] = tf.function(lambda images: reference()(images, training=False),
                                              input_signature=signature)
    return _EMBED_FUNCTIONS[model]


def embed_examples(model, examples: Examples, *, resize_size: int, batch_size: int = 256) -> np.ndarray:
    """Embeds every item of `examples` in order (evaluation preprocessing: centre crop).

    Args:
        model: an embedder taking (B, S, S, 3) pixels in [0, 255]; S is `model.image_size` when set,
            else the model's input width.
        examples: the items to embed.
        resize_size: the side the images are resized to before the centre crop.
        batch_size: images per batch.

    Returns:
        float32 array (len(examples), embedding_dim).
    """
    image_size = getattr(model, "image_size", None) or int(model.inputs[0].shape[1])
    dataset = make_dataset(examples, training=False, batch_size=batch_size, image_size=image_size,
                           resize_size=resize_size, fields=("image",))
    embed = _embed_function(model, image_size)
    parts = [np.asarray(embed(element["image"]), dtype=np.float32) for element in dataset]
    if not parts:
        return np.zeros((0, model.outputs[0].shape[-1]), np.float32)
    return np.concatenate(parts)


def evaluate_retrieval(model, examples: Examples, *, resize_size: int, ks=(1, 2, 4, 8),
                       batch_size: int = 256, embeddings: np.ndarray | None = None) -> dict:
    """Recall@K per source (each source's split is its own query and gallery set) and their mean.

    Args:
        model: the embedder.
        examples: the evaluation split; several sources are scored separately, as in paper 000.
        resize_size: resize side before the centre crop.
        ks: the K values of Recall@K.
        batch_size: images per embedding batch.
        embeddings: precomputed embeddings of `examples` (skips the model).

    Returns:
        `{source: {"recall@1": ..., ...}, ..., "average": {...}}`, the average being the unweighted
        mean over sources (the paper's "Average" column).
    """
    if embeddings is None:
        embeddings = embed_examples(model, examples, resize_size=resize_size, batch_size=batch_size)
    results = {}
    for source in examples.source_names:
        mask = examples.sources == source
        if mask.sum() < 2:
            raise ValueError(
                f"source {source!r} has {int(mask.sum())} evaluation item(s); Recall@K needs at least 2."
            )
        results[source] = retrieval_metrics(embeddings[mask], examples.labels[mask], ks=ks)
    results["average"] = {
        key: float(np.mean([results[source][key] for source in examples.source_names]))
        for key in results[examples.source_names[0]]
    }
    return results


def recall_hits_per_source(examples: Examples, embeddings: np.ndarray, k: int = 1) -> np.ndarray:
    """Each item's Recall@k outcome (0/1) as a query against the rest of its own source.

    The per-query outcomes behind `evaluate_retrieval`'s Recall@k, for paired or stratified
    bootstrap intervals (`tfmir.metrics.paired_bootstrap(..., groups=examples.sources)`).

    Returns:
        float64 (len(examples),), in the order of `examples`.
    """
    from tfmir.index import exact_search
    from tfmir.metrics import recall_hits

    hits = np.zeros(len(examples))
    for source in examples.source_names:
        members = examples.sources == source
        labels = examples.labels[members]
        _, neighbours = exact_search(embeddings[members], embeddings[members], k,
                                     exclude_self=True)
        hits[members] = recall_hits(labels, labels[neighbours], k)
    return hits
