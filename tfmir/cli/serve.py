"""`tfmir serve`: an HTTP JSON search service over an index built by `tfmir index`.

    tfmir serve --index=indexes/skin --model=exported/tfmir --port=8080
    curl -s -H 'Content-Type: image/jpeg' --data-binary @query.jpg \
        'http://127.0.0.1:8080/search?k=8'
    curl -s -F image=@query.jpg 'http://127.0.0.1:8080/search?k=4&source=skin'
    curl -s http://127.0.0.1:8080/healthz

`POST /search` answers `{"results": [{"id", "label", "source", "path", "score", "rank"}],
"predicted_label"}` (the per-query shape of `tfmir search`); refusals are JSON `{"error"}` with
a 4xx status (see `tfmir.serving.server`). Queries are embedded in-process with --model (the
model that built the index; its fingerprint is checked), or by TF Serving with --tf_serving_url
(then --model, if given, is only used to check the fingerprint of the export TF Serving serves).
A model that outputs hash codes serves its hamming index the same way (from TF Serving, the
"bits" output of its export is read); a float index is refused for it at startup.
A style database (paper 003) answers `POST /search?k=5&measure=I1_SE&mode=fast` with the
measure and mode named in its answer; an unknown measure is a 400 (see `tfmir.serving.style`).
Listens on the loopback interface unless --host says otherwise. Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import signal

from absl import app, flags

# tfmir.serving does not import TensorFlow: flag parsing stays fast.
from tfmir.serving import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_REQUEST_BYTES

_INDEX = flags.DEFINE_string("index", None, "Index directory written by `tfmir index`.",
                             required=True)
_MODEL = flags.DEFINE_string(
    "model", None, "The model that built the index: its SavedModel directory or the .keras "
    "checkpoint it was exported from (fingerprints must match). Optional with "
    "--tf_serving_url, where it names the export TF Serving serves, to check its fingerprint.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (loopback by default).")
_PORT = flags.DEFINE_integer("port", 8080, "Port to listen on; 0 picks a free one.",
                             lower_bound=0, upper_bound=65535)
_K = flags.DEFINE_integer("k", 8, "Results per query when a request gives no k.", lower_bound=1)
_TF_SERVING_URL = flags.DEFINE_string(
    "tf_serving_url", None, "Embed queries with TF Serving's REST API at this model URL, e.g. "
    "http://localhost:8501/v1/models/tfmir (POST <url>:predict), instead of in-process.")
_MAX_REQUEST_BYTES = flags.DEFINE_integer(
    "max_request_bytes", DEFAULT_MAX_REQUEST_BYTES, "Refuse (413) request bodies larger than "
    "this, before reading them.", lower_bound=1)
_MAX_IMAGE_PIXELS = flags.DEFINE_integer(
    "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS, "Refuse (413) images whose header gives more "
    "pixels (height × width) than this, before decoding them.", lower_bound=1)
_RESIZE_SIZE = flags.DEFINE_integer(
    "resize_size", None, "Resize side for a .keras --model (default: config.json beside it).",
    lower_bound=1)

# Style databases (paper 003; see tfmir.serving.style).
_SEGMENTER = flags.DEFINE_string(
    "segmenter", None, "Style databases: the .keras segmenter that built the database, to "
    "segment queries for the Dice measures (an empty predicted mask scores Dice 1 against an "
    "empty mask, 0 against any other).")
_MEASURE = flags.DEFINE_string(
    "measure", None, "Style databases: the measure of requests without `measure=` (default "
    "style); one of euclidean, cosine, style, I1_ED, I1_CD, I1_ECD, I1_SE, I1_SC, I1_SD.")
_MODE = flags.DEFINE_enum("mode", None, ["exact", "fast"], "Style databases: the mode of "
                          "requests without `mode=` (default exact).")
_CANDIDATES = flags.DEFINE_integer("candidates", None, "Style databases, fast mode: items taken "
                                   "from each candidate list (default 100).", lower_bound=1)


def _stop(signal_number, frame):
    raise KeyboardInterrupt


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _MODEL.value is None and _TF_SERVING_URL.value is None:
        raise SystemExit("tfmir serve: error: give --model (the model that built the index), "
                         "or --tf_serving_url.")
    from tfmir.serving import make_server

    try:
        server = make_server(_INDEX.value, _MODEL.value, host=_HOST.value, port=_PORT.value,
                             k=_K.value, tf_serving_url=_TF_SERVING_URL.value,
                             max_request_bytes=_MAX_REQUEST_BYTES.value,
                             max_image_pixels=_MAX_IMAGE_PIXELS.value,
                             resize_size=_RESIZE_SIZE.value, segmenter=_SEGMENTER.value,
                             measure=_MEASURE.value, mode=_MODE.value,
                             candidates=_CANDIDATES.value)
    except (ValueError, OSError) as error:
        raise SystemExit(f"tfmir serve: error: {error}") from None
    health = server.service.health()
    print(f"Serving {health['count']} items ({health['kind']}, {health['metric']}, dimension "
          f"{health['dimension']}; queries embedded by {server.service.embed.description}) at "
          f"{server.url}: POST /search, GET /healthz. Ctrl-C stops.", flush=True)
    signal.signal(signal.SIGTERM, _stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("Stopped.", flush=True)
