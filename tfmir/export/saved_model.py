"""SavedModel export of an embedder, ready for TF Serving and for plain `tf.saved_model.load`.

The export holds two or three signatures built from core TensorFlow ops only (no
`tf.py_function`, no Keras), so stock TF Serving loads it unchanged and a consumer needs neither
tfmir nor Keras:

- `serving_default(images)`: a batch of encoded PNG, JPEG or GIF files (tf.string, shape [None])
  -> `{"embedding": float32 [None, D]}`. Each image is checked (empty bytes, unknown format, more
  than `max_image_pixels` pixels or a side under `tfmir.images.MIN_IMAGE_SIDE` according to its
  header), decoded with `tfmir.data.decode_image` (grayscale and 16-bit PNGs, CMYK JPEGs, a
  JPEG's EXIF orientation, a GIF's first frame) and preprocessed exactly as in evaluation
  (`preprocess_image(training=False)`: resize, central crop). Other formats (BMP, TIFF, DICOM)
  go in as PNG: `tfmir.images.graph_bytes` converts them, as `tfmir serve` and `tfmir search`
  do.
- `embed_pixels(pixels)`: float32 pixels in [0, 255], shape [None, None, None, 3] (one batch of
  equally sized RGB images) -> the same preprocessing -> the same outputs.

A hashing model (a "code" output, `tfmir.models.retrieval_output`) of k bits answers both
signatures with `{"code": uint8 [None, ceil(k / 8)], "bits": float32 [None, k]}` instead: bit i
is set where the model's code value i is positive; "code" packs the bits most significant first
with zero padding (the bytes of `np.packbits(values > 0, axis=1)`, a form `HammingIndex` takes),
"bits" holds them as -1.0 / +1.0. A model with a "mask" output gets a third signature:

- `segment_images(images)`: the same bytes, checks and preprocessing as `serving_default` ->
  `{"mask": float32 [None, S, S, 1]}`, foreground probabilities at the model's input crop
  (S × S, the central crop of the image resized to `resize_size`), not at the image's size.

Layout: TF Serving watches `<base>/<version>/saved_model.pb`; `export_saved_model` writes one
version directory atomically (`tfmir.files.atomic_directory`) and records what it exported in
`<version>/assets.extra/export_info.json` (TF Serving ignores `assets.extra/`).

Example:

```python
export_saved_model(model, "exported/tfmir/1", resize_size=72)

# Anywhere, with TensorFlow only:
serve = tf.saved_model.load("exported/tfmir/1").signatures["serving_default"]
embedding = serve(images=tf.constant([open("query.png", "rb").read()]))["embedding"]
# a hashing model: serve(images=...)["code"] (packed bytes) and ["bits"] (±1)
```
"""

from __future__ import annotations

import hashlib
import json
import os

import keras
import numpy as np
import tensorflow as tf

import tfmir
from tfmir.data.pipeline import decode_image, preprocess_image
from tfmir.files import atomic_directory
from tfmir.images import (DEFAULT_MAX_IMAGE_PIXELS, GIF_SIGNATURES, JPEG_SIGNATURE, MIN_IMAGE_SIDE,
                          PNG_SIGNATURE)
from tfmir.models.outputs import (CODE, EMBEDDING, HASH, MASK, has_mask, output_names,
                                  output_shape, retrieval_output, select_output)

SERVING_SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "embed_pixels"
MASK_SIGNATURE = "segment_images"
OUTPUT_KEY = EMBEDDING
CODE_KEY = CODE  # packed hash bits, uint8
BITS_KEY = "bits"  # the same bits as float32 ±1
MASK_KEY = MASK
EXPORT_INFO_DIR = "assets.extra"
EXPORT_INFO_FILE = "export_info.json"
EXPORT_FORMAT_VERSION = 1

# PNG: 8-byte signature, then the IHDR chunk: length (4), "IHDR" (4), width (4), height (4), the
# other 5 header bytes and a CRC (4). Width and height are big-endian unsigned 32-bit integers.
_IHDR_TYPE_OFFSET = 12
_IHDR_SIZE_OFFSET = 16
_PNG_MIN_LENGTH = 33
# GIF: 6-byte signature, then the logical screen's width and height, little-endian 16-bit; every
# frame TensorFlow decodes has that size.
_GIF_SIZE_OFFSET = 6
_GIF_MIN_LENGTH = 13


