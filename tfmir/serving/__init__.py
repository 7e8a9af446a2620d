"""Serving searches: `tfmir serve`'s HTTP JSON service and the query logic it shares with
`tfmir search`.

Example:

```python
from tfmir.serving import make_server

server = make_server("indexes/skin", "exported/tfmir", port=8080)
server.serve_forever()   # POST /search, GET /healthz
```
"""

from tfmir.serving.backends import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BackendError,
    LocalBackend,
    RequestError,
    TFServingBackend,
    check_image,
)
from tfmir.serving.retrieval import SearchError, load_index, predicted_labels, search_sources
from tfmir.serving.server import (
    DEFAULT_MAX_REQUEST_BYTES,
    SearchServer,
    make_server,
)
from tfmir.serving.service import SearchService

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "DEFAULT_MAX_REQUEST_BYTES",
    "BackendError",
    "LocalBackend",
    "RequestError",
    "SearchError",
    "SearchServer",
    "SearchService",
    "TFServingBackend",
    "check_image",
    "load_index",
    "make_server",
    "predicted_labels",
    "search_sources",
]
