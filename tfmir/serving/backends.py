"""Query-embedding backends of `tfmir serve`: the model in-process, or TF Serving (REST).

Both backends are callables from a list of encoded images (bytes; PNG, JPEG and GIF go to the
model as they are, other formats `tfmir.images` reads are converted to PNG first) to float32 (N, D)
embeddings, or a hashing model's ±1 hash bits, and carry the model `fingerprint` (None when it
cannot be known) and the `kind` of their vectors ("float" or "hash"; None until TF Serving has
answered once):

- `LocalBackend` loads the model with `tfmir.index.embedding.load_embedding_function`, the loader
  of `tfmir index` and `tfmir search`, so a query is embedded exactly as `tfmir search` embeds a
  query file: a SavedModel through its `serving_default` signature, a `.keras` checkpoint through
  the evaluation pipeline.
- `TFServingBackend` POSTs TF Serving's REST predict request
  `{"instances": [{"b64": ...}]}` to `<url>:predict` and reads `predictions`: an export's
  "embedding", or the "bits" of a hashing model's export.

`check_image` refuses what must not reach either backend (empty bytes, an unknown format, an
unreadable header, more than `DEFAULT_MAX_IMAGE_PIXELS` or the given number of pixels, a side
under `tfmir.images.MIN_IMAGE_SIDE`) from the image header alone; a SavedModel from `tfmir export` makes the same checks in its graph, with the
same default. Errors that are the client's carry an HTTP status (`RequestError`); a failing
backend raises `BackendError`.

Example:

```python
embed = LocalBackend("exported/tfmir")
check_image(data, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS)
vectors = embed([data])  # float32 (1, D)
```
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import tempfile
import urllib.error
import urllib.request

import numpy as np

from tfmir.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, graph_bytes, read_header

# Callers checked the size already.
_NO_PIXEL_LIMIT = 1 << 62
DEFAULT_TIMEOUT_SECONDS = 30.0


class RequestError(Exception):
    """A request the service refuses, with the HTTP status that reports it.

    Args:
        status: the HTTP status code (4xx).
        message: what is wrong, for the client.
        headers: extra response headers (e.g. `Allow` for 405).
    """

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class BackendError(Exception):
    """The embedding backend failed (TF Serving unreachable or answering 5xx): a server fault.

    Args:
        message: what failed.
        status: 502 (bad answer or unreachable) or 504 (timed out).
    """

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


def check_image(data: bytes, max_image_pixels: int) -> tuple[int, int]:
    """Refuses an image that must not be decoded, reading only its header (`tfmir.images`).

    Args:
        data: the encoded image (PNG, JPEG, GIF, BMP, TIFF, DICOM, ...: what `tfmir.images`
            reads).
        max_image_pixels: the most pixels (height × width) an image may have.

    Returns:
        (height, width) from the header.

    Raises:
        RequestError: 413 for an image of more than `max_image_pixels` pixels (a decompression
            bomb is a small file whose header promises a huge image); 400 for empty bytes, an
            unknown format, an unreadable header or a side under
            `tfmir.images.MIN_IMAGE_SIDE`.
    """
    try:
        header = read_header(data, max_image_pixels)
    except ImageError as error:
        raise RequestError(413 if error.too_large else 400, f"the image is {error}.") from None
    return header.height, header.width


def _graph_bytes(image: bytes) -> bytes:
    """The bytes a SavedModel decodes (`tfmir.images.graph_bytes`), as a client error if none."""
    try:
        # The size was checked by `check_image` under the service's limit.
        return graph_bytes(image, max_image_pixels=_NO_PIXEL_LIMIT)
    except ImageError as error:
        raise RequestError(413 if error.too_large else 400, f"the image is {error}.") from None


def model_error_message(text: str) -> str:
    """The useful line of a TensorFlow error raised by the serving signature (or TF Serving).

    Example: "Graph execution error: ... assertion failed: [image is larger than
    max_image_pixels=1000000 (...; the first value below is ...)] [Condition x <= y ...]
    [x (map/while/mul:0) = ] [2250000] ..." -> "image is larger than max_image_pixels=1000000;
    received 2250000".
    """
    text = text.replace("\\'", "'")
    assertion = re.search(r"assertion failed: \[([^\]]*)\]", text)
    if assertion:
        message = re.sub(r"\s*\([^()]*first value below[^()]*\)", "", assertion.group(1))
        value = re.search(r"\[x \([^)]*\) = \] \[([^\]]*)\]", text)
        return message + (f"; received {value.group(1)}" if value else "")
    noise = ("Graph execution error", "Detected at node", "<stack traces", "[[")
    lines = [line.strip() for line in text.splitlines()]
    useful = [line for line in lines if line and not line.startswith(noise)]
    line = useful[0] if useful else text.strip()
    return re.sub(r"\s*\[Op:[^\]]*\]$", "", line)


def _refused_image(message: str) -> RequestError:
    status = 413 if "max_image_pixels" in message else 400
    return RequestError(status, f"the model could not read the image: {message}")


class LocalBackend:
    """Embeds encoded images with a model loaded in this process.

    The query bytes are written to a private temporary directory for the duration of the call
    (and deleted after it), because the `EmbeddingFunction` that `tfmir search` uses embeds
    image files; the same bytes then give the same embedding as `tfmir search` on that file.

    Args:
        model: a SavedModel from `tfmir export` (base or version directory) or a `.keras`
            checkpoint from `tfmir train`.
        resize_size: resize side for a `.keras` checkpoint (default: its `config.json`).

    Raises:
        ValueError: the model cannot be loaded (see `load_embedding_function`).
    """

    backend = "in-process"

    def __init__(self, model: str | os.PathLike, *, resize_size: int | None = None):
        from tfmir.index.embedding import load_embedding_function

        self.embed = load_embedding_function(model, resize_size=resize_size)
        self.fingerprint = self.embed.fingerprint
        self.preprocessing = self.embed.preprocessing
        self.description = self.embed.description
        self.kind = self.embed.kind

    def __call__(self, images: list[bytes]) -> np.ndarray:
        import tensorflow as tf

        from tfmir.data import Examples

        with tempfile.TemporaryDirectory(prefix="tfmir-serve-") as directory:
            paths = []
            for number, image in enumerate(images):
                paths.append(os.path.join(directory, f"query-{number}"))
                with open(paths[-1], "wb") as stream:
                    stream.write(image)
            examples = Examples(labels=np.zeros(len(paths), np.int64), sources="query",
                                ids=[str(number) for number in range(len(paths))],
                                class_names=("",), paths=paths)
            try:
                return self.embed(examples)
            except tf.errors.InvalidArgumentError as error:  # header checks, decoding
                raise _refused_image(model_error_message(error.message)) from error
            except ImageError as error:  # a format converted before the model
                raise RequestError(413 if error.too_large else 400,
                                   f"the image is {error}.") from None


class TFServingBackend:
    """Embeds encoded images by calling TF Serving's REST predict API.

    Args:
        url: the model's REST address, e.g. `http://localhost:8501/v1/models/tfmir` (or
            `.../versions/2`); `:predict` is appended.
        timeout: seconds to wait for an answer.

    Example:

    ```python
    embed = TFServingBackend("http://localhost:8501/v1/models/tfmir")
    vectors = embed([open("query.jpg", "rb").read()])
    ```
    """

    backend = "tf_serving"
    fingerprint = None  # TF Serving does not report the exported model's fingerprint
    kind = None  # known from the first answer: "hash" when it holds "bits"

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT_SECONDS):
        url = url.rstrip("/")
        if url.endswith(":predict"):
            url = url[:-len(":predict")]
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"tf_serving_url must be an http(s) URL such as "
                             f"http://localhost:8501/v1/models/tfmir. Received: {url!r}")
        self.url = url
        self.predict_url = url + ":predict"
        self.timeout = timeout
        self.description = f"TF Serving at {self.predict_url}"

    def __call__(self, images: list[bytes]) -> np.ndarray:
        body = json.dumps({"instances": [
            {"b64": base64.b64encode(_graph_bytes(image)).decode("ascii")} for image in images
        ]}).encode("utf-8")
        request = urllib.request.Request(self.predict_url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            detail = _error_detail(error)
            if error.code == 400:  # TF Serving's answer to InvalidArgument: the image
                raise _refused_image(model_error_message(detail)) from error
            raise BackendError(f"{self.predict_url} answered HTTP {error.code}: "
                               f"{detail[:500]}") from error
        except TimeoutError as error:
            raise BackendError(f"{self.predict_url} did not answer within {self.timeout} s.",
                               status=504) from error
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            status = 504 if isinstance(reason, TimeoutError) else 502
            raise BackendError(f"could not reach {self.predict_url}: {reason}",
                               status=status) from error
        except ValueError as error:
            raise BackendError(f"{self.predict_url} did not answer JSON: {error}") from error
        predictions = answer.get("predictions") if isinstance(answer, dict) else None
        if not isinstance(predictions, list):
            raise BackendError(f"{self.predict_url} answered without 'predictions': "
                               f"{str(answer)[:500]}")
        try:
            # With one output TF Serving gives a bare list per instance, else {name: value}: a
            # hashing model's export answers {"code": packed bytes, "bits": ±1}.
            hashed = any(isinstance(row, dict) and "bits" in row for row in predictions)
            rows = [row[("bits" if hashed else "embedding")] if isinstance(row, dict) else row
                    for row in predictions]
            embeddings = np.asarray(rows, dtype=np.float32)
        except (TypeError, ValueError, KeyError) as error:
            raise BackendError(f"{self.predict_url} answered predictions that are not "
                               f"embeddings: {error}") from error
        if embeddings.ndim != 2 or embeddings.shape[0] != len(images):
            raise BackendError(f"{self.predict_url} answered predictions of shape "
                               f"{embeddings.shape} for {len(images)} images.")
        self.kind = "hash" if hashed else "float"
        return embeddings


def _error_detail(error: urllib.error.HTTPError) -> str:
    text = error.read().decode("utf-8", "replace")
    try:
        return str(json.loads(text).get("error", text))
    except (ValueError, AttributeError):
        return text


def probe_image(side: int = 48) -> bytes:
    """A small PNG (a colour gradient) to check a model once before serving."""
    from PIL import Image

    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    pixels = np.stack([np.tile(ramp, (side, 1)), np.tile(ramp[:, None], (1, side)),
                       np.full((side, side), 128, np.uint8)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