def model_fingerprint(model) -> str:
    """A sha256 hex digest of a model's configuration and weights.

    The same configuration and weight values always give the same fingerprint (in any process);
    any change to a weight gives another. Weights are hashed in `model.weights` order (fixed by the
    architecture) with their shapes and dtypes; variable names are left out because Keras may
    number them differently from one process to the next.

    Args:
        model: a built `keras.Model` with a `get_config()`.

    Returns:
        64 hexadecimal characters.

    Example:

    ```python
    assert model_fingerprint(model) == model_fingerprint(keras.saving.load_model(path))
    ```
    """
    digest = hashlib.sha256()
    config = {"class": type(model).__name__, "config": model.get_config()}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode("utf-8"))
    for weight in model.weights:
        values = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"|{values.dtype.str}{values.shape}|".encode("ascii"))
        digest.update(values.tobytes())
    return digest.hexdigest()


# `export_saved_model` has an argument of the same name.
_compute_fingerprint = model_fingerprint


def _image_shape(encoded: tf.Tensor, max_image_pixels: int) -> tf.Tensor:
    """Reads (height, width) from a PNG, JPEG or GIF header, refusing what must not be decoded.

    Raises InvalidArgumentError (at run time) for empty bytes, bytes of another format, a
    truncated PNG or GIF header, images of more than `max_image_pixels` pixels (a decompression
    bomb is a small file whose header promises a huge image, so only the header is read here) and
    images with a side under `MIN_IMAGE_SIDE` — the rules of `tfmir.images`.
    """
    length = tf.strings.length(encoded)
    not_empty = tf.debugging.assert_positive(
        length, message="image bytes are empty (a zero-length string)")
    with tf.control_dependencies([not_empty]):
        is_png = tf.equal(tf.strings.substr(encoded, 0, len(PNG_SIGNATURE)), PNG_SIGNATURE)
        is_jpeg = tf.equal(tf.strings.substr(encoded, 0, len(JPEG_SIGNATURE)), JPEG_SIGNATURE)
        signature = tf.strings.substr(encoded, 0, len(GIF_SIGNATURES[0]))
        is_gif = tf.reduce_any(tf.equal(signature, GIF_SIGNATURES))
    known_format = tf.debugging.assert_equal(
        tf.reduce_any(tf.stack([is_png, is_jpeg, is_gif])), True,
        message="image bytes are neither PNG, JPEG nor GIF (unknown file signature; other "
                "formats are converted to PNG by tfmir.images.graph_bytes)")

    def png_shape():
        long_enough = tf.debugging.assert_greater_equal(
            length, _PNG_MIN_LENGTH, message="PNG bytes are truncated before the end of the header")
        with tf.control_dependencies([long_enough]):
            has_header = tf.debugging.assert_equal(
                tf.strings.substr(encoded, _IHDR_TYPE_OFFSET, 4), b"IHDR",
                message="PNG bytes do not start with an IHDR chunk")
        with tf.control_dependencies([has_header]):
            width_height = tf.io.decode_raw(tf.strings.substr(encoded, _IHDR_SIZE_OFFSET, 8),
                                            tf.int32, little_endian=False)
        # Sizes of 2**31 and more read as negative int32 values; PNG forbids them anyway.
        valid = tf.debugging.assert_positive(
            width_height, message="PNG header gives a zero or out-of-range width or height")
        with tf.control_dependencies([valid]):
            return tf.cast(tf.reverse(width_height, axis=[0]), tf.int64)

    def gif_shape():
        long_enough = tf.debugging.assert_greater_equal(
            length, _GIF_MIN_LENGTH, message="GIF bytes are truncated before the end of the header")
        with tf.control_dependencies([long_enough]):
            width_height = tf.io.decode_raw(tf.strings.substr(encoded, _GIF_SIZE_OFFSET, 4),
                                            tf.uint16, little_endian=True)
        return tf.cast(tf.reverse(width_height, axis=[0]), tf.int64)

    def jpeg_shape():
        return tf.cast(tf.image.extract_jpeg_shape(encoded)[:2], tf.int64)

    with tf.control_dependencies([known_format]):
        height_width = tf.case([(is_png, png_shape), (is_gif, gif_shape)], default=jpeg_shape,
                               exclusive=True)
    small_enough = tf.debugging.assert_less_equal(
        height_width[0] * height_width[1], tf.constant(max_image_pixels, tf.int64),
        message=f"image is larger than max_image_pixels={max_image_pixels} (height × width, read "
                "from its header; the first value below is the image's pixel count)")
    large_enough = tf.debugging.assert_greater_equal(
        tf.reduce_min(height_width), tf.constant(MIN_IMAGE_SIDE, tf.int64),
        message=f"image has a side shorter than the minimum of {MIN_IMAGE_SIDE} pixels (read "
                "from its header; the first value below is its shorter side)")
    with tf.control_dependencies([small_enough, large_enough]):
        return tf.identity(height_width)


