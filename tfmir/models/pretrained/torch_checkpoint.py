"""Reads PyTorch checkpoints in the legacy (non-zip) format into NumPy, without importing torch.

A legacy checkpoint (`torch.save(..., _use_new_zipfile_serialization=False)`, the default before
PyTorch 1.6) is five records in a row:

1. a pickled magic number, 2. a pickled protocol version (1001), 3. a pickled dict of system
information (byte order, C type sizes), 4. the pickled object itself (usually an `OrderedDict`
state dict) in which each tensor refers to its storage by a persistent id, 5. a pickled list of
storage keys, followed, for each key in that order, by the storage's element count as an int64
and its raw bytes.

A pickle can call any importable function while it loads, so the object pickle is read with an
unpickler that resolves only the handful of globals a state dict needs (`ALLOWED_GLOBALS`) and
refuses everything else before anything runs.

Example:

```python
state_dict = load_torch_checkpoint("efficientnet-lite0-57934424.pth")
state_dict["_conv_stem.weight"].shape  # (32, 3, 3, 3)
```
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# torch storage class -> NumPy element type (byte order added from the checkpoint's sys info).
# BFloat16Storage has no NumPy type and is refused like any other unknown global.
STORAGE_DTYPES = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "b1",
}

ALLOWED_GLOBALS = (
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    *(("torch", storage) for storage in STORAGE_DTYPES),
)


class _StorageType:
    """Stands in for a `torch.<Type>Storage` class: only its element type matters here."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class _Storage:
    """A storage named in the object pickle, filled from the bytes after it."""

    def __init__(self, key: str, storage_type: _StorageType, num_elements: int,
                 view: tuple[int, int] | None = None):
        self.key = key
        self.storage_type = storage_type
        self.num_elements = num_elements
        # Pre-1.0 checkpoints may refer to a slice of a root storage: (offset, size) in elements.
        self.view = view


class _RefusedGlobal(ValueError):
    """A pickle named a global outside `ALLOWED_GLOBALS`; raised to the caller unchanged."""


