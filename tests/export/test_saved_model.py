"""Tests for tfmir.export: signatures, pure-TensorFlow loading, core ops, bad input, atomicity."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

from tfmir.data import decode_image, preprocess_image
from tfmir.export import (
    EXPORT_INFO_DIR,
    EXPORT_INFO_FILE,
    export_saved_model,
    model_fingerprint,
    read_export_info,
    resolve_export_directory,
)
from tfmir.export import saved_model as saved_model_module
from tests.models.stand_ins import hash_model
from tfmir.models import Embedder
from tfmir.samples import sample_path

RESIZE_SIZE = 36  # the tiny preset's
HASH_IMAGE_SIZE, HASH_RESIZE_SIZE = 16, 20
PYTHON_OPS = {"EagerPyFunc", "PyFunc", "PyFuncStateless"}


def _encode(pixels, format_name, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format_name, **options)
    return buffer.getvalue()


def _jpeg_size_offset(jpeg: bytes) -> int:
    """Offset of the height (then width) field of the JPEG's SOF0 segment, walking the segments."""
    position = 2
    while jpeg[position] == 0xFF:
        marker, length = jpeg[position + 1], int.from_bytes(jpeg[position + 2:position + 4], "big")
        if marker == 0xC0:
            return position + 5  # marker (2), length (2), precision (1)
        position += 2 + length
    raise AssertionError("no SOF0 segment")


@pytest.fixture(scope="module")
def images() -> dict:
    """Real images from the shipped MedMNIST sample, in the formats a client sends."""
    retina = np.load(sample_path("retina"))["test_images"]
    xray = np.load(sample_path("xray"))["test_images"]
    wide_retina = np.asarray(Image.fromarray(retina[0]).resize((50, 40), Image.BILINEAR))
    return {
        "rgb_png": _encode(wide_retina, "PNG"),  # 50×40: shrinks to 36 (antialiased path)
        "jpeg": _encode(retina[1], "JPEG", quality=90),  # 28×28: enlarges to 36
        "gray_png": _encode(xray[0], "PNG"),
        "gray16_png": _encode(xray[1].astype(np.uint16) * 257, "PNG"),
    }


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return Embedder.from_preset("tiny")


@pytest.fixture(scope="module")
def export_base(model, tmp_path_factory):
    base = tmp_path_factory.mktemp("serving") / "tfmir"
    export_saved_model(model, base / "1", resize_size=RESIZE_SIZE)
    return base


@pytest.fixture(scope="module")
def loaded(export_base):
    return tf.saved_model.load(str(export_base / "1"))


# `import tensorflow` itself imports Keras when Keras is installed (tensorflow/__init__.py eagerly
# imports keras.src.optimizers), so a TF-only child hides keras, tf_keras and tfmir as if they were
# not installed: the SavedModel must need none of them.
TF_ONLY_PRELUDE = textwrap.dedent("""
    import importlib.abc, importlib.machinery, sys

    class NotInstalled(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("keras", "tf_keras", "tfmir"):
                return importlib.machinery.ModuleSpec(name, self)
            return None

        def create_module(self, spec):
            raise ModuleNotFoundError(f"No module named {spec.name!r}")

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, NotInstalled())
    import numpy as np
    import tensorflow as tf
""")
TF_ONLY_CHECK = textwrap.dedent("""
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in ("keras", "tfmir"))
    assert "keras" not in sys.modules and "tfmir" not in sys.modules, loaded
    print("pure-tf-ok")
""")


def _run_tf_only(code: str, cwd, *arguments) -> None:
    result = subprocess.run([sys.executable, "-c", code, *map(str, arguments)],
                            capture_output=True, text=True, timeout=300, cwd=cwd,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0 and "pure-tf-ok" in result.stdout, result.stderr[-3000:]


def _keras_embeddings(model, encoded_images) -> np.ndarray:
    """The reference: tfmir's eager decode + eval preprocessing, then the Keras model."""
    pixels = np.stack([preprocess_image(decode_image(tf.constant(encoded)), training=False,
                                        image_size=model.image_size, resize_size=RESIZE_SIZE)
                       for encoded in encoded_images])
    return keras.ops.convert_to_numpy(model(pixels, training=False))


def test_bytes_signature_matches_the_keras_model(model, loaded, images):
    encoded = list(images.values())
    serve = loaded.signatures["serving_default"]
    embeddings = serve(images=tf.constant(encoded))["embedding"].numpy()
    assert embeddings.shape == (len(encoded), 128) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, _keras_embeddings(model, encoded), atol=1e-5)
    # Different images give different embeddings, so the comparison above means something.
    assert np.abs(embeddings[0] - embeddings[2]).max() > 1e-3


