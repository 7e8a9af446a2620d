"""`tfmir serve` run as a user runs it: a subprocess on a free loopback port, real HTTP clients."""

import http.client
import json
import os
import queue
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from tests.serving import (EXPORT_MAX_IMAGE_PIXELS, NUM_INDEXED, as_png, assert_same_answer,
                           build_archive, exact_answer, multipart, png_header, request, search)

K = 4
MAX_REQUEST_BYTES = 300_000
MAX_IMAGE_PIXELS = 4_000_000  # above the export's own guard (EXPORT_MAX_IMAGE_PIXELS)


def _environment():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


def tfmir(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "tfmir.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=_environment())


@pytest.fixture(scope="module")
def archive(shared_data_dir, tmp_path_factory):
    return build_archive(tmp_path_factory.mktemp("archive"), shared_data_dir)


@pytest.fixture(scope="module")
def server(archive):
    """`tfmir serve --port=0` as a subprocess; yields its base URL once /healthz answers."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tfmir.cli", "serve", f"--index={archive.index}",
         f"--model={archive.export}", "--port=0", f"--k={K}",
         f"--max_request_bytes={MAX_REQUEST_BYTES}", f"--max_image_pixels={MAX_IMAGE_PIXELS}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_environment())
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout],
                     daemon=True).start()
    errors = []
    threading.Thread(target=lambda: errors.extend(process.stderr), daemon=True).start()
    try:
        line = lines.get(timeout=300)
    except queue.Empty:
        line = ""
    if not re.search(r" at http://127\.0\.0\.1:\d+: ", line):
        process.kill()
        pytest.fail(f"tfmir serve did not start: {line!r}\n{''.join(errors)[-3000:]}")
    base_url = re.search(r" at (http://127\.0\.0\.1:\d+): ", line).group(1)
    status, health, _ = request(f"{base_url}/healthz")
    assert status == 200, health
    yield base_url
    process.terminate()
    assert process.wait(timeout=60) == 0, "".join(errors)[-3000:]
    assert not any("Traceback" in line for line in errors), "".join(errors)[-3000:]


@pytest.fixture(scope="module")
def embed(archive):
    from tfmir.data import Examples
    from tfmir.index.embedding import load_embedding_function

    embed_function = load_embedding_function(archive.export)

    def embed_file(path):
        return embed_function(Examples(labels=[0], sources="query", ids=["q"],
                                       class_names=("",), paths=[str(path)]))[0]

    return embed_file


def test_healthz_describes_the_index_and_the_model(server, archive):
    status, health, headers = request(f"{server}/healthz")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert health == {"status": "ok", "count": NUM_INDEXED, "kind": "scann", "metric": "cosine",
                      "dimension": 128, "model_fingerprint": archive.fingerprint,
                      "fingerprint_checked": True, "backend": "in-process", "k": K,
                      "sources": ["derm", "skin"]}


def test_search_answers_jpeg_png_and_multipart_like_exact_search(server, archive, embed,
                                                                 tmp_path):
    query = archive.indexed[3]  # an indexed image: it must come back first, with cosine 1
    expected = exact_answer(archive, embed(query), K)
    jpeg = query.read_bytes()
    body, content_type = multipart({"note": b"ignored", "image": jpeg})
    answers = [search(server, jpeg),
               search(server, jpeg, content_type="application/octet-stream"),
               search(server, body, content_type=content_type)]
    for status, answer in answers:
        assert status == 200, answer
        assert_same_answer(answer, expected)
    first = answers[0][1]["results"][0]
    assert first["id"] == f"skin/{query.name}" and first["score"] == pytest.approx(1.0, abs=1e-4)
    assert [row["rank"] for row in answers[0][1]["results"]] == list(range(1, K + 1))

    png = tmp_path / "query.png"
    png.write_bytes(as_png(archive.queries[5]))
    status, answer = search(server, png.read_bytes(), content_type="image/png")
    assert status == 200, answer
    assert_same_answer(answer, exact_answer(archive, embed(png), K))


def test_k_and_source_filter_match_tfmir_search(server, archive, embed, tmp_path):
    queries = archive.queries[:2]
    png_query = tmp_path / "query.png"
    png_query.write_bytes(as_png(queries[1]))
    result = tfmir("search", f"--index={archive.index}", f"--model={archive.export}", "--k=3",
                   "--source=derm", queries[0], png_query)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)
    for image, content_type, entry, path in [
            (queries[0].read_bytes(), "image/jpeg", printed[0], queries[0]),
            (png_query.read_bytes(), "image/png", printed[1], png_query)]:
        status, answer = search(server, image, "k=3&source=derm", content_type)
        assert status == 200, answer
        assert_same_answer(answer, {key: entry[key] for key in ("results", "predicted_label")})
        assert_same_answer(answer, exact_answer(archive, embed(path), 3, source="derm"))
        assert {row["source"] for row in answer["results"]} == {"derm"}


def test_concurrent_requests_each_get_the_answer_for_their_image(server, archive):
    images = [path.read_bytes() for path in archive.queries]
    sequential = [search(server, image) for image in images]
    assert all(status == 200 for status, _ in sequential)
    assert len({json.dumps(answer["results"][0]) for _, answer in sequential}) > 1
    barrier = threading.Barrier(len(images))
    concurrent = [None] * len(images)

    def send(number):
        barrier.wait()
        concurrent[number] = search(server, images[number])

    threads = [threading.Thread(target=send, args=(number,)) for number in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    for (status, answer), (_, expected) in zip(concurrent, sequential):
        assert status == 200, answer
        assert_same_answer(answer, expected, atol=1e-6)


def test_one_connection_carries_several_requests(server, archive):
    """HTTP/1.1 keep-alive: answers, refusals after a read body included, on one socket."""
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    jpeg = archive.queries[1].read_bytes()
    answers = []
    try:
        for method, target, body in [("POST", "/search?k=2", jpeg),
                                     ("POST", "/search?k=2", b"not an image"),
                                     ("POST", "/search?k=0", jpeg), ("GET", "/healthz", None),
                                     ("POST", "/search?k=2", jpeg)]:
            connection.request(method, target, body=body,
                               headers={"Content-Type": "image/jpeg"} if body else {})
            response = connection.getresponse()
            answers.append((response.status, json.loads(response.read())))
            assert response.getheader("Connection") != "close"
            if len(answers) == 1:
                first_socket = connection.sock
            assert connection.sock is first_socket  # never reconnected
    finally:
        connection.close()
    assert [status for status, _ in answers] == [200, 400, 400, 200, 200]
    assert_same_answer(answers[4][1], answers[0][1], atol=1e-6)


def _raw_request(server, method, target, headers):
    """Sends only the request line and headers (no body) and reads the answer."""
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _refusals(archive):
    jpeg = archive.queries[0].read_bytes()
    no_image, no_image_type = multipart({"file": jpeg})
    png = as_png(archive.queries[0])
    return [
        # (method, target, body, content type, status, words the error must contain)
        ("POST", "/search", b"", "image/jpeg", 400, "empty"),
        ("POST", "/search", b"plain text, not an image", "image/jpeg", 400,
         "not in a known image format"),
        ("POST", "/search", b"GIF89a truncated", "image/jpeg", 400, "corrupt"),
        ("POST", "/search", jpeg[:600], "image/jpeg", 400, "image"),
        ("POST", "/search", png[:200], "image/png", 400, "PNG"),
        ("POST", "/search", png_header(100_000, 100_000), "image/png", 413,
         f"max_image_pixels={MAX_IMAGE_PIXELS}"),
        # Passes the server's limit, stopped by the SavedModel's own guard: still a 413.
        ("POST", "/search", png_header(1500, 1500), "image/png", 413,
         f"max_image_pixels={EXPORT_MAX_IMAGE_PIXELS}"),
        ("POST", "/search", b"x" * (MAX_REQUEST_BYTES + 1), "image/jpeg", 413,
         f"max_request_bytes={MAX_REQUEST_BYTES}"),
        ("POST", "/search", jpeg, "text/plain", 415, "Content-Type text/plain"),
        ("POST", "/search", jpeg, None, 415, "no Content-Type"),
        ("POST", "/search", no_image, no_image_type, 400, "no field 'image'"),
        ("POST", "/search", jpeg, "multipart/form-data", 400, "boundary"),
        ("POST", "/search?k=0", jpeg, "image/jpeg", 400, "k must be at least 1"),
        ("POST", "/search?k=-2", jpeg, "image/jpeg", 400, "k must be at least 1"),
        ("POST", "/search?k=2.5", jpeg, "image/jpeg", 400, "k must be an integer"),
        ("POST", "/search?k=many", jpeg, "image/jpeg", 400, "k must be an integer"),
        ("POST", "/search?k=99999999999999999999", jpeg, "image/jpeg", 400,
         "k is far larger than any index. Received: k=99999999999999999999"),
        ("POST", f"/search?k={NUM_INDEXED + 1}", jpeg, "image/jpeg", 400,
         f"larger than the index ({NUM_INDEXED} items)"),
        ("POST", "/search?k=13&source=skin", jpeg, "image/jpeg", 400,
         "larger than source 'skin' (12 items)"),
        ("POST", "/search?source=xray", jpeg, "image/jpeg", 400, "source 'xray' is not in"),
        ("POST", "/search?k=2&k=3", jpeg, "image/jpeg", 400, "more than once"),
        ("POST", "/search?top=3", jpeg, "image/jpeg", 400, "unknown query parameter"),
        ("GET", "/search", None, None, 405, "use POST"),
        ("POST", "/healthz", b"", "image/jpeg", 405, "use GET"),
        ("DELETE", "/search", None, None, 405, "use POST"),
        ("GET", "/", None, None, 404, "unknown path '/'"),
        ("POST", "/search/", jpeg, "image/jpeg", 404, "unknown path"),
    ]


def test_refusals_name_the_problem_and_the_server_keeps_serving(server, archive):
    jpeg = archive.queries[0].read_bytes()
    _, before = search(server, jpeg)
    for method, target, body, content_type, status, words in _refusals(archive):
        headers = {"Content-Type": content_type} if content_type else {}
        answer_status, answer, answer_headers = request(f"{server}{target}", method, body,
                                                        headers)
        assert (answer_status, list(answer)) == (status, ["error"]), (target, answer)
        assert words in answer["error"], (target, answer)
        if status == 405:
            assert answer_headers["Allow"] == ("GET" if target == "/healthz" else "POST")
    # A client that announces a huge body gets its 413 before sending any of it ...
    status, answer = _raw_request(server, "POST", "/search",
                                  {"Content-Type": "image/jpeg", "Content-Length": str(10**12)})
    assert status == 413 and f"max_request_bytes={MAX_REQUEST_BYTES}" in answer["error"]
    # ... and so does one that sends `Expect: 100-continue` (curl, for large files).
    status, answer = _raw_request(server, "POST", "/search",
                                  {"Content-Type": "image/jpeg", "Expect": "100-continue",
                                   "Content-Length": str(MAX_REQUEST_BYTES + 1)})
    assert status == 413 and f"max_request_bytes={MAX_REQUEST_BYTES}" in answer["error"]
    status, answer = _raw_request(server, "POST", "/search", {"Content-Type": "image/jpeg"})
    assert status == 411 and "Content-Length is required" in answer["error"]
    # urllib, as most clients do, sends the whole too-large body first and still reads the 413.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(
            f"{server}/search", data=b"\xff" * (3 * MAX_REQUEST_BYTES), method="POST",
            headers={"Content-Type": "image/jpeg"}), timeout=120)
    assert refused.value.code == 413
    assert "max_request_bytes" in json.loads(refused.value.read())["error"]

    status, health, _ = request(f"{server}/healthz")
    assert status == 200 and health["count"] == NUM_INDEXED
    status, after = search(server, jpeg)
    assert status == 200
    assert_same_answer(after, before, atol=1e-6)


def test_serve_refuses_bad_flags_before_serving(archive, tmp_path):
    result = tfmir("serve", f"--index={tmp_path / 'missing'}", f"--model={archive.export}")
    assert result.returncode != 0 and "is not a directory" in result.stderr
    result = tfmir("serve", f"--index={archive.index}")
    assert result.returncode != 0 and "give --model" in result.stderr
