"""`tfmir serve` over HTTP: a small JSON search service on the standard library's HTTP server.

Endpoints:

- `POST /search?k=8&source=skin`: the query image (any format `tfmir.images` reads) as the raw
  body (Content-Type one of `IMAGE_CONTENT_TYPES`: `image/*` of those formats,
  `application/dicom` or `application/octet-stream`) or as the multipart/form-data field `image`.
  Answers `{"results": [{"id", "label", "source", "path", "score", "rank"}], "predicted_label"}`,
  the shape `tfmir search` prints per query.
  A style database (`tfmir.serving.style`) also takes `measure`, `mode` and `candidates`.
- `GET /healthz`: `{"status": "ok", "count", "kind", "metric", "dimension",
  "model_fingerprint", "fingerprint_checked", "backend", "k", "sources"}`.

Every refusal is a JSON `{"error": "..."}` that names the problem: 400 (an empty, corrupt or
non-JPEG/PNG image, a malformed multipart body, k not an integer, below 1 or above the items
searched, an unknown source or query parameter), 404 (unknown path), 405 (wrong method), 408
(the body stalled), 411 (no Content-Length), 413 (a body above `max_request_bytes`, checked
before reading it, or an image above `max_image_pixels`), 415 (another Content-Type). 5xx
answers are server faults and are logged: 500 (a bug), 502 / 504 (TF Serving failed or timed
out). One thread serves each connection (`ThreadingHTTPServer`, HTTP/1.1 keep-alive); the
service is read-only, so requests run concurrently without a lock (see `SearchService`).

Keep-alive: every answer says how long the connection may stay idle (`Keep-Alive: timeout=N`,
`idle_timeout`, 60 s by default) or that the server closes it (`Connection: close`). The server
waits a little longer than it announces, so a request sent just before the deadline is still
answered, and then closes gracefully: a request that crosses the close meets a clean end of
stream (which clients take as "reconnect"), not a reset.

Example:

```python
server = make_server("indexes/skin", "exported/tfmir", port=0)
threading.Thread(target=server.serve_forever, daemon=True).start()
host, port = server.server_address[:2]   # POST http://host:port/search
...
server.shutdown()
server.server_close()
```
"""

from __future__ import annotations

import email.message
import email.parser
import ipaddress
import json
import os
import re
import socket
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from absl import logging

import tfmir
from tfmir.serving.backends import DEFAULT_MAX_IMAGE_PIXELS, BackendError, RequestError
from tfmir.serving.retrieval import SearchError
from tfmir.serving.service import SearchService

DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
DEFAULT_IDLE_TIMEOUT = 60
# The bytes decide the format (`tfmir.images`); these types just say "an image".
IMAGE_CONTENT_TYPES = ("image/jpeg", "image/png", "image/gif", "image/bmp", "image/tiff",
                       "image/webp", "application/dicom", "application/octet-stream")
MULTIPART_CONTENT_TYPE = "multipart/form-data"
MULTIPART_FIELD = "image"
ROUTES = {"/search": "POST", "/healthz": "GET"}
QUERY_PARAMETERS = ("k", "source")
# A refused request whose body was not read: keep reading (and dropping) what the client still
# sends for this long before closing, or the close resets the connection and the client may lose
# the answer (what web servers call a lingering close).
_LINGER_SECONDS = 5.0
_LINGER_IDLE_SECONDS = 1.0
# How much longer than its announced Keep-Alive timeout an idle connection is kept: the client's
# clock starts when the answer arrives, after the server's, and its request takes time to travel.
_IDLE_GRACE_SECONDS = 1.0