def test_pixels_signature_matches_the_keras_model(model, loaded):
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 45, 60, 3)).astype("float32")
    embeddings = loaded.signatures["embed_pixels"](pixels=tf.constant(pixels))["embedding"]
    expected = model(preprocess_image(pixels, training=False, image_size=32,
                                      resize_size=RESIZE_SIZE), training=False)
    np.testing.assert_allclose(embeddings.numpy(), keras.ops.convert_to_numpy(expected), atol=1e-5)


def test_signatures_refuse_wrong_dtypes_and_shapes(loaded):
    embed_pixels = loaded.signatures["embed_pixels"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a float tensor"):
        embed_pixels(pixels=tf.zeros([1, 8, 8, 3], tf.uint8))
    for wrong_shape in ([8, 8, 3], [1, 8, 8, 4]):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=r"Shape of tensor pixels .* is not compatible with expected"):
            embed_pixels(pixels=tf.zeros(wrong_shape))
    serve = loaded.signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a string tensor"):
        serve(images=tf.zeros([1]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="is not compatible with expected"):
        serve(images=tf.constant([[b"x"]]))
    # The tf.function attributes check their input signature when called.
    with pytest.raises(TypeError, match="float32"):
        loaded.embed_pixels(tf.zeros([1, 8, 8, 3], tf.uint8))


def test_empty_batches_give_no_embeddings(loaded):
    assert loaded.signatures["serving_default"](
        images=tf.constant([], tf.string))["embedding"].shape == (0, 128)
    assert loaded.signatures["embed_pixels"](
        pixels=tf.zeros([0, 9, 9, 3]))["embedding"].shape == (0, 128)


def test_loads_and_runs_with_tensorflow_only_in_a_fresh_process(model, export_base, images,
                                                                 tmp_path):
    paths = []
    for name, encoded in images.items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(encoded)
    code = TF_ONLY_PRELUDE + textwrap.dedent("""
        serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
        images = [open(path, "rb").read() for path in sys.argv[3:]]
        np.save(sys.argv[2], serve(images=tf.constant(images))["embedding"].numpy())
    """) + TF_ONLY_CHECK
    output = tmp_path / "embeddings.npy"
    _run_tf_only(code, tmp_path, export_base / "1", output, *paths)
    np.testing.assert_allclose(np.load(output), _keras_embeddings(model, images.values()),
                               atol=1e-5)


def _op_types(export_directory) -> set:
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((export_directory / "saved_model.pb").read_bytes())
    op_types, function_names = set(), set()
    for meta_graph in proto.meta_graphs:
        op_types |= {node.op for node in meta_graph.graph_def.node}
        for function in meta_graph.graph_def.library.function:
            function_names.add(function.signature.name)
            op_types |= {node.op for node in function.node_def}
    return op_types - function_names  # calls of library functions, checked through their bodies


def test_export_holds_only_core_tensorflow_ops(export_base, hash_exports):
    # The hashing export packs its bits in the graph too.
    for directory in (export_base / "1", hash_exports[36][1]):
        op_types = _op_types(directory)
        assert {"DecodePng", "ExtractJpegShape", "Conv2D", "ResizeBilinear"} <= op_types
        assert not op_types & PYTHON_OPS
        unregistered = sorted(op for op in op_types if op_def_registry.get(op) is None)
        assert not unregistered, f"ops not registered in TensorFlow: {unregistered}"


def test_export_info_describes_the_export(model, export_base):
    info = read_export_info(export_base)  # the base directory resolves to its newest version
    assert info == read_export_info(export_base / "1")
    assert info["model_fingerprint"] == model_fingerprint(model)
    assert info["model_config"] == json.loads(json.dumps(model.get_config()))
    assert info["image_size"] == 32 and info["resize_size"] == RESIZE_SIZE
    assert info["embedding_dim"] == 128
    assert (info["output"], info["output_kind"], info["model_outputs"]) == (
        "embedding", "float", ["embedding"])
    assert info["max_image_pixels"] == 50_000_000 and info["tfmir_version"]
    assert set(info["signatures"]) == {"serving_default", "embed_pixels"}
    # Only what TF Serving expects sits beside saved_model.pb; the description is in assets.extra.
    assert (export_base / "1" / EXPORT_INFO_DIR / EXPORT_INFO_FILE).is_file()
    assert set(os.listdir(export_base / "1")) <= {"saved_model.pb", "variables", "assets",
                                                  "fingerprint.pb", EXPORT_INFO_DIR}
    assert os.listdir(export_base) == ["1"]


def test_model_fingerprint_depends_only_on_config_and_weights(model):
    fingerprint = model_fingerprint(model)
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    keras.utils.set_random_seed(0)
    twin = Embedder.from_preset("tiny")
    assert model_fingerprint(twin) == fingerprint
    last = twin.weights[-1]
    last.assign(last + 1e-3)
    assert model_fingerprint(twin) != fingerprint
    assert model_fingerprint(Embedder.from_preset("tiny", embedding_dim=64)) != fingerprint


def test_decompression_bombs_are_refused_before_decoding(loaded, images):
    # Headers claiming 100000 × 100000 (PNG) and 65000 × 65000 (JPEG; libjpeg's limit is 65500)
    # pixels in files of a few hundred bytes. Had decoding started first, the error would be the
    # decoder's (bad CRC, truncated data, or an allocation failure) instead of the size check's.
    png_bomb = bytearray(images["gray_png"])
    png_bomb[16:24] = (100_000).to_bytes(4, "big") * 2
    jpeg_bomb = bytearray(images["jpeg"])
    offset = _jpeg_size_offset(images["jpeg"])
    jpeg_bomb[offset:offset + 4] = (65_000).to_bytes(2, "big") * 2
    serve = loaded.signatures["serving_default"]
    for bomb, num_pixels in ((png_bomb, 10_000_000_000), (jpeg_bomb, 65_000 * 65_000)):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match=rf"(?s)larger than max_image_pixels=50000000.*\[{num_pixels}\]"):
            serve(images=tf.constant([images["rgb_png"], bytes(bomb)]))


