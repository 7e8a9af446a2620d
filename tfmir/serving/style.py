"""`tfmir serve` over a style database (paper 003): requests choose the measure and the mode.

    tfmir serve --index=indexes/isic --model=ensemble.keras --segmenter=segmenter.keras
    curl -s -H 'Content-Type: image/jpeg' --data-binary @query.jpg \
        'http://127.0.0.1:8080/search?k=5&measure=I1_SE&mode=fast'

`POST /search` takes `k`, `measure` (one of `tfmir.similarity.MEASURES`), `mode` ("exact" or
"fast") and `candidates` (fast mode), and answers `{"measure", "mode", "results": [{"id",
"label", "source", "path", "score", "rank"}], "predicted_label"}`. An unknown measure or mode,
a Dice measure the database or the service cannot answer (no masks, no segmenter), or an image
the model cannot read is a 400 with the one-line reason. Queries are embedded in-process with
the `.keras` style model (and segmenter) that built the database; their fingerprints are
checked at startup (TF Serving is not supported for style models).

Thread safety: as `SearchService`, the database is read-only while serving (its packed Grams a
read-only memory map) and TensorFlow functions may be called from several threads.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from tfmir.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError
from tfmir.serving.backends import RequestError, _refused_image, check_image, model_error_message
from tfmir.serving.retrieval import SearchError, predicted_labels
from tfmir.serving.service import PixelBudget, _check_positive

DEFAULT_MEASURE = "style"
DEFAULT_MODE = "exact"


class StyleSearchService:
    """Embeds query images with a style model (and segmenter) and searches a `StyleDatabase`.

    Args:
        database: a loaded `tfmir.index.StyleDatabase`.
        extractor: the `tfmir.index.style.StyleFeatureExtractor` of the models that built it.
        k: results per query when a request does not say.
        measure, mode, candidates: the defaults of requests that do not say.
        max_image_pixels: images with more pixels (from the header) are refused (413).
    """

    backend = "in-process"
    query_parameters = ("k", "measure", "mode", "candidates")

    def __init__(self, database, extractor, *, k: int = 8, measure: str = DEFAULT_MEASURE,
                 mode: str = DEFAULT_MODE, candidates: int = 100,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        _check_positive("k", k)
        _check_positive("max_image_pixels", max_image_pixels)
        database.check_request(measure, mode, candidates)
        if k > len(database):
            raise SearchError(f"k={k} is larger than the database ({len(database)} items).")
        self.database = database
        self.embed = extractor
        self.k, self.measure, self.mode, self.candidates = k, measure, mode, candidates
        self.max_image_pixels = max_image_pixels
        self._decoding = PixelBudget(max_image_pixels)

    @classmethod
    def load(cls, index_directory, model, *, segmenter=None, k: int = 8,
             measure: str | None = None, mode: str | None = None, candidates: int | None = None,
             max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, resize_size: int | None = None,
             tf_serving_url: str | None = None) -> "StyleSearchService":
        """Loads the database and its models and checks that they belong together.

        Raises:
            SearchError: no model or a TF Serving URL, a model or segmenter that did not build
                the database (fingerprints), an unusable model, or a bad default.
        """
        from tfmir.index import FingerprintMismatchError
        from tfmir.index.style import StyleDatabase, StyleFeatureExtractor, read_manifest

        if tf_serving_url is not None or model is None:
            raise SearchError("a style database is served with its .keras style model "
                              "in-process: give --model (TF Serving is not supported for style "
                              "models).")
        try:
            manifest = read_manifest(index_directory)
            if segmenter is not None and not manifest.get("has_masks"):
                raise SearchError(f"--segmenter was given, but the database {index_directory} "
                                  "was built without --segmenter (it holds no masks).")
            extractor = StyleFeatureExtractor(model, segmenter, resize_size=resize_size,
                                              mask_size=manifest.get("mask_size") or 64)
            database = StyleDatabase.load(
                index_directory, expected_model_fingerprint=extractor.fingerprint,
                expected_segmenter_fingerprint=extractor.segmenter_fingerprint,
                expected_preprocessing=extractor.preprocessing)
        except FingerprintMismatchError as error:
            raise SearchError(f"the model does not match the database: {error} Use the models "
                              "and resize side that built it.") from error
        except SearchError:
            raise
        except ValueError as error:
            raise SearchError(str(error)) from error
        try:
            return cls(database, extractor, k=k, measure=measure or DEFAULT_MEASURE,
                       mode=mode or DEFAULT_MODE, candidates=candidates or 100,
                       max_image_pixels=max_image_pixels)
        except ValueError as error:
            raise SearchError(str(error)) from error

    def search(self, image: bytes, *, k: int | None = None, source: str | None = None,
               measure: str | None = None, mode: str | None = None,
               candidates: str | int | None = None) -> dict:
        """The top-k items for one encoded image by `measure` (default: the service's).

        Raises:
            RequestError: 400 for a bad k, measure, mode or candidates, a source filter, a
                measure the database cannot answer or an unreadable image; 413 for one too large.
        """
        import tensorflow as tf

        from tfmir.data import Examples
        from tfmir.similarity import COMPONENTS

        if source is not None:
            raise RequestError(400, "source is not supported for a style database.")
        k = self.k if k is None else k
        measure = self.measure if measure is None else measure
        mode = self.mode if mode is None else mode
        candidates = self.candidates if candidates is None else _integer("candidates",
                                                                         candidates)
        if not 1 <= k <= len(self.database):
            raise RequestError(400, f"k must be an integer in [1, {len(self.database)}] (the "
                                    f"database size). Received: k={k}")
        try:  # before the image is decoded
            self.database.check_request(measure, mode, candidates)
        except ValueError as error:
            raise RequestError(400, str(error)) from None
        if "dice" in COMPONENTS[measure] and self.embed.segmenter is None:
            raise RequestError(400, f"measure {measure!r} needs the query's mask: the service "
                                    "was started without --segmenter.")
        height, width = check_image(image, self.max_image_pixels)
        with self._decoding.hold(height * width), \
                tempfile.TemporaryDirectory(prefix="tfmir-serve-") as directory:
            path = os.path.join(directory, "query")
            with open(path, "wb") as stream:
                stream.write(image)
            examples = Examples(labels=np.zeros(1, np.int64), sources="query", ids=["0"],
                                class_names=("",), paths=[path])
            try:
                fields = self.embed(examples)
            except tf.errors.InvalidArgumentError as error:
                raise _refused_image(model_error_message(error.message)) from error
            except ImageError as error:
                raise RequestError(413 if error.too_large else 400,
                                   f"the image is {error}.") from None
        query = {"vector": fields["vector"][0], "grams": [gram[0] for gram in fields["grams"]],
                 "mask": None if fields["mask"] is None else fields["mask"][0]}
        try:
            results = self.database.search(query, k, measure, mode=mode, candidates=candidates,
                                           query_name="the query image")
        except ValueError as error:
            raise RequestError(400, str(error)) from None
        return {"measure": measure, "mode": mode, "results": results,
                "predicted_label": predicted_labels([results])[0]}

    def health(self) -> dict:
        """What `GET /healthz` reports (the keys of `SearchService.health`, and the database's)."""
        description = self.database.describe()
        return {
            "status": "ok",
            "count": len(self.database),
            "kind": "style",
            "metric": self.measure,
            "dimension": self.database.dimension,
            "model_fingerprint": self.database.model_fingerprint,
            "segmenter_fingerprint": self.database.segmenter_fingerprint,
            "fingerprint_checked": True,
            "backend": self.backend,
            "k": self.k,
            "measure": self.measure,
            "mode": self.mode,
            "has_masks": self.database.has_masks,
            "bytes_per_image": description["bytes_per_image"]["total"],
            "sources": description["sources"],
        }


def _integer(name: str, value) -> int:
    text = str(value).strip()
    if not text.isdigit() or len(text) > 18 or int(text) < 1:
        raise RequestError(400, f"{name} must be a positive integer. Received: {name}={value!r}")
    return int(text)
