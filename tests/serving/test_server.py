"""`tfmir.serving`: the Python API in threads, the TF Serving backend, startup checks, parsing."""

import base64
import http.client
import json
import logging
import select
import socket
import threading
import time

import numpy as np
import pytest

from tests.serving import (EXPORT_MAX_IMAGE_PIXELS, NUM_INDEXED, RESIZE_SIZE, FakeTFServing,
                           as_png, assert_same_answer, build_archive, multipart, png_header,
                           request, search)
from tfmir.serving import (DEFAULT_MAX_IMAGE_PIXELS, RequestError, SearchError, SearchServer,
                           check_image, make_server)
from tfmir.serving.backends import model_error_message
from tfmir.serving.server import multipart_field


@pytest.fixture(scope="module")
def archive(shared_data_dir, tmp_path_factory):
    return build_archive(tmp_path_factory.mktemp("archive"), shared_data_dir)


class _Running:
    """A `make_server` server serving in a thread (`with _Running(...) as url:`)."""

    def __init__(self, *args, **kwargs):
        self.server = make_server(*args, **kwargs)

    def __enter__(self) -> str:
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self.server.url

    def __exit__(self, *exc_info):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=60)


@pytest.fixture(scope="module")
def tf_serving(archive):
    fake = FakeTFServing(archive.export)
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()
    yield fake
    fake.shutdown()
    fake.server_close()


@pytest.fixture(scope="module")
def in_process(archive):
    with _Running(archive.index, archive.export, k=3) as url:
        yield url


def _queries(archive):
    """(bytes, content type) of JPEG files and of a PNG."""
    return ([(path.read_bytes(), "image/jpeg") for path in archive.queries[:3]]
            + [(as_png(archive.queries[4]), "image/png")])


def test_make_server_serves_in_a_thread_on_a_free_loopback_port(in_process, archive):
    assert in_process.startswith("http://127.0.0.1:") and not in_process.endswith(":0")
    status, health, _ = request(f"{in_process}/healthz")
    assert status == 200
    assert (health["count"], health["model_fingerprint"], health["k"]) == \
        (NUM_INDEXED, archive.fingerprint, 3)
    status, answer = search(in_process, archive.indexed[0].read_bytes())
    assert status == 200 and len(answer["results"]) == 3
    assert answer["results"][0]["id"] == f"skin/{archive.indexed[0].name}"


def test_keras_checkpoint_answers_like_its_saved_model(in_process, archive):
    with _Running(archive.index, archive.checkpoint, k=3) as keras_url:
        for image, content_type in _queries(archive):
            _, expected = search(in_process, image, content_type=content_type)
            status, answer = search(keras_url, image, content_type=content_type)
            assert status == 200, answer
            # The same weights and preprocessing through Keras instead of the exported graph.
            assert_same_answer(answer, expected, atol=1e-5)


def test_tf_serving_backend_answers_like_the_in_process_model(in_process, archive, tf_serving,
                                                              caplog):
    for model in (None, archive.export):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            server = _Running(archive.index, model, k=3, tf_serving_url=tf_serving.model_url,
                              max_image_pixels=4 * EXPORT_MAX_IMAGE_PIXELS)
        warned = "cannot be checked against the index" in caplog.text
        assert warned == (model is None)
        with server as url:
            status, health, _ = request(f"{url}/healthz")
            assert (health["backend"], health["fingerprint_checked"]) == \
                ("tf_serving", model is not None)
            sent = len(tf_serving.requests)
            for image, content_type in _queries(archive):
                _, expected = search(in_process, image, "k=5&source=derm", content_type)
                status, answer = search(url, image, "k=5&source=derm", content_type)
                assert status == 200, answer
                assert_same_answer(answer, expected, atol=1e-6)
            assert len(tf_serving.requests) == sent + len(_queries(archive))
            assert tf_serving.requests[-1] == {
                "instances": [{"b64": base64.b64encode(as_png(archive.queries[4])).decode()}]}
            # TF Serving refuses an image over the export's own guard: a 413, not a 5xx.
            status, answer = search(url, png_header(1500, 1500), content_type="image/png")
            assert status == 413 and \
                f"max_image_pixels={EXPORT_MAX_IMAGE_PIXELS}" in answer["error"], answer