def pack_sign_bits(codes: tf.Tensor, num_bits: int) -> tf.Tensor:
    """Packs the sign bits of real-valued codes into bytes, in the graph, with core ops only.

    Bit i (set where `codes[:, i] > 0`) lands in byte i // 8, most significant bit first, and
    the bits past `num_bits` in the last byte are zero: the bytes of `np.packbits(codes > 0,
    axis=1)`, the packed-bytes form `tfmir.index.pack_bits` takes.

    Args:
        codes: float (B, num_bits).
        num_bits: the code length.

    Returns:
        uint8 (B, ceil(num_bits / 8)).
    """
    num_bytes = -(-num_bits // 8)
    bits = tf.cast(codes > 0, tf.int32)
    bits = tf.pad(bits, [[0, 0], [0, num_bytes * 8 - num_bits]])
    weights = tf.constant([128, 64, 32, 16, 8, 4, 2, 1], tf.int32)
    packed = tf.reduce_sum(tf.reshape(bits, [-1, num_bytes, 8]) * weights, axis=-1)
    return tf.cast(packed, tf.uint8)


class _ServingModule(tf.Module):
    """The exported object: the model's variables and the serving functions.

    Only the variables are tracked, not the Keras model, so nothing Keras-specific (and no
    optimizer state of a training checkpoint) is written.
    """

    def __init__(self, model, *, image_size: int, resize_size: int, max_image_pixels: int):
        super().__init__(name="tfmir_embedder")
        self.model_variables = list(model.variables)
        output_spec = tf.TensorSpec([image_size, image_size, 3], tf.float32)
        name, kind = retrieval_output(model)
        dimension = int(output_shape(model, name)[-1])

        def run(pixels, output, empty_shape):
            def run_model():
                outputs = model(pixels, training=False)
                return tf.cast(select_output(outputs, output), tf.float32)

            def no_images():
                return tf.zeros(empty_shape, tf.float32)

            # Some kernels (oneDNN convolution) fail on an empty batch; answer it directly.
            values = tf.cond(tf.shape(pixels)[0] > 0, run_model, no_images)
            return tf.ensure_shape(values, [None, *empty_shape[1:]])

        def embed(pixels):
            values = run(pixels, name, [0, dimension])
            if kind == HASH:
                return {CODE_KEY: pack_sign_bits(values, dimension),
                        BITS_KEY: tf.where(values > 0, 1.0, -1.0)}
            return {OUTPUT_KEY: values}

        def one_image(encoded):
            with tf.control_dependencies([_image_shape(encoded, max_image_pixels)]):
                # Decoding starts only once the header checks above have passed.
                encoded = tf.identity(encoded)
            return preprocess_image(decode_image(encoded), training=False,
                                    image_size=image_size, resize_size=resize_size)

        # A signature called by name (TF Serving, `loaded.signatures[...]`) checks dtypes but not
        # shapes; EnsureShape checks them at run time with a clear InvalidArgumentError.
        def decode_images(images):
            images = tf.ensure_shape(images, [None])
            # Images differ in size, so decode and preprocess one at a time, then batch.
            return tf.map_fn(one_image, images, fn_output_signature=output_spec)

        def serve_pixels(pixels):
            pixels = tf.ensure_shape(pixels, [None, None, None, 3])
            return embed(preprocess_image(pixels, training=False, image_size=image_size,
                                          resize_size=resize_size))

        images_spec = tf.TensorSpec([None], tf.string, name="images")
        self.serve_images = tf.function(lambda images: embed(decode_images(images)),
                                        input_signature=[images_spec])
        self.embed_pixels = tf.function(
            serve_pixels,
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="pixels")])
        if has_mask(model):
            mask_shape = [0, *output_shape(model, MASK)[1:]]
            self.segment_images = tf.function(
                lambda images: {MASK_KEY: run(decode_images(images), MASK, mask_shape)},
                input_signature=[images_spec])


