"""`tfmir serve` under load: 2,000 requests from 8 threads, 5 % of them malformed.

A real server process (`tfmir serve` on a free loopback port, the tiny model and ScaNN index of
`build_archive`). Every request must get its documented answer, none a 5xx, and the server's
resident memory must stay bounded. Prints the request count, the statuses, the server's RSS
before and after and the wall time:

    python -m pytest -m large tests/serving/test_load_large.py -s
"""

import collections
import http.client
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time

import pytest

from tests.serving import as_png, assert_same_answer, build_archive, multipart

pytestmark = pytest.mark.large

NUM_REQUESTS = 2000
NUM_THREADS = 8
MALFORMED_EVERY = 20  # 5 %
K = 4
# Growth of the server's RSS allowed over the 2,000 requests, after a warm-up that traced the
# model and started every connection thread. A leak of anything a request allocates (its ~19 KB
# body, its 147 KB of decoded pixels, its JSON answer) would grow it by at least
# 1,900 × 19 KB = 36 MB; what legitimately remains is allocator slack (glibc's per-thread malloc
# arenas, TensorFlow's per-thread caches), a few MB per connection thread.
MAX_RSS_GROWTH_MB = 32


@pytest.fixture(scope="module")
def archive(shared_data_dir, tmp_path_factory):
    return build_archive(tmp_path_factory.mktemp("archive"), shared_data_dir)


def _resident_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


@pytest.fixture(scope="module")
def server(archive, tmp_path_factory):
    """`tfmir serve --port=0`: yields (base URL, pid) once it prints its address."""
    if not os.path.exists(f"/proc/{os.getpid()}/status"):
        pytest.skip("reads the server's memory from /proc")
    with open(tmp_path_factory.mktemp("serve") / "stderr.txt", "w+") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tfmir.cli", "serve", f"--index={archive.index}",
             f"--model={archive.export}", "--port=0", f"--k={K}"],
            stdout=subprocess.PIPE, stderr=log, text=True)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in process.stdout],
                         daemon=True).start()
        try:
            line = lines.get(timeout=300)
        except queue.Empty:
            line = ""
        address = re.search(r" at (http://127\.0\.0\.1:\d+): ", line)
        if not address:
            process.kill()
            log.seek(0)
            pytest.fail(f"tfmir serve did not start: {line!r}\n{log.read()[-3000:]}")
        yield address.group(1), process.pid
        process.terminate()
        assert process.wait(timeout=60) == 0
        log.seek(0)
        errors = log.read()
    assert "Traceback" not in errors, errors[-3000:]


def _requests(archive):
    """(method, target, body, headers, expected status, words of the error) per request kind."""
    jpegs = [path.read_bytes() for path in archive.queries]
    png = as_png(archive.queries[0])
    no_image, no_image_type = multipart({"file": jpegs[0]})
    good = [("POST", "/search", jpeg, {"Content-Type": "image/jpeg"}, 200, None)
            for jpeg in jpegs]
    good.append(("POST", "/search?k=2", png, {"Content-Type": "image/png"}, 200, None))
    body, content_type = multipart({"image": jpegs[1]})
    good.append(("POST", "/search?source=derm", body, {"Content-Type": content_type}, 200, None))
    # The refusals of the module docstring of tfmir.serving.server, one of each kind.
    malformed = [
        ("POST", "/search", b"this is not an image", {"Content-Type": "image/jpeg"}, 400, "image"),
        ("POST", "/search", png[:200], {"Content-Type": "image/png"}, 400, "image"),
        ("POST", "/search", jpegs[2], {"Content-Type": "text/plain"}, 415,
         "Content-Type text/plain"),
        ("POST", "/search", no_image, {"Content-Type": no_image_type}, 400, "no field 'image'"),
        ("POST", "/search?k=0", jpegs[3], {"Content-Type": "image/jpeg"}, 400,
         "k must be at least 1"),
        ("POST", "/search?k=many", jpegs[3], {"Content-Type": "image/jpeg"}, 400,
         "k must be an integer"),
    ]
    return good, malformed


def _send(connection, method, target, body, headers):
    connection.request(method, target, body=body, headers=headers)
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def test_two_thousand_requests_get_their_answers_without_5xx_or_growing_memory(server, archive):
    base_url, pid = server
    host, port = base_url.removeprefix("http://").split(":")
    good, malformed = _requests(archive)
    # Warm-up, one connection: traces the model and gives each good request its answer.
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    expected = []
    for method, target, body, headers, _, _ in good:
        status, answer = _send(connection, method, target, body, headers)
        assert status == 200, answer
        expected.append(answer)
    connection.close()
    schedule = [malformed[(number // MALFORMED_EVERY) % len(malformed)]
                if number % MALFORMED_EVERY == 0 else number % len(good)
                for number in range(NUM_REQUESTS)]

    def client(thread_number, num_requests, answers):
        connection = http.client.HTTPConnection(host, int(port), timeout=120)
        try:
            for number in range(thread_number, num_requests, NUM_THREADS):
                request = schedule[number]
                method, target, body, headers, _, _ = (good[request] if isinstance(request, int)
                                                       else request)
                try:
                    answers.append((request, *_send(connection, method, target, body, headers)))
                except (OSError, http.client.HTTPException) as error:
                    answers.append((request, None, repr(error)))
                    connection.close()
        finally:
            connection.close()

    def load(num_requests):
        answers_by_thread = [[] for _ in range(NUM_THREADS)]
        threads = [threading.Thread(target=client,
                                    args=(number, num_requests, answers_by_thread[number]))
                   for number in range(NUM_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=1200)
        return [answer for thread_answers in answers_by_thread for answer in thread_answers]

    # A first round of every kind on 8 connections: what stays allocated after it (the model's
    # traced functions, thread pools, one handler thread per connection) is the baseline.
    load(len(good) * MALFORMED_EVERY)
    rss_before = _resident_mb(pid)
    start = time.monotonic()
    answers = load(NUM_REQUESTS)
    seconds = time.monotonic() - start
    rss_after = _resident_mb(pid)

    statuses = collections.Counter(status for _, status, _ in answers)
    print(f"\n{len(answers)} requests from {NUM_THREADS} threads in {seconds:.1f} s "
          f"({len(answers) / seconds:.0f}/s); statuses {dict(sorted(statuses.items(), key=str))}; "
          f"server RSS {rss_before:.1f} MB before, {rss_after:.1f} MB after "
          f"({rss_after - rss_before:+.1f} MB)")
    assert len(answers) == NUM_REQUESTS
    failures = [(request, answer) for request, status, answer in answers if status is None]
    assert not failures, failures[:5]
    assert not [status for status in statuses if status >= 500], statuses
    for request, status, answer in answers:
        if isinstance(request, int):
            assert status == 200, answer
            assert_same_answer(answer, expected[request], atol=1e-6)
        else:
            _, target, _, _, expected_status, words = request
            assert (status, list(answer)) == (expected_status, ["error"]), (target, answer)
            assert words in answer["error"], (target, answer)
    assert sum(not isinstance(request, int) for request, _, _ in answers) == \
        NUM_REQUESTS // MALFORMED_EVERY
    assert rss_after - rss_before < MAX_RSS_GROWTH_MB
