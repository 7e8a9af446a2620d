"""The search service behind `tfmir serve`, free of HTTP: an index, a query backend, checks.

`SearchService.load` loads an index directory and a query-embedding backend (the model
in-process, or TF Serving) and checks, before any request, that they belong together:

- in-process, or TF Serving with the local export given as `model`: the model fingerprint
  against the index manifest (`load_index`, as `tfmir search` does);
- always: the embedding dimension of a probe image against the index dimension, and its kind: a
  hashing model's bits search a hamming index only (`check_query_kind`). With TF Serving and no
  `model` these are the only checks possible (TF Serving does not report a fingerprint), and a
  warning says so.

`search` answers one query image in the shape `tfmir search` prints per query:
`{"results": [{"id", "label", "source", "path", "score", "rank"}], "predicted_label"}`.

Thread safety: a loaded service is read-only, so `search` takes no lock and may run in many
threads at once; only the decoding memory is shared out (`PixelBudget`: the pixels decoded at once
stay under `max_image_pixels`). The index is never modified while serving; `ExactIndex` searches with faiss
on a read-only array, and ScaNN 1.4.2 releases the GIL in `search_batched` and answers
concurrent searches on one searcher (only `upsert`, never called here, modifies it). TensorFlow
functions (the SavedModel signature, the Keras embedding function) may be called from several
threads; the SavedModel, which `EmbeddingFunction` loads on first use, is loaded by the probe in
`load`, before any request thread exists.

Example:

```python
service = SearchService.load("indexes/skin", "exported/tfmir", k=8)
answer = service.search(open("query.jpg", "rb").read(), k=4, source="skin")
```
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter

import numpy as np
from absl import logging

from tfmir.serving.backends import (DEFAULT_MAX_IMAGE_PIXELS, BackendError, LocalBackend,
                                    RequestError, TFServingBackend, check_image, probe_image)
from tfmir.serving.retrieval import (SearchError, check_query_kind, load_index, predicted_labels,
                                     search_sources)


class SearchService:
    """Embeds query images and searches an index.

    Args:
        index: a loaded `tfmir.index.Index`.
        embed: callable from a list of encoded images to float32 (N, index.dimension)
            embeddings (or ±1 hash bits), with `backend`, `description`, `fingerprint` and
            `kind` attributes (`LocalBackend`, `TFServingBackend`).
        k: results per query when a request does not say.
        max_image_pixels: images with more pixels (height × width, from the header) are refused.
        fingerprint_checked: whether the backend's model was checked against the index
            fingerprint (reported by `health`).
    """

    def __init__(self, index, embed, *, k: int = 8,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 fingerprint_checked: bool = True):
        _check_positive("k", k)
        _check_positive("max_image_pixels", max_image_pixels)
        if k > len(index):
            raise SearchError(f"k={k} is larger than the index ({len(index)} items).")
        self.index = index
        self.embed = embed
        self.k = k
        self.max_image_pixels = max_image_pixels
        self.fingerprint_checked = fingerprint_checked
        self.source_counts = Counter(index.sources.tolist())
        self._decoding = PixelBudget(max_image_pixels)

    @classmethod
    def load(cls, index_directory: str | os.PathLike, model: str | os.PathLike | None = None, *,
             k: int = 8, tf_serving_url: str | None = None,
             max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
             resize_size: int | None = None) -> "SearchService":
        """Loads the index and the query backend and checks that they belong together.

        Args:
            index_directory: an index directory written by `tfmir index`.
            model: the model that built the index: a SavedModel export or a `.keras`
                checkpoint. With `tf_serving_url` it is optional and only used for its
                fingerprint (give the export TF Serving serves).
            k: results per query when a request does not say.
            tf_serving_url: embed with TF Serving at this model URL (e.g.
                `http://localhost:8501/v1/models/tfmir`) instead of in-process.
            max_image_pixels: larger images are refused before they are decoded.
            resize_size: resize side for a `.keras` model (default: its `config.json`).

        Returns:
            The service, ready to answer.

        Raises:
            SearchError: (a ValueError) a missing or invalid index, a model that does not match
                it, k larger than the index, an unusable model or an unreachable TF Serving.
        """
        _check_positive("k", k)
        _check_positive("max_image_pixels", max_image_pixels)
        index_directory = os.fspath(index_directory)
        if not os.path.isdir(index_directory):
            raise SearchError(f"index {index_directory} is not a directory; build one with "
                              "`tfmir index`.")
        from tfmir.index.embedding import load_embedding_function  # imports TensorFlow

        try:
            if tf_serving_url is None:
                if model is None:
                    raise SearchError("a model is needed: give the model that built the index "
                                      "(--model), or a TF Serving URL (--tf_serving_url).")
                embed = LocalBackend(model, resize_size=resize_size)
                fingerprint, preprocessing = embed.fingerprint, embed.preprocessing
                kind, description = embed.kind, embed.description
            else:
                embed = TFServingBackend(tf_serving_url)
                fingerprint = preprocessing = kind = None
                description = embed.description
                if model is not None:  # for its fingerprint (a SavedModel is not even loaded)
                    function = load_embedding_function(model, resize_size=resize_size)
                    fingerprint, preprocessing = function.fingerprint, function.preprocessing
                    kind, description = function.kind, function.description
        except SearchError:
            raise
        except ValueError as error:
            raise SearchError(str(error)) from error
        index = load_index(index_directory, fingerprint, preprocessing, query_kind=kind,
                           model=description)
        if fingerprint is None:
            logging.warning(
                "The model behind %s cannot be checked against the index: TF Serving does not "
                "report its fingerprint, so only its embedding dimension is checked. Give the "
                "export it serves as --model to check the fingerprint too (the index records %s).",
                embed.predict_url, index.model_fingerprint or "no fingerprint")
        service = cls(index, embed, k=k, max_image_pixels=max_image_pixels,
                      fingerprint_checked=fingerprint is not None)
        service._check_model(index_directory, kind)
        return service

    def _check_model(self, index_directory: str, expected_kind: str | None = None) -> None:
        """Embeds a probe image once: loads a lazy model and compares kinds and dimensions."""
        try:
            embeddings = self.embed([probe_image()])
        except (BackendError, RequestError) as error:
            raise SearchError(f"could not embed a test image with {self.embed.description}: "
                              f"{error}") from error
        kind = self.embed.kind
        if expected_kind is not None and kind != expected_kind:
            # TF Serving serves another model than the export named to check its fingerprint.
            raise SearchError(f"{self.embed.description} answers {_KIND_WORDS[kind]}, but the "
                              f"given model outputs {_KIND_WORDS[expected_kind]}: it serves "
                              "another model.")
        check_query_kind(self.index.kind, kind, index_directory, self.embed.description)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.index.dimension:
            raise SearchError(
                f"{self.embed.description} gives embeddings of shape {embeddings.shape[1:]}, but "
                f"the index holds vectors of dimension {self.index.dimension}: it was built with "
                "another model.")

    def search(self, image: bytes, *, k: int | None = None, source: str | None = None) -> dict:
        """The top-k indexed items for one encoded image (any format `tfmir.images` reads).

        Args:
            image: the encoded image.
            k: results (default: the service's k); at least 1 and at most the items searched.
            source: only return results from this source.

        Returns:
            `{"results": [{"id", "label", "source", "path", "score", "rank"}, ...],
            "predicted_label": ...}`, best first; the prediction is the majority label of the
            results (ties go to the nearest).

        Raises:
            RequestError: a bad k or source (400), an image that is refused (400, 413), or
                one whose embedding is all zeros under a cosine or dot index (422).
            BackendError: TF Serving failed or answered embeddings of the wrong shape or with
                NaN / infinite values (502).
        """
        k = self.k if k is None else k
        if k < 1:
            raise RequestError(400, f"k must be at least 1. Received: k={k}")
        available = len(self.index) if source is None else self.source_counts.get(source, 0)
        if source is not None and available == 0:
            raise RequestError(400, f"source {source!r} is not in the index; its sources are "
                                    f"{_sorted(self.source_counts)}.")
        if k > available:
            where = "the index" if source is None else f"source {source!r}"
            raise RequestError(400, f"k={k} is larger than {where} ({available} items).")
        height, width = check_image(image, self.max_image_pixels)
        with self._decoding.hold(height * width):
            embeddings = self.embed([image])
        if embeddings.shape != (1, self.index.dimension):
            raise BackendError(f"{self.embed.description} answered an embedding of shape "
                               f"{embeddings.shape}; the index has dimension "
                               f"{self.index.dimension}.")
        if not np.all(np.isfinite(embeddings)):
            raise BackendError(f"{self.embed.description} answered an embedding with NaN or "
                               "infinite values; the model or its server is faulty.")
        if self.index.metric in ("cosine", "dot") and not np.any(embeddings):
            # Every score would be 0: a ranking (and a predicted label) by index order alone.
            raise RequestError(422, "the model gave this image an all-zero embedding, which "
                                    f"cannot be ranked by {self.index.metric} similarity; send "
                                    "another image.")
        results = search_sources(self.index, embeddings, k, source)
        return {"results": results[0], "predicted_label": predicted_labels(results)[0]}

    def health(self) -> dict:
        """What `GET /healthz` reports: the index and how queries are embedded."""
        return {
            "status": "ok",
            "count": len(self.index),
            "kind": self.index.kind,
            "metric": self.index.metric,
            "dimension": self.index.dimension,
            "model_fingerprint": self.index.model_fingerprint,
            "fingerprint_checked": self.fingerprint_checked,
            "backend": self.embed.backend,
            "k": self.k,
            "sources": _sorted(self.source_counts),
        }


class PixelBudget:
    """Bounds the pixels decoded at once across threads: the memory of concurrent queries.

    Each query holds its image's pixel count (from the header) while it is decoded and embedded;
    a query that would take the total over `capacity` waits until others finish. Decoding takes
    about 16 bytes per pixel (an 8-bit RGB PNG: the pixels, then float32 for the resize; a 16-bit
    one more), so with `capacity` = `max_image_pixels` (the service's choice) the decoding
    memory of all requests together stays near what one largest allowed image needs, however
    many arrive at once. An image larger than the capacity holds all of it.

    Args:
        capacity: pixels that may be held at once (positive).

    Example:

    ```python
    budget = PixelBudget(50_000_000)
    with budget.hold(height * width):
        embeddings = embed([image])
    ```
    """

    def __init__(self, capacity: int):
        _check_positive("capacity", capacity)
        self.capacity = capacity
        self.held = 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int):
        pixels = max(1, min(int(pixels), self.capacity))
        with self._changed:
            self._changed.wait_for(lambda: self.held + pixels <= self.capacity)
            self.held += pixels
        try:
            yield
        finally:
            with self._changed:
                self.held -= pixels
                self._changed.notify_all()


_KIND_WORDS = {"float": "float embeddings", "hash": "hash codes (±1 bits)"}


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")


def _sorted(sources) -> list:
    return sorted(sources, key=lambda source: (source is None, str(source)))