def _model_image_size(model) -> int:
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2] or shape[3] != 3:
        raise ValueError("model must take square RGB images of shape (batch, S, S, 3). "
                         f"Received input_shape={shape}")
    return int(getattr(model, "image_size", None) or shape[1])


def _is_replaceable(directory: str) -> bool:
    """An existing directory may be replaced only if it is empty or holds a SavedModel."""
    if not os.path.isdir(directory):
        return False
    entries = os.listdir(directory)
    return not entries or "saved_model.pb" in entries


def _write_export_info(directory: str, info: dict) -> None:
    folder = os.path.join(directory, EXPORT_INFO_DIR)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, EXPORT_INFO_FILE), "w") as stream:
        json.dump(info, stream, indent=2, sort_keys=True, default=str)
        stream.write("\n")


def export_saved_model(model, directory, *, resize_size: int,
                       max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                       model_fingerprint: str | None = None) -> str:
    """Writes `model` as a SavedModel with image-bytes and float-pixel serving signatures.

    What the signatures return depends on the model's outputs (`tfmir.models.outputs`; see the
    module docstring): `{"embedding"}` for an embedder, `{"code", "bits"}` for a hashing model,
    plus a `segment_images` signature for a model with a "mask" output.

    The export is written into a hidden temporary sibling of `directory` and renamed into place,
    so `directory` is either the complete new export or, after any failure, untouched. An existing
    `directory` is replaced only if it is empty or holds a SavedModel. For TF Serving, pass a
    version directory `<base>/<version>` (TF Serving ignores the non-numeric temporary names).

    Args:
        model: an embedder (`tfmir.models.Embedder` or any Keras model from (B, S, S, 3) pixels in
            [0, 255] to (B, D) embeddings), or a model with a dict of outputs: "embedding" or
            "code" (float (B, k), whose signs are the hash bits), and optionally "mask" (float
            (B, S, S, 1) probabilities).
        directory: the directory to write (created with its parents).
        resize_size: the side images are resized to before the central crop to the model's input
            size; use the value the model was trained and evaluated with (`tfmir train` writes it
            to `config.json` in its workdir).
        max_image_pixels: images whose header gives more pixels (height × width) are refused
            before decoding. Decoding takes several bytes of memory per pixel (a 16-bit-capable
            PNG decode, then float32 for the resize) and `tf.map_fn` decodes up to 10 images of a
            batch at once, so lower the limit on small servers.
        model_fingerprint: the model's fingerprint; computed with `model_fingerprint(model)` when
            None.

    Returns:
        The absolute path of the export.

    Example:

    ```python
    model = keras.saving.load_model("runs/sample/best.keras")
    export_saved_model(model, "exported/tfmir/1", resize_size=72)
    ```
    """
    image_size = _model_image_size(model)
    if int(resize_size) != resize_size or resize_size < image_size:
        raise ValueError(f"resize_size must be an integer >= the model's image_size={image_size}. "
                         f"Received: resize_size={resize_size!r}")
    if int(max_image_pixels) != max_image_pixels or max_image_pixels < 1:
        raise ValueError("max_image_pixels must be a positive integer. "
                         f"Received: max_image_pixels={max_image_pixels!r}")
    resize_size, max_image_pixels = int(resize_size), int(max_image_pixels)
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not _is_replaceable(directory):
        raise FileExistsError(f"{directory} exists and is not a SavedModel export; refusing to "
                              "replace it. Choose another directory.")
    name, kind = retrieval_output(model)  # before any work: a model without one is refused
    fingerprint = model_fingerprint or _compute_fingerprint(model)
    dimension = int(output_shape(model, name)[-1])

    module = _ServingModule(model, image_size=image_size, resize_size=resize_size,
                            max_image_pixels=max_image_pixels)
    signatures = {
        SERVING_SIGNATURE: module.serve_images.get_concrete_function(),
        PIXELS_SIGNATURE: module.embed_pixels.get_concrete_function(),
    }
    if kind == HASH:
        outputs = {CODE_KEY: f"uint8 [None, {-(-dimension // 8)}]",
                   BITS_KEY: f"float32 [None, {dimension}]"}
        sizes = {"num_bits": dimension}
    else:
        outputs = {OUTPUT_KEY: f"float32 [None, {dimension}]"}
        sizes = {"embedding_dim": dimension}
    described = {
        SERVING_SIGNATURE: {"inputs": {"images": "string [None]"}, "outputs": outputs},
        PIXELS_SIGNATURE: {"inputs": {"pixels": "float32 [None, None, None, 3]"},
                           "outputs": outputs},
    }
    if has_mask(model):
        signatures[MASK_SIGNATURE] = module.segment_images.get_concrete_function()
        mask_shape = ", ".join(str(size) for size in output_shape(model, MASK)[1:])
        described[MASK_SIGNATURE] = {"inputs": {"images": "string [None]"},
                                     "outputs": {MASK_KEY: f"float32 [None, {mask_shape}]"}}
    info = {
        "format_version": EXPORT_FORMAT_VERSION,
        "tfmir_version": tfmir.__version__,
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "model_class": keras.saving.get_registered_name(type(model)),
        "model_config": model.get_config(),
        "model_fingerprint": fingerprint,
        "image_size": image_size,
        "resize_size": resize_size,
        "model_outputs": list(output_names(model)) or [EMBEDDING],
        "output": name,
        "output_kind": kind,
        **sizes,
        "max_image_pixels": max_image_pixels,
        "signatures": described,
    }

    # A hidden, non-numeric name: TF Serving never mistakes a half-written export for a version.
    with atomic_directory(directory) as temporary:
        tf.saved_model.save(module, str(temporary), signatures=signatures)
        _write_export_info(str(temporary), info)
    return directory