class SearchServer(ThreadingHTTPServer):
    """The HTTP server of a `SearchService`; `make_server` builds one.

    Args:
        address: (host, port) to bind; port 0 picks a free port (see `server_address`).
        service: the loaded `SearchService`.
        max_request_bytes: larger request bodies are refused (413) without being read.
        idle_timeout: seconds a keep-alive connection may wait for its next request; announced
            in every answer as `Keep-Alive: timeout=<idle_timeout>`.
    """

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], service: SearchService, *,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                 idle_timeout: int = DEFAULT_IDLE_TIMEOUT):
        _check_positive_integer("max_request_bytes", max_request_bytes)
        _check_positive_integer("idle_timeout", idle_timeout)
        self.service = service
        self.max_request_bytes = max_request_bytes
        self.idle_timeout = idle_timeout
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _SearchHandler)

    @property
    def url(self) -> str:
        """The base URL the server answers on, e.g. `http://127.0.0.1:8080`."""
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def make_server(index_dir: str | os.PathLike, model: str | os.PathLike | None, *,
                host: str = "127.0.0.1", port: int = 0, k: int = 8,
                tf_serving_url: str | None = None,
                max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
                max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                resize_size: int | None = None,
                idle_timeout: int = DEFAULT_IDLE_TIMEOUT, segmenter: str | None = None,
                measure: str | None = None, mode: str | None = None,
                candidates: int | None = None) -> SearchServer:
    """Loads an index and its model and returns a bound, not yet serving, `SearchServer`.

    Args:
        index_dir: an index directory written by `tfmir index`.
        model: the model that built the index (SavedModel export or `.keras` checkpoint; its
            fingerprint is checked against the index). With `tf_serving_url` it may be None,
            and then only the embedding dimension is checked (a warning says so).
        host: address to listen on; the loopback interface by default.
        port: port to listen on; 0 picks a free one (read it from `server_address`).
        k: results per query when a request gives no `k`.
        tf_serving_url: embed queries with TF Serving at this model URL (e.g.
            `http://localhost:8501/v1/models/tfmir`) instead of in-process.
        max_request_bytes: larger request bodies are refused (413) before being read.
        max_image_pixels: images whose header gives more pixels are refused (413) before being
            decoded.
        resize_size: resize side for a `.keras` model (default: its `config.json`).
        idle_timeout: seconds a keep-alive connection may wait for its next request (announced
            as `Keep-Alive: timeout=<idle_timeout>`).
        segmenter, measure, mode, candidates: a style database only (`tfmir.serving.style`):
            its segmenter and the defaults of requests that do not name a measure, mode or
            number of candidates.

    Returns:
        The server: `serve_forever()` to serve, `shutdown()` (from another thread) to stop,
        `server_close()` to release the socket.

    Raises:
        ValueError: (`SearchError`) the index, the model or TF Serving is unusable or they do not
            belong together; OSError: the address cannot be bound.

    Example:

    ```python
    server = make_server("indexes/skin", "exported/tfmir", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(server.url)   # http://127.0.0.1:<port>
    ```
    """
    _check_positive_integer("max_request_bytes", max_request_bytes)
    _check_positive_integer("idle_timeout", idle_timeout)
    from tfmir.index.style import is_style_database

    style = {"segmenter": segmenter, "measure": measure, "mode": mode, "candidates": candidates}
    if is_style_database(index_dir):
        from tfmir.serving.style import StyleSearchService

        service = StyleSearchService.load(index_dir, model, k=k, tf_serving_url=tf_serving_url,
                                          max_image_pixels=max_image_pixels,
                                          resize_size=resize_size, **style)
    elif any(value is not None for value in style.values()):
        given = sorted(name for name, value in style.items() if value is not None)
        raise SearchError(f"{', '.join(given)} apply to a style database only; {index_dir} is "
                          "another kind of index.")
    else:
        service = SearchService.load(index_dir, model, k=k, tf_serving_url=tf_serving_url,
                                     max_image_pixels=max_image_pixels, resize_size=resize_size)
    if not _is_loopback(host):
        logging.warning("Serving on %s, not the loopback interface: whoever can reach it can "
                        "search the archive. Put it behind an authenticating proxy.", host)
    return SearchServer((host, port), service, max_request_bytes=max_request_bytes,
                        idle_timeout=idle_timeout)


def _check_positive_integer(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")


def _byte_count(value: str | None) -> int | None:
    """A Content-Length value as an int; None when it is not a plain decimal count."""
    value = (value or "").strip()
    return int(value) if re.fullmatch(r"[0-9]{1,20}", value) else None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _SearchHandler(BaseHTTPRequestHandler):
    """One connection: routes the request, answers JSON, never lets an error escape."""

    server_version = f"tfmir-serve/{tfmir.__version__}"
    protocol_version = "HTTP/1.1"  # keep-alive, and `Expect: 100-continue` (curl, large bodies)
    timeout = 60  # seconds a client may stall mid-request (socket timeout); frees the thread

    def handle_one_request(self):
        if self._wait_for_request():
            super().handle_one_request()
        else:
            self.close_connection = True

    def _wait_for_request(self) -> bool:
        """Whether a request starts within the idle timeout; closes gracefully when none does."""
        self.connection.settimeout(self.server.idle_timeout + _IDLE_GRACE_SECONDS)
        try:
            if not self.rfile.peek(1):
                return False  # the client closed the connection
        except TimeoutError:
            # shutdown(SHUT_WR) first, then drop what still arrives: closing a socket with unread
            # data would reset the connection under a request that crossed the close.
            self._linger()
            return False
        except OSError:
            return False
        finally:
            self.connection.settimeout(self.timeout)
        return True

    def do_GET(self):  # noqa: N802 (the names BaseHTTPRequestHandler dispatches to)
        self._answer()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_GET

    def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
        logging.info("%s %s", self.address_string(), format % args)

    def handle_expect_100(self) -> bool:
        # Refuse a missing, malformed or too large Content-Length before the client sends the
        # body; otherwise let it send (100 Continue).
        length = _byte_count(self.headers.get("Content-Length"))
        if length is not None and length <= self.server.max_request_bytes:
            return super().handle_expect_100()
        self._answer()
        return False

    def _answer(self) -> None:
        self._body_unread = self._announces_body()
        headers = {}
        try:
            status, payload = 200, self._route()
        except RequestError as error:
            status, payload, headers = error.status, {"error": error.message}, error.headers
        except BackendError as error:
            logging.error("%s %s: %s", self.command, self.path, error)
            status, payload = error.status, {"error": str(error)}
        except Exception:  # a bug: log it, answer 500, keep serving
            logging.exception("Internal error answering %s %s", self.command, self.path)
            status, payload = 500, {"error": "internal server error; the details are in the "
                                             "server log."}
        self._send_json(status, payload, headers)

    def _route(self) -> dict:
        url = urllib.parse.urlsplit(self.path)
        method = ROUTES.get(url.path)
        if method is None:
            raise RequestError(404, f"unknown path {url.path!r}: use POST /search or "
                                    "GET /healthz.")
        if self.command != method:
            raise RequestError(405, f"{self.command} is not allowed on {url.path}: use {method}.",
                               headers={"Allow": method})
        if url.path == "/healthz":
            return self.server.service.health()
        body = self._read_body()  # first, so that a refusal can keep the connection open
        # A style database's service also takes measure, mode and candidates.
        known = getattr(self.server.service, "query_parameters", QUERY_PARAMETERS)
        k, source, options = _query_parameters(url.query, known)
        image = _image_from_body(self.headers.get("Content-Type"), body)
        return self.server.service.search(image, k=k, source=source, **options)

    def _announces_body(self) -> bool:
        length = self.headers.get("Content-Length")
        if length is None:
            return "Transfer-Encoding" in self.headers or self.command in ("POST", "PUT", "PATCH")
        return length.strip() != "0"

    def _read_body(self) -> bytes:
        if "Transfer-Encoding" in self.headers:
            raise RequestError(411, "a body without Content-Length (Transfer-Encoding: "
                                    f"{self.headers['Transfer-Encoding']}) is not accepted; "
                                    "send Content-Length.")
        value = self.headers.get("Content-Length")
        if value is None:
            raise RequestError(411, "Content-Length is required: send the image as the body with "
                                    "its length.")
        length = _byte_count(value)
        if length is None:
            raise RequestError(400, f"Content-Length must be a byte count. Received: {value!r}")
        limit = self.server.max_request_bytes
        if length > limit:
            raise RequestError(413, f"the request body is {length} bytes, more than "
                                    f"max_request_bytes={limit}.")
        try:
            body = self.rfile.read(length)
        except TimeoutError as error:
            self.close_connection = True
            raise RequestError(408, f"the request body stalled for {self.timeout} s.") from error
        self._body_unread = False
        if len(body) != length:
            raise RequestError(400, f"the request body ended after {len(body)} of the {length} "
                                    "bytes announced by Content-Length.")
        return body

    def _send_json(self, status: int, payload: dict, headers: dict) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            if self._body_unread or self.close_connection:
                self.send_header("Connection", "close")  # the unread body ends the connection
            else:
                if self.request_version == "HTTP/1.0":  # keep-alive only when asked for and said
                    self.send_header("Connection", "keep-alive")
                self.send_header("Keep-Alive", f"timeout={self.server.idle_timeout}")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self.wfile.flush()
            if self._body_unread:
                self._linger()
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as error:
            logging.info("%s left before the answer was sent: %s", self.address_string(), error)

    def _linger(self) -> None:
        """Reads and drops what the client still sends for a while, so closing does not reset it."""
        connection = self.connection
        deadline = time.monotonic() + _LINGER_SECONDS
        try:
            connection.shutdown(socket.SHUT_WR)
            connection.settimeout(_LINGER_IDLE_SECONDS)
            while time.monotonic() < deadline and connection.recv(65536):
                pass
        except OSError:  # timed out or reset: the client has what it needs
            pass


def _query_parameters(query: str,
                      known=QUERY_PARAMETERS) -> tuple[int | None, str | None, dict]:
    """`k` (an int), `source`, and the other `known` parameters (strings) from the query string;
    anything else is refused."""
    try:
        parameters = urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=False,
                                           errors="strict")
    except UnicodeDecodeError as error:
        raise RequestError(400, f"the query string is not UTF-8: {error}") from error
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise RequestError(400, f"unknown query parameter(s) {unknown}; the known ones are "
                                f"{list(known)}.")
    repeated = sorted(name for name, values in parameters.items() if len(values) > 1)
    if repeated:
        raise RequestError(400, f"query parameter(s) {repeated} given more than once.")
    k = None
    if "k" in parameters:
        value = parameters["k"][0].strip()
        if re.fullmatch(r"[+-]?\d{19,}", value):  # an integer, but no index holds that many
            raise RequestError(400, f"k is far larger than any index. Received: k={value}")
        if not re.fullmatch(r"[+-]?\d{1,18}", value):
            raise RequestError(400, f"k must be an integer. Received: k={value!r}")
        k = int(value)
    source = parameters.get("source", [None])[0]
    if source == "":
        raise RequestError(400, "source is empty: give a source name or leave it out.")
    options = {name: values[0] for name, values in parameters.items()
               if name not in QUERY_PARAMETERS}
    return k, source, options


