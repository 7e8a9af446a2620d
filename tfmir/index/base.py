"""The search-index interface and the on-disk index directory shared by every index.

An index holds vectors (or bit codes) in row order next to a table of ids, labels,
sources and image paths, and answers top-k queries. `ExactIndex`, `ScannIndex` and
`HammingIndex` implement the searcher; this module does the bookkeeping, the input
checks, and saving and loading.

Index directory (format version 1):

    manifest.json   kind, metric, dimension, model_fingerprint, preprocessing, count, settings,
                    created_at, and the sha256 of every other file (written last)
    table.jsonl     one JSON object per row: {"id", "label", "source", "path"};
                    row order is vector order
    vectors.npy     float32 (count, dimension) vectors (exact, scann), or
    codes.npy       uint64 (count, words) packed bit codes (hamming)
    scann/          the ScaNN searcher's own files (scann only)

`save` writes into a temporary sibling directory, writes the manifest last, fsyncs
everything and renames the directory into place (`tfmir.files.atomic_directory`),
so a crash never leaves a directory that loads as a valid index. `load` refuses a
directory without a manifest, a file whose sha256 differs from the manifest, an
unknown format version, and an index whose dimension, metric, model fingerprint or
query preprocessing differs from the expected one (the last two with
`FingerprintMismatchError`).
"""

import datetime
import hashlib
import json
import numbers
import pathlib

import numpy as np
from absl import logging

import tfmir
from tfmir.files import ASIDE_MARKER, TEMPORARY_MARKER, atomic_directory

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TABLE_FILE = "table.jsonl"
TABLE_COLUMNS = ("id", "label", "source", "path")
# Sibling directories made by `save` carry TEMPORARY_MARKER or ASIDE_MARKER (from
# `tfmir.files`) in their names; such a directory is never an index.

_KINDS = {}


class FingerprintMismatchError(ValueError):
    """`Index.load` found an index made by another model than the expected one (both named)."""


class Index:
    """A searchable set of vectors with one table row (id, label, source, path) each.

    Subclasses set `kind`, `metrics`, `data_file` and `default_settings`, and
    implement the searcher hooks (`_prepare_vectors`, `_build_searcher`,
    `_search`, optionally `_extend_searcher`, `_write_searcher`,
    `_read_searcher`, `_searcher_state`).

    Scores are similarities (higher is better) for the `"cosine"` and `"dot"`
    metrics and distances (lower is better) for `"l2"` and `"hamming"`; results
    always come best first.

    Args:
        metric: How vectors are compared; one of the subclass's `metrics`.
        dimension: Length of every vector (number of bits for a Hamming index).
        model_fingerprint: Identifies the model that produced the vectors;
            `load` can refuse an index made by another model.
        preprocessing: How the items were resized and cropped before that model
            (`tfmir.data.query_preprocessing`); `load` can refuse queries
            preprocessed another way.
        **settings: Searcher knobs, see the subclass; unknown names are refused.

    Example:

    >>> from tfmir.index import ExactIndex
    >>> index = ExactIndex(metric="l2", dimension=2).build(
    ...     np.eye(2), ids=["a", "b"], labels=[0, 1])
    >>> index.search([[1.0, 0.1]], k=1)[0][0]["id"]
    'a'
    >>> index.save("archive_index")  # doctest: +SKIP
    >>> Index.load("archive_index", expected_dimension=2)  # doctest: +SKIP
    """

    kind: str = ""
    metrics: tuple = ()
    data_file: str = "vectors.npy"
    default_settings: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _KINDS[cls.kind] = cls

    def __init__(
        self,
        *,
        metric: str,
        dimension: int,
        model_fingerprint: str | None = None,
        preprocessing: dict | None = None,
        **settings,
    ):
        if metric not in self.metrics:
            raise ValueError(
                f"metric must be one of {self.metrics} for a {self.kind!r} index. "
                f"Received: metric={metric!r}"
            )
        if not _is_int(dimension) or dimension <= 0:
            raise ValueError(
                f"dimension must be a positive integer. Received: dimension={dimension!r}"
            )
        if model_fingerprint is not None and not isinstance(model_fingerprint, str):
            raise ValueError(
                "model_fingerprint must be a string or None. "
                f"Received: model_fingerprint={model_fingerprint!r}"
            )
        if preprocessing is not None and not isinstance(preprocessing, dict):
            raise ValueError(
                "preprocessing must be a dict or None. "
                f"Received: preprocessing={preprocessing!r}"
            )
        unknown = sorted(set(settings) - set(self.default_settings))
        if unknown:
            raise ValueError(
                f"Unknown settings for a {self.kind!r} index: {unknown}. "
                f"Known settings: {sorted(self.default_settings)}"
            )
        self.metric = metric
        self.dimension = int(dimension)
        self.model_fingerprint = model_fingerprint
        self.preprocessing = preprocessing
        self.settings = {**self.default_settings, **settings}
        self._validate_settings()
        self._data = None
        self._clear_table()

    # === Contents ===

    def build(self, vectors, *, ids, labels=None, sources=None, paths=None) -> "Index":
        """Replaces the contents with `vectors` and their table rows.

        Args:
            vectors: Array (N, dimension), N >= 1 (bit codes for a Hamming index).
            ids: N unique ids, strings or integers.
            labels: Optional N class labels (strings, numbers or None).
            sources: Optional N source names (e.g. the dataset each item came from).
            paths: Optional N image paths.

        Returns:
            The index itself.

        Raises:
            ValueError: on a wrong shape or dimension, non-finite values,
                duplicate ids (named), or columns of the wrong length.
        """
        data = self._prepare_vectors(vectors, "vectors")
        if data.shape[0] == 0:
            raise ValueError("build() needs at least one vector. Received: 0 vectors")
        rows = self._new_rows(data.shape[0], ids, labels, sources, paths, existing={})
        return self._replace_contents(data, rows)

    def add(self, vectors, *, ids, labels=None, sources=None, paths=None) -> "Index":
        """Appends vectors and their table rows; ids must be new.

        Arguments are those of `build`. Adding to an empty index builds it. How
        the searcher takes new items depends on the index (see the subclass).

        Returns:
            The index itself.

        Raises:
            ValueError: as `build`, and when an id is already in the index (the
                duplicates are named). Nothing changes when it raises.
        """
        data = self._prepare_vectors(vectors, "vectors")
        rows = self._new_rows(data.shape[0], ids, labels, sources, paths, existing=self._row_of)
        if data.shape[0] == 0:
            return self
        if len(self) == 0:
            return self._replace_contents(data, rows)
        all_data = np.concatenate([self._data, data])
        self._extend_searcher(all_data, data)
        self._data = all_data
        self._append_rows(rows)
        return self

    def get(self, ids):
        """Table rows `{"id", "label", "source", "path", "row"}` of the given ids.

        Args:
            ids: One id (returns one dict) or a sequence of ids (returns a list).

        Raises:
            KeyError: naming the ids that are not in the index.
        """
        single = isinstance(ids, (str, numbers.Integral))
        wanted = [_as_id(ids)] if single else [_as_id(item) for item in ids]
        missing = [item for item in wanted if item not in self._row_of]
        if missing:
            raise KeyError(
                f"{len(missing)} of {len(wanted)} ids are not in the index: "
                f"{_preview(missing)}"
            )
        rows = [self._table_row(self._row_of[item]) for item in wanted]
        return rows[0] if single else rows

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self):
        return (
            f"{type(self).__name__}(metric={self.metric!r}, dimension={self.dimension}, "
            f"count={len(self)}, model_fingerprint={self.model_fingerprint!r})"
        )

    @property
    def ids(self) -> np.ndarray:
        """The ids in row order (index them with `search_arrays` row indices)."""
        return _column_array(self._ids)

    @property
    def labels(self) -> np.ndarray:
        """The labels in row order, e.g. `index.labels[rows]` for retrieval metrics."""
        return _column_array(self._labels)

    @property
    def sources(self) -> np.ndarray:
        """The sources in row order."""
        return _column_array(self._sources)

    @property
    def paths(self) -> np.ndarray:
        """The image paths in row order."""
        return _column_array(self._paths)

    # === Search ===

    def search(self, queries, k: int) -> list[list[dict]]:
        """Top-k table rows of every query, best first.

        Args:
            queries: Array (Q, dimension), or one vector (dimension,).
            k: Number of results per query, 1 <= k <= len(index).

        Returns:
            One list per query of `{"id", "label", "source", "path", "score",
            "rank"}` dicts, rank 1 first. `score` is a similarity (higher is
            better) for cosine / dot and a distance (lower is better) for l2 and
            Hamming.

        Raises:
            ValueError: on an empty index, a k outside [1, len(index)], or
                queries of the wrong dimension.
        """
        scores, rows = self.search_arrays(queries, k)
        results = []
        for query_scores, query_rows in zip(scores.tolist(), rows.tolist()):
            results.append(
                [
                    {**self._table_row(row, with_row=False), "score": score, "rank": rank}
                    for rank, (score, row) in enumerate(zip(query_scores, query_rows), start=1)
                ]
            )
        return results

    def search_arrays(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k scores and row indices of every query, best first: the fast path.

        Args:
            queries: Array (Q, dimension), or one vector (dimension,).
            k: Number of results per query, 1 <= k <= len(index).

        Returns:
            `(scores, rows)`, both (Q, k): similarities (cosine, dot; higher is
            better) or distances (l2, Hamming; lower is better), and int64 row
            indices into the table (`index.ids[rows]`, `index.labels[rows]`).

        Raises:
            ValueError: as `search`.
        """
        size = len(self)
        if size == 0:
            raise ValueError(f"The {self.kind} index is empty: build() or add() items first.")
        if not _is_int(k) or not 1 <= k <= size:
            raise ValueError(
                f"k must be an integer in [1, {size}] (the index holds {size} items). "
                f"Received: k={k!r}"
            )
        queries = np.asarray(queries)
        if queries.ndim == 1:
            queries = queries[None, :]
        queries = self._prepare_vectors(queries, "queries")
        if queries.shape[0] == 0:
            return np.zeros((0, k), self._score_dtype()), np.zeros((0, k), np.int64)
        return self._search(queries, int(k))

    # === Saving and loading ===

    def save(self, directory) -> pathlib.Path:
        """Writes the index directory atomically and returns its path.

        Everything is written into a temporary sibling directory (named with
        `TEMPORARY_MARKER`, which `load` refuses), the manifest last; then every
        file is fsynced and the directory is renamed into place. An existing
        index at `directory` is renamed aside first and deleted only after the
        new one is in place; if the final rename fails the old one is renamed
        back. A crash between those two renames leaves the previous index in a
        sibling named with `ASIDE_MARKER` (rename it back to recover). See
        `tfmir.files.atomic_directory`.

        Args:
            directory: Target directory. Its parent is created if needed. An
                existing directory is replaced only when it is an index
                directory (has a manifest) or is empty.

        Raises:
            ValueError: on an empty index, or a target that exists and is not an
                index directory.
        """
        if len(self) == 0:
            raise ValueError(f"The {self.kind} index is empty: nothing to save.")
        target = pathlib.Path(directory).absolute()
        _refuse_save_marker_name(target)
        if target.exists():
            is_index = (target / MANIFEST_FILE).is_file()
            if not target.is_dir() or (not is_index and any(target.iterdir())):
                raise ValueError(
                    f"Refusing to replace {str(target)!r}: it exists and is not an index "
                    "directory (no manifest.json)."
                )
        with atomic_directory(target) as temporary:
            self._write_table(temporary / TABLE_FILE)
            np.save(temporary / self.data_file, self._data)
            self._write_searcher(temporary)
            files = {
                path.relative_to(temporary).as_posix(): _sha256(path)
                for path in sorted(temporary.rglob("*"))
                if path.is_file()
            }
            manifest = self._manifest(files)
            (temporary / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return target

    @classmethod
    def load(
        cls,
        directory,
        *,
        expected_dimension: int | None = None,
        expected_metric: str | None = None,
        expected_model_fingerprint: str | None = None,
        expected_preprocessing: dict | None = None,
    ) -> "Index":
        """Loads an index directory written by `save`; dispatches on the manifest kind.

        Every file's sha256 is checked against the manifest before anything is
        read. Nothing on disk is modified, whether loading succeeds or not.

        Args:
            directory: The index directory.
            expected_dimension: Refuse an index of another dimension.
            expected_metric: Refuse an index with another metric.
            expected_model_fingerprint: Refuse an index made by another model
                (or one without a fingerprint).
            expected_preprocessing: Refuse an index whose items were preprocessed
                otherwise (an index that records none, built from vectors, is
                accepted with a warning).

        Returns:
            An `ExactIndex`, `ScannIndex` or `HammingIndex`.

        Raises:
            FingerprintMismatchError: (a ValueError) the index was made by
                another model than `expected_model_fingerprint`, or with another
                preprocessing than `expected_preprocessing` (both named).
            ValueError: on a missing directory or manifest (e.g. a half-written
                index), a leftover directory of an interrupted save, an unknown
                format version or kind, a missing or modified file, or another
                mismatch with an expected value (both values named).
        """
        directory = pathlib.Path(directory)
        if not directory.is_dir():
            raise ValueError(f"Index directory not found: {str(directory)!r}")
        if TEMPORARY_MARKER in directory.name or ASIDE_MARKER in directory.name:
            raise ValueError(
                f"{str(directory)!r} is a leftover of an interrupted or replaced save, not an "
                "index directory; load the index it was meant to become or save again."
            )
        manifest_path = directory / MANIFEST_FILE
        if not manifest_path.is_file():
            raise ValueError(
                f"{str(directory)!r} is not a tfmir index directory: it has no {MANIFEST_FILE} "
                "(not an index, or one whose save did not finish)."
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{str(manifest_path)!r} is not valid JSON: {error}") from None
        if not isinstance(manifest, dict):
            raise ValueError(f"{str(manifest_path)!r} does not hold a JSON object.")
        version = manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"Unsupported index format_version {version!r} in {str(manifest_path)!r}; "
                f"this tfmir reads format_version {FORMAT_VERSION}."
            )
        kind = manifest.get("kind")
        index_class = _KINDS.get(kind)
        if index_class is None:
            raise ValueError(
                f"Unknown index kind {kind!r} in {str(manifest_path)!r}. "
                f"Known kinds: {sorted(_KINDS)}"
            )
        if not issubclass(index_class, cls):
            raise ValueError(
                f"{str(directory)!r} holds a {kind!r} index, not a {cls.kind!r} index; "
                "use Index.load to load any kind."
            )
        _check_expected("dimension", manifest.get("dimension"), expected_dimension)
        _check_expected("metric", manifest.get("metric"), expected_metric)
        _check_expected(
            "model fingerprint",
            manifest.get("model_fingerprint"),
            expected_model_fingerprint,
            error=FingerprintMismatchError,
        )
        if expected_preprocessing is not None and manifest.get("preprocessing") is None:
            logging.warning(
                "%s records no query preprocessing, so the queries' (%s) cannot be checked "
                "against its items'.", directory, expected_preprocessing)
        else:
            _check_expected(
                "query preprocessing",
                manifest.get("preprocessing"),
                expected_preprocessing,
                error=FingerprintMismatchError,
            )
        _verify_files(directory, manifest, required=(TABLE_FILE, index_class.data_file))

        settings = manifest.get("settings") or {}
        index = index_class(
            metric=manifest.get("metric"),
            dimension=manifest.get("dimension"),
            model_fingerprint=manifest.get("model_fingerprint"),
            preprocessing=manifest.get("preprocessing"),
            **settings,
        )
        count = manifest.get("count")
        rows = _read_table(directory / TABLE_FILE)
        data = np.load(directory / index_class.data_file, allow_pickle=False, mmap_mode="r")
        if len(rows) != count or data.shape[0] != count:
            raise ValueError(
                f"{str(directory)!r} is inconsistent: manifest count {count}, "
                f"{len(rows)} table rows, {data.shape[0]} stored vectors."
            )
        index._data = index._loaded_data(data)
        index._append_rows(index._new_rows(
            count,
            [row.get("id") for row in rows],
            [row.get("label") for row in rows],
            [row.get("source") for row in rows],
            [row.get("path") for row in rows],
            existing={},
        ))
        index._read_searcher(directory, manifest)
        return index

    # === Hooks for subclasses ===

    def _validate_settings(self):
        """Checks `self.settings`; raises ValueError naming a bad value."""

    def _prepare_vectors(self, vectors, name) -> np.ndarray:
        """Validates (N, dimension) input and returns the stored representation."""
        raise NotImplementedError

    def _build_searcher(self, data):
        """Builds the searcher over all of `data` (called before `self._data` is set)."""
        raise NotImplementedError

    def _extend_searcher(self, all_data, new_data):
        """Makes the searcher cover `all_data` (old rows then `new_data`); rebuilds by default."""
        self._build_searcher(all_data)

    def _search(self, queries, k) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, int64 rows) of prepared queries; k is already validated."""
        raise NotImplementedError

    def _score_dtype(self):
        return np.float32

    def _loaded_data(self, data):
        """Checks the memory-mapped data file and returns what the index keeps (float vectors)."""
        if data.dtype != np.float32 or data.ndim != 2 or data.shape[1] != self.dimension:
            raise ValueError(
                f"{self.data_file} must be float32 (count, {self.dimension}). "
                f"Found dtype={data.dtype}, shape={data.shape}"
            )
        return np.array(data)

    def _write_searcher(self, directory):
        """Writes the searcher's own files (beyond the data file) into `directory`."""

    def _read_searcher(self, directory, manifest):
        """Restores the searcher after `self._data` and the table are loaded."""
        self._build_searcher(self._data)

    def _searcher_state(self) -> dict | None:
        """Extra manifest entry describing the searcher as built (None for nothing)."""
        return None

    # === Internals ===

    def _replace_contents(self, data, rows):
        self._build_searcher(data)
        self._data = data
        self._clear_table()
        self._append_rows(rows)
        return self

    def _clear_table(self):
        self._ids, self._labels, self._sources, self._paths = [], [], [], []
        self._row_of = {}

    def _new_rows(self, count, ids, labels, sources, paths, existing):
        ids = _column(ids, "ids", count, required=True)
        ids = [_as_id(item) for item in ids]
        seen, repeated = set(), []
        for item in ids:
            if item in seen or item in existing:
                repeated.append(item)
            seen.add(item)
        if repeated:
            raise ValueError(
                f"Duplicate ids (already in the index or repeated in the input): "
                f"{_preview(list(dict.fromkeys(repeated)))}"
            )
        return (
            ids,
            _column(labels, "labels", count),
            _column(sources, "sources", count),
            _column(paths, "paths", count),
        )

    def _append_rows(self, rows):
        ids, labels, sources, paths = rows
        start = len(self._ids)
        self._ids.extend(ids)
        self._labels.extend(labels)
        self._sources.extend(sources)
        self._paths.extend(paths)
        self._row_of.update((item, start + offset) for offset, item in enumerate(ids))

    def _table_row(self, row, with_row=True):
        entry = {
            "id": self._ids[row],
            "label": self._labels[row],
            "source": self._sources[row],
            "path": self._paths[row],
        }
        if with_row:
            entry["row"] = row
        return entry

    def _write_table(self, path):
        # surrogateescape: a file name that is not UTF-8 is written back as its own bytes.
        with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
            for row in range(len(self._ids)):
                f.write(json.dumps(self._table_row(row, with_row=False), ensure_ascii=False))
                f.write("\n")

    def _manifest(self, files):
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "metric": self.metric,
            "dimension": self.dimension,
            "model_fingerprint": self.model_fingerprint,
            "preprocessing": self.preprocessing,
            "count": len(self),
            "settings": self.settings,
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"
            ),
            "tfmir_version": tfmir.__version__,
            "files": {name: {"sha256": digest} for name, digest in files.items()},
        }
        state = self._searcher_state()
        if state is not None:
            manifest["searcher"] = state
        return manifest

    def _check_float_vectors(self, vectors, name):
        """float32 (N, dimension) with finite values, or a ValueError saying what was received."""
        try:
            array = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} must be a numeric array. Received: {error}") from None
        if array.ndim != 2 or array.shape[1] != self.dimension:
            raise ValueError(
                f"{name} must have shape (N, {self.dimension}) for this index of dimension "
                f"{self.dimension}. Received: {name}.shape={array.shape}"
            )
        if not np.all(np.isfinite(array)):
            bad = np.unique(np.nonzero(~np.isfinite(array))[0])
            raise ValueError(f"{name} has NaN or infinite values in rows {_preview(bad.tolist())}")
        return np.ascontiguousarray(array)


def _refuse_save_marker_name(target):
    if TEMPORARY_MARKER in target.name or ASIDE_MARKER in target.name:
        raise ValueError(
            f"Index directory names may not contain {TEMPORARY_MARKER!r} or {ASIDE_MARKER!r} "
            f"(reserved for save). Received: {str(target)!r}"
        )


def _verify_files(directory, manifest, required):
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"{str(directory / MANIFEST_FILE)!r} has no 'files' checksums.")
    for name in required:
        if name not in files:
            raise ValueError(f"{str(directory / MANIFEST_FILE)!r} does not list {name!r}.")
    root = directory.resolve()
    for name, entry in sorted(files.items()):
        path = (directory / name).resolve()
        if root not in path.parents:
            raise ValueError(f"Manifest file entry {name!r} points outside {str(directory)!r}.")
        if not path.is_file():
            raise ValueError(f"{str(directory)!r} is missing {name!r}, listed in its manifest.")
        expected = entry.get("sha256") if isinstance(entry, dict) else None
        actual = _sha256(path)
        if actual != expected:
            raise ValueError(
                f"{name!r} in {str(directory)!r} does not match its sha256 in the manifest "
                f"(expected {expected}, found {actual}): the index was modified or corrupted."
            )


def _check_expected(what, actual, expected, error=ValueError):
    if expected is not None and actual != expected:
        raise error(
            f"Index {what} mismatch: the index has {what} {actual!r}, expected {expected!r}."
        )


def _read_table(path):
    rows = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{str(path)!r} line {number} is not JSON: {error}") from None
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError(f"{str(path)!r} line {number} is not a table row: {line!r}")
            rows.append(row)
    return rows


def _column(values, name, count, required=False):
    if values is None:
        if required:
            raise ValueError(f"{name} is required.")
        return [None] * count
    if isinstance(values, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of {count} values. Received a string.")
    array = values if isinstance(values, np.ndarray) else None
    if array is not None:
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 1:
            raise ValueError(f"{name} must be 1-D. Received: {name}.shape={array.shape}")
        values = array.tolist()
    values = list(values)
    if len(values) != count:
        raise ValueError(
            f"{name} must have one entry per vector. Received: {len(values)} {name} "
            f"for {count} vectors"
        )
    return [_as_cell(value, name) for value in values]


def _as_cell(value, name):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, pathlib.PurePath):
        value = str(value)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise ValueError(
        f"{name} entries must be strings, numbers or None. Received: {value!r} "
        f"({type(value).__name__})"
    )


def _as_id(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"ids must be strings or integers. Received: {value!r}")
    return value


def _column_array(values):
    array = np.empty(len(values), dtype=object)
    array[:] = values
    kinds = {type(value) for value in values}
    if kinds == {int} or kinds == {float} or kinds == {str}:
        return np.asarray(values)
    return array


def _preview(items, limit=10):
    shown = ", ".join(repr(item) for item in items[:limit])
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return f"[{shown}{more}]"


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