def test_images_under_the_minimum_side_are_refused(loaded):
    import io

    from PIL import Image

    def png(width, height):
        buffer = io.BytesIO()
        Image.new("RGB", (width, height), (200, 10, 10)).save(buffer, format="PNG")
        return buffer.getvalue()

    serve = loaded.signatures["serving_default"]
    for width, height in ((1, 1), (300, 7)):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match="side shorter than the minimum of 8 pixels"):
            serve(images=tf.constant([png(width, height)]))
    assert serve(images=tf.constant([png(8, 300)]))["embedding"].shape[0] == 1


@pytest.mark.parametrize("corrupt, message", [
    (lambda images: b"", "image bytes are empty"),
    (lambda images: b"GIF89a\x10", "GIF bytes are truncated"),
    (lambda images: b"plain text, not an image", "neither PNG, JPEG nor GIF"),
    (lambda images: b"BM" + images["jpeg"], "neither PNG, JPEG nor GIF"),
    (lambda images: images["rgb_png"][:20], "PNG bytes are truncated"),
    (lambda images: images["rgb_png"][:12] + b"IEND" + images["rgb_png"][16:], "IHDR"),
    (lambda images: images["rgb_png"][:60], "Invalid PNG data"),
    (lambda images: b"\xff\xd8\xff\xe0 broken jpeg", "Invalid JPEG data"),
    (lambda images: images["jpeg"][:400], "JPEG"),
])
def test_corrupt_bytes_are_refused_with_clear_errors(loaded, images, corrupt, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        loaded.signatures["serving_default"](images=tf.constant([images["jpeg"], corrupt(images)]))


def _snapshot(directory) -> dict:
    return {os.path.relpath(os.path.join(root, name), directory):
            hashlib.sha256(open(os.path.join(root, name), "rb").read()).hexdigest()
            for root, _, names in os.walk(directory) for name in names}


def test_export_replaces_an_existing_export(model, export_base, images, tmp_path):
    base = tmp_path / "tfmir"
    shutil.copytree(export_base, base)
    export_saved_model(model, base / "1", resize_size=RESIZE_SIZE, max_image_pixels=1000)
    assert read_export_info(base)["max_image_pixels"] == 1000
    assert os.listdir(base) == ["1"]  # no temporary or previous directory left behind
    serve = tf.saved_model.load(str(base / "1")).signatures["serving_default"]
    assert serve(images=tf.constant([images["jpeg"]]))["embedding"].shape == (1, 128)  # 784 px
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_image_pixels=1000"):
        serve(images=tf.constant([images["rgb_png"]]))  # 50 × 40 = 2000 pixels


def test_a_failed_export_leaves_the_target_untouched(model, export_base, tmp_path, monkeypatch):
    base = tmp_path / "tfmir"
    shutil.copytree(export_base, base)
    before = _snapshot(base)

    def fail_mid_write(directory, info):
        assert os.path.isfile(os.path.join(directory, "saved_model.pb"))  # half done
        raise RuntimeError("disk full")

    monkeypatch.setattr(saved_model_module, "_write_export_info", fail_mid_write)
    with pytest.raises(RuntimeError, match="disk full"):
        export_saved_model(model, base / "1", resize_size=40)
    assert _snapshot(base) == before
    assert os.listdir(base) == ["1"]


def test_a_failed_swap_restores_the_previous_export(model, export_base, tmp_path, monkeypatch):
    base = tmp_path / "tfmir"
    shutil.copytree(export_base, base)
    before = _snapshot(base)
    real_rename, calls = os.rename, []

    def rename(old, new):
        calls.append((old, new))
        if len(calls) == 2:  # moving the new export into place, after the old one went aside
            raise OSError("interrupted")
        real_rename(old, new)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="interrupted"):
        export_saved_model(model, base / "1", resize_size=40)
    monkeypatch.undo()
    assert len(calls) == 3  # aside, in (failed), back
    assert _snapshot(base) == before
    assert os.listdir(base) == ["1"]