def _header(name: str, value: str) -> email.message.Message:
    message = email.message.Message()
    message[name] = value
    return message


def _image_from_body(content_type: str | None, body: bytes) -> bytes:
    """The image bytes: the body itself, or the `image` field of a multipart/form-data body."""
    accepted = (f"send the image as the body with Content-Type {', '.join(IMAGE_CONTENT_TYPES)}, "
                f"or as the {MULTIPART_CONTENT_TYPE} field {MULTIPART_FIELD!r}.")
    if not content_type:
        raise RequestError(415, f"the request has no Content-Type: {accepted}")
    header = _header("Content-Type", content_type)
    media_type = header.get_content_type()
    if media_type in IMAGE_CONTENT_TYPES:
        return body
    if media_type != MULTIPART_CONTENT_TYPE:
        raise RequestError(415, f"Content-Type {media_type} is not supported: {accepted}")
    boundary = header.get_param("boundary")
    if not boundary or not isinstance(boundary, str):
        raise RequestError(400, f"{MULTIPART_CONTENT_TYPE} without a boundary parameter.")
    return multipart_field(body, boundary, MULTIPART_FIELD)


def multipart_field(body: bytes, boundary: str, name: str) -> bytes:
    """The contents of the form field `name` of a multipart/form-data body (RFC 7578).

    Parsed directly on bytes so that binary file contents come back unchanged.

    Args:
        body: the request body.
        boundary: the `boundary` parameter of its Content-Type.
        name: the field name.

    Returns:
        The field's bytes.

    Raises:
        RequestError: 400 for a malformed body, a missing field, or a field given twice (which
            of two images to search would be a guess).
    """
    if not boundary.isascii():
        raise RequestError(400, f"the {MULTIPART_CONTENT_TYPE} boundary is not ASCII.")
    delimiter = b"--" + boundary.encode("ascii")
    parts = body.split(delimiter)
    if len(parts) < 3:  # preamble, at least one part, the closing "--"
        raise RequestError(400, f"malformed {MULTIPART_CONTENT_TYPE} body: it does not hold "
                                "parts separated by its boundary.")
    names = []
    found = None
    for part in parts[1:]:
        if part.startswith(b"--"):  # the closing delimiter
            break
        head, separator, contents = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not separator:
            raise RequestError(400, f"malformed {MULTIPART_CONTENT_TYPE} body: a part has no "
                                    "blank line after its headers.")
        headers = email.parser.BytesHeaderParser().parsebytes(head + b"\r\n\r\n")
        part_name = headers.get_param("name", header="content-disposition")
        if part_name == name:
            if found is not None:
                raise RequestError(400, f"the {MULTIPART_CONTENT_TYPE} body holds the field "
                                        f"{name!r} more than once; send one image per request.")
            found = contents.removesuffix(b"\r\n")
        names.append(part_name)
    if found is not None:
        return found
    raise RequestError(400, f"the {MULTIPART_CONTENT_TYPE} body has no field {name!r} (fields: "
                            f"{names}); send the image as that field, e.g. "
                            f"curl -F {name}=@query.jpg.")