class _TensorReference:
    """A tensor whose storage is not read yet: storage, element offset, size, stride."""

    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage = storage
        self.offset = int(offset)
        self.size = tuple(int(s) for s in size)
        self.stride = tuple(int(s) for s in stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _TensorReference(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    # requires_grad, hooks and metadata mean nothing to a NumPy array.
    return _TensorReference(storage, storage_offset, size, stride)


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    **{("torch", storage): _StorageType(storage) for storage in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only `ALLOWED_GLOBALS`; storage references become `_Storage` placeholders."""

    def __init__(self, stream, path: str):
        super().__init__(stream, encoding="latin1")
        self.path = path
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        if (module, name) not in _GLOBALS:
            raise _RefusedGlobal(
                f"Refusing to load global {module}.{name} from {self.path}: a PyTorch checkpoint "
                "may only name tensors, storages and collections.OrderedDict."
            )
        return _GLOBALS[(module, name)]

    def persistent_load(self, saved_id):
        if not isinstance(saved_id, tuple) or not saved_id:
            raise pickle.UnpicklingError(f"unexpected persistent id {saved_id!r}")
        if saved_id[0] == "module":  # a pickled nn.Module's source: (type, file, source)
            raise ValueError("it holds a pickled torch.nn.Module, not a state dict")
        if saved_id[0] != "storage" or len(saved_id) != 6:
            raise pickle.UnpicklingError(f"unexpected persistent id {saved_id!r}")
        _, storage_type, key, _location, num_elements, view = saved_id
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unexpected storage type {storage_type!r}")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(key, storage_type, int(num_elements))
        if view is None:
            return self.storages[key]
        # (view key, offset, size): a slice of the root storage `key`.
        return _Storage(key, storage_type, int(view[2]), (int(view[1]), int(view[2])))


def _read_exactly(stream, num_bytes: int, what: str) -> bytes:
    data = stream.read(num_bytes)
    if len(data) != num_bytes:
        raise EOFError(f"{what}: expected {num_bytes} bytes, found {len(data)}")
    return data


def _array(reference: _TensorReference, arrays: dict[str, np.ndarray]) -> np.ndarray:
    storage = reference.storage
    flat = arrays[storage.key]
    if storage.view is not None:  # a slice of the root storage
        view_offset, view_size = storage.view
        flat = flat[view_offset:view_offset + view_size]
    extent = reference.offset + sum((s - 1) * t for s, t in zip(reference.size, reference.stride))
    if any(s == 0 for s in reference.size):
        return np.zeros(reference.size, flat.dtype)
    if reference.offset < 0 or min(reference.stride, default=0) < 0 or extent >= flat.size:
        raise ValueError(
            f"tensor (offset {reference.offset}, size {reference.size}, stride "
            f"{reference.stride}) reaches past its storage of {flat.size} elements"
        )
    strides = [t * flat.itemsize for t in reference.stride]
    view = np.lib.stride_tricks.as_strided(flat[reference.offset:], reference.size, strides,
                                           writeable=False)
    return np.array(view)  # owns its memory, contiguous, writeable


def _resolve(value, arrays):
    """Replaces every `_TensorReference` in dicts, lists and tuples by its array."""
    if isinstance(value, _TensorReference):
        return _array(value, arrays)
    if isinstance(value, dict):
        return type(value)((k, _resolve(v, arrays)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v, arrays) for v in value)
    return value


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a legacy-format PyTorch checkpoint (a state dict) into NumPy arrays, without torch.

    Args:
        path: a `.pth` / `.pt` file written by `torch.save` in the legacy (non-zip) format.

    Returns:
        The checkpoint's dict (an `OrderedDict` for a state dict) with every tensor replaced by a
        NumPy array of its dtype, size and stride (copied, C-contiguous).

    Raises:
        ValueError: the pickle names a global outside `ALLOWED_GLOBALS` (nothing is called), or
            the file is not a complete legacy checkpoint (truncated, corrupt, zip format); the
            message names the file.

    Example:

    ```python
    state_dict = load_torch_checkpoint("efficientnet-lite0-57934424.pth")
    kernel = state_dict["_conv_stem.weight"].transpose(2, 3, 1, 0)  # OIHW -> HWIO
    ```
    """
    path = os.fspath(path)
    with open(path, "rb") as stream:
        head = stream.read(4)
        if head == b"PK\x03\x04":
            raise ValueError(
                f"{path} is a zip-format PyTorch checkpoint; only the legacy format is supported. "
                "Re-save it with torch.save(obj, path, _use_new_zipfile_serialization=False)."
            )
        stream.seek(0)
        try:
            return _load(stream, path)
        except _RefusedGlobal:
            raise
        except ValueError as error:
            raise ValueError(
                f"{path} is not a readable legacy PyTorch checkpoint: {error}") from error
        except (EOFError, pickle.UnpicklingError, struct.error, TypeError, KeyError, IndexError,
                AttributeError, OverflowError, MemoryError) as error:
            raise ValueError(
                f"{path} is not a readable legacy PyTorch checkpoint (truncated or corrupt?): "
                f"{type(error).__name__}: {error}"
            ) from error


def _load(stream: io.BufferedReader, path: str):
    # The three header pickles hold only numbers, strings and dicts, but go through the
    # restricted unpickler all the same.
    magic = _RestrictedUnpickler(stream, path).load()
    if magic != MAGIC_NUMBER:
        raise ValueError(f"wrong magic number {magic!r}")
    protocol = _RestrictedUnpickler(stream, path).load()
    if protocol != PROTOCOL_VERSION:
        raise ValueError(f"unsupported protocol version {protocol!r}")
    sys_info = _RestrictedUnpickler(stream, path).load()
    little_endian = not isinstance(sys_info, dict) or sys_info.get("little_endian", True)
    byte_order = "<" if little_endian else ">"

    unpickler = _RestrictedUnpickler(stream, path)
    result = unpickler.load()
    storage_keys = _RestrictedUnpickler(stream, path).load()
    if not isinstance(storage_keys, list):
        raise ValueError(f"expected the list of storage keys, found {type(storage_keys).__name__}")

    arrays = {}
    for key in storage_keys:
        storage = unpickler.storages.get(str(key))
        if storage is None:
            raise ValueError(f"storage {key!r} is listed but no tensor refers to it")
        dtype = np.dtype(byte_order + storage.storage_type.dtype)
        size_bytes = _read_exactly(stream, 8, f"size of storage {key}")
        (num_elements,) = struct.unpack(byte_order + "q", size_bytes)
        if num_elements != storage.num_elements:
            raise ValueError(f"storage {key!r} holds {num_elements} elements, its tensors say "
                             f"{storage.num_elements}")
        data = _read_exactly(stream, num_elements * dtype.itemsize, f"storage {key}")
        arrays[str(key)] = np.frombuffer(data, dtype).astype(dtype.newbyteorder("="))
    missing = sorted(set(unpickler.storages) - set(arrays))
    if missing:
        raise ValueError(f"storages {missing[:5]} are referred to but not stored")
    return _resolve(result, arrays)
