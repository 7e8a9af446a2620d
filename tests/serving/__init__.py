"""Helpers shared by the serving tests: a tiny archive of real PH2 images, HTTP, an exact oracle,
and a stand-in for TF Serving's REST API.

`build_archive` writes a tiny model (`.keras` with its config.json, and a SavedModel export whose
own pixel guard is `EXPORT_MAX_IMAGE_PIXELS`) and a ScaNN index of 24 real PH2 dermoscopy images
in two sources ("skin", "derm") and two labels. `exact_answer` is the oracle: NumPy brute force
over the index's stored vectors and table, and an explicit majority vote (ties to the nearest).
"""

import base64
import dataclasses
import http.client
import io
import json
import pathlib
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

NUM_INDEXED = 24
NUM_QUERIES = 16
EXPORT_MAX_IMAGE_PIXELS = 1_000_000
RESIZE_SIZE = 36


@dataclasses.dataclass
class Archive:
    checkpoint: pathlib.Path
    export: pathlib.Path
    fingerprint: str
    index: pathlib.Path
    indexed: list  # paths of the indexed images, in index row order
    queries: list  # paths of other PH2 images, not in the index


def build_archive(root: pathlib.Path, shared_data_dir: pathlib.Path, seed: int = 1) -> Archive:
    import keras

    from tfmir.data import Examples
    from tfmir.export import export_saved_model, model_fingerprint
    from tfmir.index import ScannIndex
    from tfmir.index.embedding import load_embedding_function
    from tfmir.models import Embedder

    images = sorted((shared_data_dir / "ph2" / "images").glob("*.jpg"))
    indexed, queries = images[:NUM_INDEXED], images[NUM_INDEXED:NUM_INDEXED + NUM_QUERIES]
    root.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(seed)
    model = Embedder.from_preset("tiny")
    model.save(root / "best.keras")
    (root / "config.json").write_text(json.dumps({"resize_size": RESIZE_SIZE}))
    export_saved_model(model, root / "export" / "1", resize_size=RESIZE_SIZE,
                       max_image_pixels=EXPORT_MAX_IMAGE_PIXELS)
    fingerprint = model_fingerprint(model)

    embed = load_embedding_function(root / "export")
    paths = [str(path) for path in indexed]
    vectors = embed(Examples(labels=np.zeros(len(paths), np.int64), sources="x",
                             ids=paths, class_names=("",), paths=paths))
    half = NUM_INDEXED // 2
    sources = ["skin" if row < half else "derm" for row in range(NUM_INDEXED)]
    labels = ["nevus" if row % half < half // 2 else "melanoma" for row in range(NUM_INDEXED)]
    ids = [f"{source}/{path.name}" for source, path in zip(sources, indexed)]
    index = ScannIndex(metric="cosine", dimension=vectors.shape[1], model_fingerprint=fingerprint)
    index.build(vectors, ids=ids, labels=labels, sources=sources, paths=paths)
    index.save(root / "index")
    return Archive(checkpoint=root / "best.keras", export=root / "export",
                   fingerprint=fingerprint, index=root / "index", indexed=indexed,
                   queries=queries)


def as_png(path) -> bytes:
    buffer = io.BytesIO()
    with Image.open(path) as image:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A small PNG whose header promises width × height pixels: a decompression bomb's shape."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def multipart(fields: dict, boundary: str = "tfmir-test-boundary-7d1f") -> tuple[bytes, str]:
    """A multipart/form-data body of file fields {name: bytes} and its Content-Type."""
    body = b""
    for name, data in fields.items():
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                 f"filename=\"{name}.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                 ).encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def request(url: str, method: str = "GET", body: bytes | None = None,
            headers: dict | None = None, timeout: float = 120) -> tuple[int, dict, dict]:
    """One HTTP request on a fresh connection: (status, JSON answer, response headers)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request(method, target, body=body, headers=headers or {})
        response = connection.getresponse()
        payload = json.loads(response.read())
        return response.status, payload, dict(response.getheaders())
    finally:
        connection.close()


def search(base_url: str, image: bytes, query: str = "",
           content_type: str = "image/jpeg") -> tuple[int, dict]:
    status, payload, _ = request(f"{base_url}/search{'?' + query if query else ''}", "POST",
                                 image, {"Content-Type": content_type})
    return status, payload


def exact_answer(archive: Archive, embedding, k: int, source=None) -> dict:
    """The oracle: top-k by NumPy brute-force cosine, and the majority label (ties: nearest)."""
    vectors = np.load(archive.index / "vectors.npy")
    rows = [json.loads(line) for line in (archive.index / "table.jsonl").read_text().splitlines()]
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    query = np.asarray(embedding, np.float64).ravel()
    scores = vectors @ (query / np.linalg.norm(query))
    order = [row for row in np.argsort(-scores, kind="stable")
             if source is None or rows[row]["source"] == source][:k]
    results = [{**rows[row], "score": float(scores[row]), "rank": rank}
               for rank, row in enumerate(order, start=1)]
    votes = {}
    for result in results:
        votes[result["label"]] = votes.get(result["label"], 0) + 1
    most = max(votes.values())
    predicted = next(result["label"] for result in results if votes[result["label"]] == most)
    return {"results": results, "predicted_label": predicted}


def assert_same_answer(answer: dict, expected: dict, atol: float = 1e-5) -> None:
    """Same ids, labels, sources, paths and ranks in order; scores within atol."""
    assert [(row["id"], row["label"], row["source"], row["path"], row["rank"])
            for row in answer["results"]] == \
        [(row["id"], row["label"], row["source"], row["path"], row["rank"])
         for row in expected["results"]]
    np.testing.assert_allclose([row["score"] for row in answer["results"]],
                               [row["score"] for row in expected["results"]], atol=atol)
    assert answer["predicted_label"] == expected["predicted_label"]


class FakeTFServing(ThreadingHTTPServer):
    """TF Serving's REST predict API for model `tfmir`, answered by the real SavedModel.

    Answers as TF Serving's row format does: a bare value per instance when the signature has one
    output ({"predictions": [[...], ...]}), an object of named values when it has several (a
    hashing model's {"code", "bits"}).
    """

    daemon_threads = True

    def __init__(self, export):
        import tensorflow as tf

        from tfmir.export import resolve_export_directory

        self.signature = tf.saved_model.load(
            resolve_export_directory(export)).signatures["serving_default"]
        self.requests = []
        self.failure = None  # (status, payload) to answer instead, e.g. (503, {...})
        super().__init__(("127.0.0.1", 0), _FakeTFServingHandler)

    @property
    def model_url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1/models/tfmir"


class _FakeTFServingHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        import tensorflow as tf

        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.server.failure:
            return self._answer(*self.server.failure)
        if self.path != "/v1/models/tfmir:predict":
            return self._answer(404, {"error": "Servable not found for request"})
        images = [base64.b64decode(instance["b64"]) for instance in body["instances"]]
        try:
            outputs = self.server.signature(images=tf.constant(images))
        except tf.errors.InvalidArgumentError as error:  # what TF Serving answers 400 for
            return self._answer(400, {"error": error.message})
        values = {name: value.numpy().tolist() for name, value in outputs.items()}
        if len(values) == 1:
            (predictions,) = values.values()
        else:
            predictions = [dict(zip(values, row)) for row in zip(*values.values())]
        self._answer(200, {"predictions": predictions})

    def _answer(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass
