"""Crash-safe writes: a file or a whole directory appears complete or not at all.

- `write_atomic(path, data)` writes a file through a temporary sibling: fsync, `os.replace`,
  fsync of the folder. Readers see the old contents or the new, never a part.
- `write_json(path, value)`: `write_atomic` of indented, key-sorted JSON.
- `atomic_directory(target)` yields a temporary sibling folder to fill; when the block ends
  without an error, every file and folder in it is fsynced and it is renamed to `target`
  (an existing `target` is renamed aside first, put back if the rename fails, and deleted after).
- `exclusive_lock(path, what)` holds an advisory lock on `<path>.lock` for a block: a second
  writer of the same output is refused at once with `LockedError` instead of racing the first.

Temporary siblings are hidden and carry `TEMPORARY_MARKER` in their name; a replaced directory
waits under a name with `ASIDE_MARKER`. Neither name is numeric, so TF Serving never takes them
for a model version, and `tfmir.index.Index.load` refuses both.

Example:

```python
write_json("runs/sample/results.json", {"recall@1": 0.42})
write_atomic("shard-00000.npz", lambda stream: np.savez(stream, embeddings=embeddings))
with atomic_directory("exported/tfmir/1") as temporary:
    tf.saved_model.save(module, str(temporary))
```
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

TEMPORARY_MARKER = ".tfmir-tmp-"
ASIDE_MARKER = ".tfmir-old-"
LOCK_SUFFIX = ".lock"


def _read_umask() -> int:
    # Reading the umask means setting it; done once, at import, before any thread writes files.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


class LockedError(ValueError):
    """Another process holds the lock of an output this one would write."""


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Holds an exclusive lock on `<path>.lock` for the block, or refuses at once.

    The lock is `fcntl.flock` on a sibling file, so the operating system drops it when the
    holder exits, crashed or not: there is never a stale lock to delete by hand. The lock file
    itself stays (removing it would let a third process lock a new file while a second still
    holds the old one).

    Args:
        path: the output to protect (a file or a folder; need not exist yet).
        what: what writes it, for the message (e.g. "tfmir index").

    Raises:
        LockedError: another process holds the lock.
    """
    import fcntl

    lock_path = os.fspath(path) + LOCK_SUFFIX
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    with open(lock_path, "a") as stream:
        try:
            fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockedError(f"{os.fspath(path)} is being written by another {what} (it holds "
                              f"{lock_path}); wait for it to finish or choose another "
                              "output.") from None
        try:
            yield
        finally:
            fcntl.flock(stream, fcntl.LOCK_UN)


def write_atomic(path: str | os.PathLike,
                 data: str | bytes | Callable[[BinaryIO], object]) -> None:
    """Writes a file so that it holds either its previous contents or all of `data`.

    The data goes to a hidden temporary file in the same folder (created with its parents),
    which is fsynced and renamed over `path`; then the folder is fsynced so the rename lasts.
    After a failure the temporary file is removed and `path` is untouched.

    Args:
        path: the file to write.
        data: text (written as UTF-8), bytes, or a function that writes to the binary stream it
            is given (e.g. `lambda stream: np.save(stream, array)`).
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{name}{TEMPORARY_MARKER}", dir=directory)
    try:
        # mkstemp creates the file 0600; the result gets the mode open() would give it.
        os.chmod(temporary, 0o666 & ~_UMASK)
        with os.fdopen(handle, "wb") as stream:
            if callable(data):
                data(stream)
            else:
                stream.write(data.encode("utf-8") if isinstance(data, str) else data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    _fsync_directory(directory)


def write_json(path: str | os.PathLike, value) -> None:
    """Writes `value` as indented, key-sorted JSON with a final newline (`write_atomic`)."""
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields an empty temporary sibling of `target` that becomes `target` when the block ends.

    When the block ends without an error, every file and folder written is fsynced and the
    folder is renamed to `target`. An existing `target` is renamed aside first and deleted only
    after the new one is in place; if that rename fails, the old one is renamed back. A crash
    between the two renames leaves the previous `target` in a sibling named with `ASIDE_MARKER`
    (rename it back to recover). On any error the temporary folder is deleted and `target` is
    untouched. Callers decide beforehand whether an existing `target` may be replaced.

    Args:
        target: the directory to write (its parent is created if needed).

    Yields:
        The temporary folder (a `pathlib.Path`) to fill.
    """
    target = pathlib.Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = pathlib.Path(
        tempfile.mkdtemp(prefix=f".{target.name}{TEMPORARY_MARKER}", dir=target.parent))
    try:
        # mkdtemp creates the folder 0700; the result gets the mode mkdir would give it.
        os.chmod(temporary, 0o777 & ~_UMASK)
        yield temporary
        _fsync_tree(temporary)
        _move_into_place(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # already gone once moved into place


def _move_into_place(source: pathlib.Path, target: pathlib.Path) -> None:
    """Renames `source` to `target`; an existing `target` is swapped out, and back on failure."""
    if not target.exists():
        os.rename(source, target)
        _fsync_directory(target.parent)
        return
    aside = target.parent / f".{target.name}{ASIDE_MARKER}{secrets.token_hex(4)}"
    os.rename(target, aside)
    try:
        os.rename(source, target)
    except BaseException:
        os.rename(aside, target)
        raise
    _fsync_directory(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_tree(root: pathlib.Path) -> None:
    folders = [root]
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            folders.append(path)
        elif path.is_file():
            with open(path, "rb") as stream:
                os.fsync(stream.fileno())
    for folder in reversed(folders):  # a folder after what it holds
        _fsync_directory(folder)


def _fsync_directory(path) -> None:
    # Directory fsync makes renames durable; not every platform allows it.
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
