"""Helpers shared by the serving tests: a tiny archive of real PH2 images, HTTP, an exact oracle.

`build_archive` writes a tiny model (`.keras` with its config.json, and a SavedModel export whose
own pixel guard is `EXPORT_MAX_IMAGE_PIXELS`) and a ScaNN index of 24 real PH2 dermoscopy images
in two sources ("skin", "derm") and two labels. `exact_answer` is the oracle: NumPy brute force
over the index's stored vectors and table, and an explicit majority vote (ties to the nearest).
"""

import dataclasses
import http.client
import io
import json
import pathlib
import urllib.parse

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