def test_export_refuses_to_replace_a_directory_that_is_not_an_export(model, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a SavedModel export"):
        export_saved_model(model, tmp_path, resize_size=RESIZE_SIZE)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_export_validates_its_arguments(model, tmp_path):
    with pytest.raises(ValueError, match="resize_size must be an integer >= the model's"):
        export_saved_model(model, tmp_path / "1", resize_size=16)
    with pytest.raises(ValueError, match="max_image_pixels must be a positive integer"):
        export_saved_model(model, tmp_path / "1", resize_size=RESIZE_SIZE, max_image_pixels=0)
    assert not (tmp_path / "1").exists()


def test_resolve_export_directory_picks_the_newest_version(tmp_path):
    for version in ("1", "2", "10"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "saved_model.pb").write_bytes(b"")
    (tmp_path / "11").mkdir()  # no saved_model.pb: not a version
    (tmp_path / ".12.tfmir-tmp-x").mkdir()
    assert resolve_export_directory(tmp_path) == str(tmp_path / "10")
    assert resolve_export_directory(tmp_path / "2") == str(tmp_path / "2")
    with pytest.raises(FileNotFoundError, match="No SavedModel in"):
        resolve_export_directory(tmp_path / "11")


# --- Hashing models: {"code", "mask"} -------------------------------------------------------


@pytest.fixture(scope="module")
def hash_exports(tmp_path_factory):
    """{num_bits: (stand-in hashing model, its export directory)} for 36 (not a multiple of 8)
    and 64 bits; the 64-bit model has no "mask" output."""
    root = tmp_path_factory.mktemp("hash_exports")
    exports = {}
    for num_bits, with_mask in ((36, True), (64, False)):
        model = hash_model(num_bits, HASH_IMAGE_SIZE, with_mask=with_mask, seed=num_bits)
        export_saved_model(model, root / str(num_bits) / "1", resize_size=HASH_RESIZE_SIZE)
        exports[num_bits] = (model, root / str(num_bits) / "1")
    return exports


def _keras_outputs(model, encoded_images) -> dict:
    """The reference: eager decode + eval preprocessing, then the Keras model's outputs."""
    pixels = np.stack([preprocess_image(decode_image(tf.constant(encoded)), training=False,
                                        image_size=HASH_IMAGE_SIZE, resize_size=HASH_RESIZE_SIZE)
                       for encoded in encoded_images])
    outputs = {name: keras.ops.convert_to_numpy(value)
               for name, value in model(pixels, training=False).items()}
    # No code value on a rounding edge, so its sign (the bit) is the same in any graph.
    assert np.abs(outputs["code"]).min() > 1e-4
    return outputs


def _check_codes(outputs: dict, values: np.ndarray) -> None:
    """"code" holds np.packbits(values > 0) and "bits" the same bits as -1 / +1."""
    num_bits = values.shape[1]
    assert outputs["code"].dtype == np.uint8 and outputs["bits"].dtype == np.float32
    assert outputs["code"].shape == (len(values), -(-num_bits // 8))
    np.testing.assert_array_equal(outputs["code"], np.packbits(values > 0, axis=1))
    np.testing.assert_array_equal(outputs["bits"], np.where(values > 0, 1.0, -1.0))


def test_hash_signatures_give_packed_codes_bits_and_masks(hash_exports, images):
    encoded = list(images.values())
    for num_bits, (model, directory) in hash_exports.items():
        loaded = tf.saved_model.load(str(directory))
        expected = _keras_outputs(model, encoded)
        served = loaded.signatures["serving_default"](images=tf.constant(encoded))
        assert set(served) == {"code", "bits"}
        _check_codes({name: value.numpy() for name, value in served.items()}, expected["code"])
        # Different images give different codes, so the comparison means something.
        assert len({bytes(row) for row in served["code"].numpy()}) > 1

        pixels = np.random.default_rng(0).uniform(0, 255, (2, 30, 25, 3)).astype("float32")
        from_pixels = loaded.signatures["embed_pixels"](pixels=tf.constant(pixels))
        values = keras.ops.convert_to_numpy(model(preprocess_image(
            pixels, training=False, image_size=HASH_IMAGE_SIZE,
            resize_size=HASH_RESIZE_SIZE))["code"])
        _check_codes({name: value.numpy() for name, value in from_pixels.items()}, values)

        empty = loaded.signatures["serving_default"](images=tf.constant([], tf.string))
        assert empty["code"].shape == (0, -(-num_bits // 8))
        assert empty["bits"].shape == (0, num_bits)

        if "mask" in expected:
            segment = loaded.signatures["segment_images"]
            masks = segment(images=tf.constant(encoded))["mask"].numpy()
            assert masks.shape == (len(encoded), HASH_IMAGE_SIZE, HASH_IMAGE_SIZE, 1)
            np.testing.assert_allclose(masks, expected["mask"], atol=1e-5)
            assert segment(images=tf.constant([], tf.string))["mask"].shape == (0, 16, 16, 1)
            # The header checks of serving_default guard this signature too.
            with pytest.raises(tf.errors.InvalidArgumentError, match="shorter than the minimum"):
                segment(images=tf.constant([_encode(np.zeros((4, 4, 3), np.uint8), "PNG")]))
        else:
            assert "segment_images" not in loaded.signatures


def test_hash_exports_run_with_tensorflow_only(hash_exports, images, tmp_path):
    paths = []
    for name, encoded in images.items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(encoded)
    code = TF_ONLY_PRELUDE + textwrap.dedent("""
        images = tf.constant([open(path, "rb").read() for path in sys.argv[3:]])
        loaded = tf.saved_model.load(sys.argv[1])
        outputs = {name: value.numpy()
                   for name, value in loaded.signatures["serving_default"](images=images).items()}
        if "segment_images" in loaded.signatures:
            outputs["mask"] = loaded.signatures["segment_images"](images=images)["mask"].numpy()
        np.savez(sys.argv[2], **outputs)
    """) + TF_ONLY_CHECK
    for num_bits, (model, directory) in hash_exports.items():
        output = tmp_path / f"outputs{num_bits}.npz"
        _run_tf_only(code, tmp_path, directory, output, *paths)
        expected = _keras_outputs(model, images.values())
        with np.load(output) as served:
            _check_codes({"code": served["code"], "bits": served["bits"]}, expected["code"])
            assert ("mask" in served) == ("mask" in expected)
            if "mask" in expected:
                np.testing.assert_allclose(served["mask"], expected["mask"], atol=1e-5)


def test_export_info_describes_a_hash_export(hash_exports):
    info = read_export_info(hash_exports[36][1])
    assert (info["output"], info["output_kind"], info["num_bits"]) == ("code", "hash", 36)
    assert info["model_outputs"] == ["code", "mask"] and "embedding_dim" not in info
    assert info["model_fingerprint"] == model_fingerprint(hash_exports[36][0])
    codes = {"code": "uint8 [None, 5]", "bits": "float32 [None, 36]"}
    assert info["signatures"] == {
        "serving_default": {"inputs": {"images": "string [None]"}, "outputs": codes},
        "embed_pixels": {"inputs": {"pixels": "float32 [None, None, None, 3]"}, "outputs": codes},
        "segment_images": {"inputs": {"images": "string [None]"},
                           "outputs": {"mask": "float32 [None, 16, 16, 1]"}},
    }
    info = read_export_info(hash_exports[64][1])
    assert info["num_bits"] == 64 and set(info["signatures"]) == {"serving_default",
                                                                  "embed_pixels"}
    assert info["signatures"]["serving_default"]["outputs"]["code"] == "uint8 [None, 8]"


def test_a_dict_model_without_a_retrieval_output_is_not_exported(tmp_path):
    images = keras.Input((16, 16, 3))
    model = keras.Model(images, {"mask": keras.layers.Conv2D(1, 1)(images)})
    with pytest.raises(ValueError, match=r"expected an 'embedding' or a 'code' output. "
                                         r"Received a model with outputs \['mask'\]"):
        export_saved_model(model, tmp_path / "1", resize_size=16)
    assert not (tmp_path / "1").exists()
