"""Sends images to a TF Serving model exported by `tfmir export` and prints their embeddings.

REST (default): one predict request in TF Serving's row format,

    POST http://HOST:8501/v1/models/NAME:predict
    {"signature_name": "serving_default", "instances": [{"b64": "<base64 of the file>"}, ...]}

gRPC (--grpc, port 8500): a PredictionService.Predict call, which needs
`pip install tensorflow-serving-api`.

    python tools/serving_client.py --model_name=tfmir query.png other.jpg
    python tools/serving_client.py --model_name=tfmir --output_json=embeddings.json query.png
    python tools/serving_client.py --grpc --model_name=tfmir query.png

The REST path uses only the Python standard library (no TensorFlow import).
"""

from __future__ import annotations

import base64
import json
import sys
import urllib.error
import urllib.request

from absl import app, flags

_HOST = flags.DEFINE_string("host", "localhost", "TF Serving host.")
_REST_PORT = flags.DEFINE_integer("rest_port", 8501, "TF Serving REST port (--rest_api_port).")
_GRPC_PORT = flags.DEFINE_integer("grpc_port", 8500, "TF Serving gRPC port (--port).")
_MODEL_NAME = flags.DEFINE_string("model_name", "tfmir", "The served model's name (--model_name).")
_MODEL_VERSION = flags.DEFINE_integer("model_version", None, "A specific version (default: the "
                                      "one TF Serving serves, normally the highest).")
_SIGNATURE = flags.DEFINE_string("signature_name", "serving_default", "Signature to call.")
_GRPC = flags.DEFINE_bool("grpc", False, "Use gRPC (needs tensorflow-serving-api) instead of REST.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write the embeddings to this JSON file.")
_TIMEOUT = flags.DEFINE_float("timeout", 30.0, "Request timeout in seconds.")

INPUT_KEY = "images"
OUTPUT_KEY = "embedding"


class ClientError(Exception):
    """A failed request, reported as one line."""


def rest_url(host: str, port: int, model_name: str, model_version: int | None = None) -> str:
    version = f"/versions/{model_version}" if model_version is not None else ""
    return f"http://{host}:{port}/v1/models/{model_name}{version}:predict"


def rest_request_body(images: list[bytes], signature_name: str = "serving_default") -> dict:
    """TF Serving's row-format body: binary inputs go in {"b64": ...} objects."""
    return {"signature_name": signature_name,
            "instances": [{"b64": base64.b64encode(image).decode("ascii")} for image in images]}


def predict_rest(images: list[bytes], *, url: str, signature_name: str,
                 timeout: float) -> list[list[float]]:
    body = json.dumps(rest_request_body(images, signature_name)).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read().decode("utf-8", "replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except ValueError:
            pass
        raise ClientError(f"{url} answered HTTP {error.code}: {detail}") from error
    except (urllib.error.URLError, OSError) as error:
        raise ClientError(f"could not reach {url}: {getattr(error, 'reason', error)}") from error
    except ValueError as error:
        raise ClientError(f"{url} did not answer JSON: {error}") from error
    if "predictions" not in answer:
        raise ClientError(f"{url} answered without 'predictions': {str(answer)[:500]}")
    # With one output TF Serving returns a bare list per instance, otherwise {name: value}.
    return [row[OUTPUT_KEY] if isinstance(row, dict) else row for row in answer["predictions"]]


def predict_grpc(images: list[bytes], *, host: str, port: int, model_name: str,
                 model_version: int | None, signature_name: str,
                 timeout: float) -> list[list[float]]:
    try:
        import grpc
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    except ImportError as error:
        raise ClientError("--grpc needs the TF Serving API: pip install tensorflow-serving-api "
                          f"(import failed: {error})") from error
    import tensorflow as tf

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if model_version is not None:
        request.model_spec.version.value = model_version
    request.inputs[INPUT_KEY].CopyFrom(
        tf.make_tensor_proto(images, dtype=tf.string, shape=[len(images)]))
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.Predict(request, timeout=timeout)
        except grpc.RpcError as error:
            raise ClientError(f"{host}:{port} answered {error.code().name}: "
                              f"{error.details()}") from error
    return tf.make_ndarray(response.outputs[OUTPUT_KEY]).tolist()


def main(argv) -> None:
    paths = argv[1:]
    if not paths:
        raise app.UsageError("give one or more image files (JPEG or PNG) after the flags")
    try:
        images = []
        for path in paths:
            try:
                with open(path, "rb") as stream:
                    images.append(stream.read())
            except OSError as error:
                raise ClientError(f"cannot read {path}: {error.strerror}") from error
        if _GRPC.value:
            where = f"{_HOST.value}:{_GRPC_PORT.value} (gRPC)"
            embeddings = predict_grpc(images, host=_HOST.value, port=_GRPC_PORT.value,
                                      model_name=_MODEL_NAME.value,
                                      model_version=_MODEL_VERSION.value,
                                      signature_name=_SIGNATURE.value, timeout=_TIMEOUT.value)
        else:
            where = rest_url(_HOST.value, _REST_PORT.value, _MODEL_NAME.value, _MODEL_VERSION.value)
            embeddings = predict_rest(images, url=where, signature_name=_SIGNATURE.value,
                                      timeout=_TIMEOUT.value)
        if len(embeddings) != len(paths):
            raise ClientError(f"sent {len(paths)} images but received {len(embeddings)} embeddings")
    except ClientError as error:
        sys.exit(f"serving_client: error: {error}")

    print(f"{len(embeddings)} embedding(s) from {where}, signature {_SIGNATURE.value}:")
    for path, embedding in zip(paths, embeddings):
        print(f"  {path}: embedding shape ({len(embedding)},)")
    if _OUTPUT_JSON.value:
        with open(_OUTPUT_JSON.value, "w") as stream:
            json.dump({"model_name": _MODEL_NAME.value, "signature_name": _SIGNATURE.value,
                       "embeddings": [{"image": path, "embedding": embedding}
                                      for path, embedding in zip(paths, embeddings)]},
                      stream)
        print(f"Wrote {_OUTPUT_JSON.value}")


if __name__ == "__main__":
    app.run(main)
