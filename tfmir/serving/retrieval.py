"""Answering top-k queries on a loaded index: shared by `tfmir search` and `tfmir serve`.

- `load_index` loads an index directory and refuses one built by another model (its manifest
  records the model fingerprint), or one that cannot take the model's queries: a hashing
  model's bits search a hamming index only (`check_query_kind`).
- `search_sources` is `Index.search` with an optional source filter; it turns embeddings into
  query codes for a Hamming index (`tfmir.index.sign_codes`, as `tfmir index --kind=hamming`).
- `predicted_labels` is the majority label of each query's results (deep kNN).

Example:

```python
index = load_index("indexes/skin", embed.fingerprint, embed.preprocessing)
results = search_sources(index, embeddings, k=8, source="skin")
labels = predicted_labels(results)
```
"""

from __future__ import annotations

import json
import os


class SearchError(ValueError):
    """A query or an index the search cannot answer, with a message that says why."""


def check_query_kind(index_kind: str | None, query_kind: str | None, directory: str,
                     model: str = "the model") -> None:
    """Refuses hash-code queries against an index of float embeddings.

    A hashing model's ±1 bits have no meaning for cosine, dot or L2 search over another model's
    embeddings. Float queries may search a hamming index: their signs are the codes.

    Args:
        index_kind: the index's kind ("exact", "scann", "hamming"); None skips the check.
        query_kind: "float" or "hash" (`EmbeddingFunction.kind`); None skips the check.
        directory: the index directory, for the message.
        model: what embeds the queries, for the message.

    Raises:
        SearchError: hash queries and an index kind other than "hamming".
    """
    if query_kind == "hash" and index_kind is not None and index_kind != "hamming":
        raise SearchError(f"{model} outputs hash codes (±1 bits, searched by Hamming distance), "
                          f"but the index {directory} holds float embeddings (kind {index_kind}); "
                          "search it with the model that built it, or build a hamming index "
                          "with this model (`tfmir index --kind=hamming`).")


def load_index(directory: str, fingerprint: str | None = None,
               preprocessing: dict | None = None, query_kind: str | None = None,
               model: str = "the model"):
    """Loads an index directory, checking the model fingerprint and the query preprocessing.

    Args:
        directory: an index directory written by `tfmir index` (or `Index.save`).
        fingerprint: the fingerprint of the model that embeds the queries; None skips the check.
        preprocessing: how the queries are resized and cropped (`EmbeddingFunction
            .preprocessing`); None skips the check.
        query_kind: "float" or "hash", the kind of the query vectors (`EmbeddingFunction.kind`);
            checked first, so a hashing model meeting a float index hears that rather than only
            that its fingerprint differs. None skips the check.
        model: what embeds the queries, for messages.

    Returns:
        The loaded `tfmir.index.Index`.

    Raises:
        SearchError: the directory is not a valid index, it cannot take `query_kind` queries,
            or it was built by another model or with another preprocessing.
    """
    from tfmir.index import FingerprintMismatchError, Index

    check_query_kind(_manifest_kind(directory), query_kind, directory, model)
    try:
        return Index.load(directory, expected_model_fingerprint=fingerprint,
                          expected_preprocessing=preprocessing)
    except FingerprintMismatchError as error:
        raise SearchError(f"the model does not match the index: {error} Use the model and "
                          "resize side that built the index, or rebuild it with `tfmir index`."
                          ) from error
    except ValueError as error:
        raise SearchError(f"cannot load the index {directory}: {error}") from error


def _manifest_kind(directory: str) -> str | None:
    """The index kind its manifest records; None when unreadable (`Index.load` then says why)."""
    from tfmir.index.base import MANIFEST_FILE

    try:
        with open(os.path.join(directory, MANIFEST_FILE)) as stream:
            kind = json.load(stream).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def search_sources(index, queries, k: int, source: str | None = None) -> list[list[dict]]:
    """Top-k rows of each query; with `source`, only that source's rows.

    The filter searches ever larger k (4 k, then doubling up to the whole index) and keeps the
    rows of `source`, so every query gets exactly k of them, ranked 1 to k.

    Args:
        index: a `tfmir.index.Index`.
        queries: (Q, dimension) embeddings. For a Hamming index, the signs of the embeddings are
            the query codes (`tfmir.index.sign_codes`); bit codes (a hashing model's ±1 bits)
            pass through unchanged.
        k: results per query, at least 1 and at most the number of candidate rows.
        source: keep only rows of this source; None keeps all.

    Returns:
        One list per query of `{"id", "label", "source", "path", "score", "rank"}`, best first.

    Raises:
        SearchError: `source` is not in the index, or it has fewer than k items.
    """
    if index.kind == "hamming":
        from tfmir.index import sign_codes

        queries = sign_codes(queries)
    if source is None:
        return index.search(queries, k)
    count = int((index.sources == source).sum())
    if count == 0:
        raise SearchError(f"source {source!r} is not in the index; its sources are "
                          f"{sorted(set(index.sources.tolist()))}.")
    if k > count:
        raise SearchError(f"k={k} is larger than the {count} items of source {source!r}.")
    wanted = min(len(index), 4 * k)
    while True:
        results = [[row for row in rows if row["source"] == source][:k]
                   for rows in index.search(queries, wanted)]
        if all(len(rows) == k for rows in results) or wanted == len(index):
            return [[{**row, "rank": rank} for rank, row in enumerate(rows, start=1)]
                    for rows in results]
        wanted = min(len(index), 2 * wanted)


def predicted_labels(results) -> list:
    """Majority label of each query's results; ties go to the nearest (`knn_predict`)."""
    import numpy as np

    from tfmir.metrics.classification import knn_predict

    names = sorted({json.dumps(row["label"]) for rows in results for row in rows})
    code = {name: number for number, name in enumerate(names)}
    votes = np.array([[code[json.dumps(row["label"])] for row in rows] for rows in results])
    return [json.loads(names[winner]) for winner in knn_predict(votes, k=votes.shape[1])]
