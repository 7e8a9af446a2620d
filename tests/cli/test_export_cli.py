"""`tfmir export` and `tools/serving_client.py` run as a user runs them: separate processes."""

import base64
import http.server
import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys
import threading
import zipfile

import keras
import numpy as np
import pytest
from PIL import Image

from tfmir.cli import export as export_command
from tfmir.export import DEFAULT_MAX_IMAGE_PIXELS, model_fingerprint, read_export_info
from tfmir.models import Embedder

SERVING_CLIENT = pathlib.Path(__file__).resolve().parents[2] / "tools" / "serving_client.py"


def run(*command, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, *command], capture_output=True, text=True,
                          timeout=timeout, env=env)


def tfmir(*args):
    return run("-m", "tfmir.cli", *args)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A `tfmir train` workdir in miniature: best.keras with config.json beside it."""
    workdir = tmp_path_factory.mktemp("run")
    keras.utils.set_random_seed(1)
    model = Embedder.from_preset("tiny")
    model.save(workdir / "best.keras")
    (workdir / "config.json").write_text(json.dumps(
        {"preset": "tiny", "model": {"image_size": 32}, "resize_size": 36}))
    return workdir / "best.keras"


def test_export_writes_a_tf_serving_version_directory(checkpoint, tmp_path):
    base = tmp_path / "serving"
    result = tfmir("export", f"--model={checkpoint}", f"--output={base}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(base) == ["1"] and (base / "1" / "saved_model.pb").is_file()
    assert f"to {base / '1'}" in result.stdout
    assert "serving_default(images: string [None]) -> {embedding: float32 [None, 128]}" in result.stdout
    assert ("embed_pixels(pixels: float32 [None, None, None, 3]) -> "
            "{embedding: float32 [None, 128]}") in result.stdout
    info = read_export_info(base)
    assert info["resize_size"] == 36  # from config.json
    assert info["model_fingerprint"] == model_fingerprint(keras.saving.load_model(checkpoint))

    again = tfmir("export", f"--model={checkpoint}", f"--output={base}")
    assert again.returncode != 0
    assert "already exists" in again.stderr and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr


def test_export_leaves_stderr_empty_unless_asked_for_tensorflow_logs(checkpoint, tmp_path):
    base = tmp_path / "serving"
    env = {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}
    command = [sys.executable, "-m", "tfmir.cli", "export", f"--model={checkpoint}",
               f"--output={base}"]
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    # Not TensorFlow's start-up lines ("failed call to cuInit" on a machine without a GPU), nor
    # the SavedModel writer's INFO lines (two of 1.4 KB listing renamed inputs, timings).
    assert quiet.stderr == ""
    loud = subprocess.run(command + ["--version=2", "--verbosity=0"], capture_output=True,
                          text=True, timeout=600, env=env)
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert "Assets written to" in loud.stderr  # the documented way to see them


def test_export_refuses_a_missing_model_file(tmp_path):
    result = tfmir("export", f"--model={tmp_path / 'nowhere.keras'}", f"--output={tmp_path}")
    assert result.returncode != 0
    assert "nowhere.keras does not exist" in result.stderr and "Traceback" not in result.stderr


def test_export_refuses_files_that_are_not_keras_checkpoints(tmp_path):
    not_a_zip = tmp_path / "broken.keras"
    not_a_zip.write_bytes(b"not a zip archive")
    result = tfmir("export", f"--model={not_a_zip}", "--resize_size=36", f"--output={tmp_path}")
    assert result.returncode != 0 and "not a valid .keras file" in result.stderr

    assert "Traceback" not in result.stderr
    # A zip that is not a Keras archive fails in Keras; the command reports it in one line. (In
    # this process: a subprocess would spend seconds importing Keras for the same check.)
    wrong_zip = tmp_path / "other.keras"
    with zipfile.ZipFile(wrong_zip, "w") as archive:
        archive.writestr("readme.txt", "not a model")
    with pytest.raises(export_command.ExportError,
                       match=f"could not load --model={wrong_zip} as a Keras model"):
        export_command.load_model(str(export_command.check_model_path(str(wrong_zip))))
    assert sorted(os.listdir(tmp_path)) == ["broken.keras", "other.keras"]


def test_export_needs_a_resize_size_without_config_json(checkpoint, tmp_path):
    lone = tmp_path / "model.keras"
    lone.write_bytes(checkpoint.read_bytes())
    result = tfmir("export", f"--model={lone}", f"--output={tmp_path / 'serving'}")
    assert result.returncode != 0
    assert "--resize_size is required" in result.stderr and "config.json" in result.stderr


def test_export_flag_default_is_the_library_default():
    assert export_command.DEFAULT_MAX_IMAGE_PIXELS == DEFAULT_MAX_IMAGE_PIXELS


# --- tools/serving_client.py against a fake TF Serving REST endpoint on loopback ---

class _FakeServing(http.server.BaseHTTPRequestHandler):
    """Answers like TF Serving's REST predict API: one embedding per instance."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append({"path": self.path, "body": json.loads(body),
                                     "content_type": self.headers["Content-Type"]})
        status, answer = self.server.answer(json.loads(body))
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_serving():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeServing)
    server.requests = []
    # With a single output TF Serving returns a bare list per instance.
    server.answer = lambda body: (200, {"predictions": [[0.5] * 128 for _ in body["instances"]]})
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def image_files(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name, format_name in (("a.png", "PNG"), ("b.jpg", "JPEG")):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(buffer, format_name)
        paths.append(tmp_path / name)
        paths[-1].write_bytes(buffer.getvalue())
    return paths


def test_serving_client_sends_the_rest_predict_request(fake_serving, image_files, tmp_path):
    output = tmp_path / "embeddings.json"
    result = run(str(SERVING_CLIENT), "--host=127.0.0.1",
                 f"--rest_port={fake_serving.server_address[1]}", "--model_name=tfmir",
                 f"--output_json={output}", *map(str, image_files))
    assert result.returncode == 0, result.stderr[-3000:]
    (request,) = fake_serving.requests
    assert request["path"] == "/v1/models/tfmir:predict"
    assert request["content_type"] == "application/json"
    assert request["body"] == {
        "signature_name": "serving_default",
        "instances": [{"b64": base64.b64encode(path.read_bytes()).decode()} for path in image_files],
    }
    assert result.stdout.count("embedding shape (128,)") == 2
    written = json.loads(output.read_text())
    assert [item["image"] for item in written["embeddings"]] == [str(p) for p in image_files]
    assert all(item["embedding"] == [0.5] * 128 for item in written["embeddings"])


def test_serving_client_reports_serving_errors(fake_serving, image_files):
    fake_serving.answer = lambda body: (400, {"error": "Invalid PNG data, size 12"})
    result = run(str(SERVING_CLIENT), "--host=127.0.0.1",
                 f"--rest_port={fake_serving.server_address[1]}", "--model_version=3",
                 str(image_files[0]))
    assert result.returncode != 0
    assert fake_serving.requests[0]["path"] == "/v1/models/tfmir/versions/3:predict"
    assert "HTTP 400: Invalid PNG data, size 12" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorflow_serving") is not None,
                    reason="tensorflow-serving-api is installed")
def test_serving_client_grpc_asks_for_the_serving_api(image_files):
    result = run(str(SERVING_CLIENT), "--grpc", str(image_files[0]))
    assert result.returncode != 0
    assert "pip install tensorflow-serving-api" in result.stderr