def test_tf_serving_failures_are_5xx_and_the_server_recovers(archive):
    fake = FakeTFServing(archive.export)
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    image = archive.queries[0].read_bytes()
    with _Running(archive.index, None, tf_serving_url=fake.model_url) as url:
        fake.failure = (503, {"error": "model is loading"})
        status, answer = search(url, image)
        assert status == 502 and "answered HTTP 503: model is loading" in answer["error"]
        fake.failure = None
        status, answer = search(url, image)
        assert status == 200 and len(answer["results"]) == 8
        fake.shutdown()
        fake.server_close()
        status, answer = search(url, image)
        assert status == 502 and f"could not reach {fake.model_url}:predict" in answer["error"]
        status, health, _ = request(f"{url}/healthz")
        assert status == 200 and health["backend"] == "tf_serving"


def test_startup_refuses_what_does_not_belong_together(archive, tf_serving, tmp_path):
    import keras

    from tfmir.export import model_fingerprint
    from tfmir.index import ExactIndex
    from tfmir.models import Embedder

    keras.utils.set_random_seed(2)
    other = Embedder.from_preset("tiny")
    other.save(tmp_path / "other.keras")
    (tmp_path / "config.json").write_text(json.dumps({"resize_size": RESIZE_SIZE}))
    with pytest.raises(SearchError, match="the model does not match the index") as refused:
        make_server(archive.index, tmp_path / "other.keras")
    assert archive.fingerprint in str(refused.value)
    assert model_fingerprint(other) in str(refused.value)
    with pytest.raises(SearchError, match="the model does not match the index"):
        make_server(archive.index, tmp_path / "other.keras",
                    tf_serving_url=tf_serving.model_url)

    # Without a local model only the dimension can be checked, and it is.
    small = tmp_path / "small_index"
    ExactIndex(metric="cosine", dimension=3).build(np.eye(3), ids=["a", "b", "c"]).save(small)
    with pytest.raises(SearchError, match=r"shape \(128,\).*dimension 3"):
        make_server(small, None, k=2, tf_serving_url=tf_serving.model_url)

    with pytest.raises(SearchError, match=rf"k={NUM_INDEXED + 1} is larger than the index"):
        make_server(archive.index, archive.export, k=NUM_INDEXED + 1)
    with pytest.raises(SearchError, match="could not embed a test image"):
        make_server(archive.index, None, tf_serving_url="http://127.0.0.1:9/v1/models/tfmir")
    with pytest.raises(SearchError, match="a model is needed"):
        make_server(archive.index, None)
    with pytest.raises(SearchError, match="is not a directory"):
        make_server(tmp_path / "missing", archive.export)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        make_server(archive.index, archive.export, k=0)
    with pytest.raises(ValueError, match="max_request_bytes must be a positive integer"):
        make_server(archive.index, archive.export, max_request_bytes=0)


def test_check_image_reads_only_the_header(archive):
    from PIL import Image

    jpeg = archive.queries[0].read_bytes()
    with Image.open(archive.queries[0]) as image:
        width, height = image.size
    pixels = width * height
    assert check_image(jpeg, max_image_pixels=pixels) == (height, width)
    assert check_image(png_header(300, 200), max_image_pixels=60_000) == (200, 300)
    cases = [(b"", 400, "empty"), (b"plain text", 400, "not in a known image format"),
             (b"BM" + jpeg, 400, "corrupt"),
             (jpeg[:40], 400, "corrupt"), (png_header(300, 200)[:20], 400, "corrupt"),
             (jpeg, 413, f"{width} × {height} = {pixels} pixels, more than "
                         f"max_image_pixels={pixels - 1}"),
             # 10^10 pixels: far above PIL's own bomb limit, still judged by max_image_pixels.
             (png_header(100_000, 100_000), 413, f"max_image_pixels={pixels - 1}"),
             # A 1 × 1 image used to get a confident answer: below the documented minimum side.
             (png_header(1, 1), 400, "1 × 1 pixels, a side shorter than the minimum of 8"),
             (png_header(7, 300), 400, "7 × 300 pixels, a side shorter than the minimum of 8")]
    for data, status, words in cases:
        with pytest.raises(RequestError) as refused:
            check_image(data, max_image_pixels=pixels - 1)
        assert refused.value.status == status and words in refused.value.message


