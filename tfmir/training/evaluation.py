"""Embedding a split and scoring retrieval on it, per source."""

from __future__ import annotations

import weakref

import numpy as np
import tensorflow as tf

from tfmir.data import Examples, make_dataset
from tfmir.metrics import retrieval_metrics
from tfmir.models.outputs import HASH, output_shape, retrieval_output, select_output


# One traced inference function per model and output, with a batch-agnostic signature: Keras'
# predict() would retrace for every new final-batch size, i.e. every split and every epoch.
_EMBED_FUNCTIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _embed_function(model, image_size: int, output: str | None = None):
    """A traced `model(images)` that returns only `output` (all outputs when None).

    Selecting inside the function lets TensorFlow prune what the output does not need (the mask
    head of a hashing model when only its codes are wanted).
    """
    functions = _EMBED_FUNCTIONS.setdefault(model, {})
    if output not in functions:
        signature = [tf.TensorSpec([None, image_size, image_size, 3], tf.float32)]
        reference = weakref.ref(model)  # the cache must not keep the model alive

        def call(images):
            outputs = reference()(images, training=False)
            return outputs if output is None else select_output(outputs, output)

        functions[output] = tf.function(call, input_signature=signature)
    return functions[output]


def embed_examples(model, examples: Examples, *, resize_size: int, batch_size: int = 256,
                   output: str | None = None) -> np.ndarray:
    """Embeds every item of `examples` in order (evaluation preprocessing: centre crop).

    Args:
        model: an embedder taking (B, S, S, 3) pixels in [0, 255]; S is `model.image_size` when set,
            else the model's input width. A model with a dict of outputs gives the one named
            `output`.
        examples: the items to embed.
        resize_size: the side the images are resized to before the centre crop.
        batch_size: images per batch.
        output: the output to return; by default the retrieval output
            (`tfmir.models.retrieval_output`: the embedding, or a hashing model's real-valued
            codes, whose signs are the bits).

    Returns:
        float32 array (len(examples), embedding_dim).
    """
    output = output or retrieval_output(model)[0]
    image_size = getattr(model, "image_size", None) or int(model.inputs[0].shape[1])
    dataset = make_dataset(examples, training=False, batch_size=batch_size, image_size=image_size,
                           resize_size=resize_size, fields=("image",))
    embed = _embed_function(model, image_size, output)
    parts = [np.asarray(embed(element["image"]), dtype=np.float32) for element in dataset]
    if not parts:
        return np.zeros((0, output_shape(model, output)[-1]), np.float32)
    return np.concatenate(parts)


def ranking_vectors(model, outputs: np.ndarray, metric: str = "cosine",
                    codes: bool | None = None) -> tuple[np.ndarray, str]:
    """The vectors and metric that rank a model's retrieval outputs.

    A hashing model's outputs (`tfmir.models.retrieval_output` kind "hash"), or any outputs with
    `codes=True`, are ranked by Hamming distance between their sign bits: for ±1 codes of k
    bits, q·g = k - 2·hamming(q, g), so ranking ±1 vectors by largest dot product is ranking by
    smallest Hamming distance, exact in float32, with ties in index order (`exact_search`).

    Args:
        model: the model that gave `outputs`; None for embeddings of unknown origin (float).
        outputs: float (N, D) retrieval outputs (`embed_examples`).
        metric: the metric of real-valued embeddings.
        codes: rank by Hamming distance (True) or by `metric` (False); None: by the model's
            output kind.

    Returns:
        (vectors, metric): ±1 float32 vectors and "dot" for codes, else `outputs` and `metric`.
    """
    if codes is None:
        codes = model is not None and retrieval_output(model)[1] == HASH
    if codes:
        from tfmir.index.hamming import sign_codes

        return np.where(sign_codes(outputs), 1.0, -1.0).astype(np.float32), "dot"
    return outputs, metric


def evaluate_retrieval(model, examples: Examples, *, resize_size: int, ks=(1, 2, 4, 8),
                       batch_size: int = 256, embeddings: np.ndarray | None = None) -> dict:
    """Recall@K per source (each source's split is its own query and gallery set) and their mean.

    Embeddings are compared by cosine similarity; a hashing model's codes by Hamming distance
    (`ranking_vectors`).

    Args:
        model: the embedder.
        examples: the evaluation split; several sources are scored separately, as in paper 000.
        resize_size: resize side before the centre crop.
        ks: the K values of Recall@K.
        batch_size: images per embedding batch.
        embeddings: precomputed retrieval outputs of `examples` (skips the model, which may
            then be None: the embeddings are compared by cosine).

    Returns:
        `{source: {"recall@1": ..., ...}, ..., "average": {...}}`, the average being the unweighted
        mean over sources (the paper's "Average" column).
    """
    if embeddings is None:
        embeddings = embed_examples(model, examples, resize_size=resize_size, batch_size=batch_size)
    vectors, metric = ranking_vectors(model, embeddings)
    results = {}
    for source in examples.source_names:
        mask = examples.sources == source
        if mask.sum() < 2:
            raise ValueError(
                f"source {source!r} has {int(mask.sum())} evaluation item(s); Recall@K needs at least 2."
            )
        results[source] = retrieval_metrics(vectors[mask], examples.labels[mask], ks=ks,
                                            metric=metric)
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