def resolve_export_directory(directory) -> str:
    """The directory holding `saved_model.pb`: `directory` itself or its newest numeric version.

    Args:
        directory: a SavedModel directory, or a TF Serving base directory of `<version>/` folders.

    Returns:
        The SavedModel directory (for a base directory, the highest version, as TF Serving serves).
    """
    directory = os.fspath(directory)
    if os.path.isfile(os.path.join(directory, "saved_model.pb")):
        return directory
    versions = []
    if os.path.isdir(directory):
        versions = [int(entry) for entry in os.listdir(directory) if entry.isdigit()
                    and os.path.isfile(os.path.join(directory, entry, "saved_model.pb"))]
    if not versions:
        raise FileNotFoundError(
            f"No SavedModel in {directory}: expected saved_model.pb there or in a numeric version "
            "folder (<base>/<version>/saved_model.pb, as `tfmir export` writes).")
    return os.path.join(directory, str(max(versions)))


def read_export_info(directory) -> dict:
    """Reads `assets.extra/export_info.json` of an export written by `export_saved_model`.

    Args:
        directory: the SavedModel directory or its TF Serving base directory (newest version).

    Returns:
        The export's description: tfmir_version, model_config, model_fingerprint, image_size,
        resize_size, output ("embedding" or "code"), output_kind ("float" or "hash"),
        embedding_dim (float) or num_bits (hash), model_outputs, max_image_pixels, signatures,
        ... Exports written before output_kind was recorded are float ones.
    """
    export_directory = resolve_export_directory(directory)
    path = os.path.join(export_directory, EXPORT_INFO_DIR, EXPORT_INFO_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{export_directory} holds a SavedModel but no "
                                f"{EXPORT_INFO_DIR}/{EXPORT_INFO_FILE}; it was not written by "
                                "tfmir's export_saved_model.")
    with open(path) as stream:
        return json.load(stream)