def test_multipart_field_returns_binary_contents_unchanged():
    rng = np.random.default_rng(0)
    data = b"\r\n--\r\n\r\n" + rng.integers(0, 256, 5000, dtype=np.uint8).tobytes() + b"\r\n"
    body, content_type = multipart({"comment": b"hello", "image": data})
    boundary = content_type.split("boundary=")[1]
    assert multipart_field(body, boundary, "image") == data
    assert multipart_field(body, boundary, "comment") == b"hello"
    with pytest.raises(RequestError, match=r"no field 'scan' \(fields: \['comment', 'image'\]\)"):
        multipart_field(body, boundary, "scan")
    with pytest.raises(RequestError, match="malformed"):
        multipart_field(b"no parts here", boundary, "image")
    # Two image fields: which one to search would be a guess.
    twice = body.replace(b"name=\"comment\"", b"name=\"image\"")
    with pytest.raises(RequestError, match="holds the field 'image' more than once; send one "
                                           "image per request") as refused:
        multipart_field(twice, boundary, "image")
    assert refused.value.status == 400


def test_model_error_message_keeps_the_line_that_matters():
    guard = ("Graph execution error:\n\nDetected at node map/while/Assert defined at (most recent "
             "call last):\n<stack traces unavailable>\nassertion failed: [image is larger than "
             "max_image_pixels=1000000 (height × width, read from its header; the first value "
             "below is the image\\'s pixel count)] [Condition x <= y did not hold element-wise:] "
             "[x (map/while/mul:0) = ] [2250000] [y (map/while/Const:0) = ] [1000000]\n\t "
             "[[{{node map/while/Assert}}]] [Op:__inference_signature_wrapper_1835]")
    assert model_error_message(guard) == \
        "image is larger than max_image_pixels=1000000; received 2250000"
    decode = ("Graph execution error:\n\nDetected at node map/while/DecodePng defined at (most "
              "recent call last):\n<stack traces unavailable>\nInvalid PNG data, size 68\n\t "
              "[[{{node map/while/DecodePng}}]] [Op:__inference_signature_wrapper_1835]")
    assert model_error_message(decode) == "Invalid PNG data, size 68"


def test_defaults_match_the_export_and_the_command():
    import subprocess
    import sys

    from tfmir.export import DEFAULT_MAX_IMAGE_PIXELS as EXPORT_DEFAULT
    from tfmir.serving import DEFAULT_MAX_REQUEST_BYTES

    # The CLI module defines absl flags: read its constants in another process.
    printed = subprocess.run(
        [sys.executable, "-c", "from tfmir.cli import serve; "
         "print(serve.DEFAULT_MAX_IMAGE_PIXELS, serve.DEFAULT_MAX_REQUEST_BYTES)"],
        capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert DEFAULT_MAX_IMAGE_PIXELS == EXPORT_DEFAULT == int(printed[0])
    assert DEFAULT_MAX_REQUEST_BYTES == int(printed[1])


class _HealthOnlyService:
    """Stands in for a `SearchService` where only the HTTP connection handling is under test."""

    def health(self):
        return {"status": "ok"}

    def search(self, image, k=None, source=None):
        return {"results": [], "predicted_label": None}


def test_keep_alive_announces_its_timeout_and_closes_idle_connections_cleanly():
    idle_timeout = 1
    server = SearchServer(("127.0.0.1", 0), _HealthOnlyService(), idle_timeout=idle_timeout)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)

    def get_health():
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
        return response

    try:
        response = get_health()
        assert response.status == 200
        assert response.getheader("Keep-Alive") == f"timeout={idle_timeout}"
        assert response.getheader("Connection") is None
        reused = connection.sock
        # A client that honours the announced timeout reuses the connection up to its end.
        time.sleep(idle_timeout)
        assert get_health().status == 200 and connection.sock is reused
        answered = time.monotonic()
        # Then the server ends the connection with a clean end of stream, not a reset ...
        readable, _, _ = select.select([reused], [], [], 30)
        assert readable and reused.recv(1, socket.MSG_PEEK) == b""
        assert time.monotonic() - answered >= idle_timeout
        # ... and a request that crosses the close is dropped without resetting the connection:
        # http.client sees a plain disconnect (a reset would raise a bare ConnectionResetError)
        # and the next request opens a new connection.
        with pytest.raises(http.client.RemoteDisconnected):
            get_health()
        connection.close()
        assert get_health().status == 200
        # A client that says it is done gets `Connection: close` and no Keep-Alive offer.
        connection.request("GET", "/healthz", headers={"Connection": "close"})
        response = connection.getresponse()
        response.read()
        assert response.getheader("Connection") == "close"
        assert response.getheader("Keep-Alive") is None
    finally:
        connection.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=60)
