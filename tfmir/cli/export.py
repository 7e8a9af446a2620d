"""`tfmir export`: write a trained embedder as a SavedModel that TF Serving loads unchanged.

    tfmir export --model=runs/sample/best.keras --output=exported/tfmir
    tfmir export --model=runs/sample/best.keras --output=exported/tfmir --version=2

Writes <output>/<version>/ (saved_model.pb, variables/, assets.extra/export_info.json), the layout
TF Serving expects under its --model_base_path. Signatures: `serving_default` (a batch of JPEG or
PNG bytes -> `embedding`) and `embed_pixels` (float pixels in [0, 255] -> `embedding`); a model
that outputs hash codes (a "code" output) answers both with `code` (packed bits, uint8) and
`bits` (±1), and a model with a "mask" output adds `segment_images` (bytes -> `mask` at the
model's input crop). The resize side comes from the `config.json` that `tfmir train` writes next
to the checkpoint, unless --resize_size is given.
"""

from __future__ import annotations

import json
import os
import zipfile

from absl import app, flags

# Not from tfmir.export, which imports TensorFlow: flag parsing and input errors stay fast.
from tfmir.serving.backends import DEFAULT_MAX_IMAGE_PIXELS

_MODEL = flags.DEFINE_string("model", None, "Keras checkpoint from `tfmir train` "
                             "(e.g. runs/sample/best.keras).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "TF Serving base directory; the export goes to "
                              "<output>/<version>.", required=True)
_VERSION = flags.DEFINE_integer("version", 1, "Model version (the numeric sub-directory TF Serving "
                                "loads; it serves the highest).", lower_bound=0)
_RESIZE_SIZE = flags.DEFINE_integer(
    "resize_size", None, "Side images are resized to before the central crop (default: "
    "`resize_size` from config.json next to --model, as written by `tfmir train`).", lower_bound=1)
_MAX_IMAGE_PIXELS = flags.DEFINE_integer(
    "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS, "Refuse images whose header gives more pixels "
    "(height × width) than this, before decoding them.", lower_bound=1)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing <output>/<version>.")

CONFIG_FILE = "config.json"


class ExportError(Exception):
    """A problem with the command's inputs, reported as one line without a traceback."""


def check_model_path(path: str) -> str:
    if not os.path.exists(path):
        raise ExportError(f"--model={path} does not exist. Expected a .keras checkpoint written by "
                          "`tfmir train` (e.g. runs/sample/best.keras).")
    if os.path.isdir(path) or not path.endswith(".keras"):
        raise ExportError(f"--model={path} is not a .keras file. Expected a Keras checkpoint "
                          "written by `tfmir train` (e.g. runs/sample/best.keras).")
    if not zipfile.is_zipfile(path):
        raise ExportError(f"--model={path} is not a valid .keras file (not a zip archive); it may "
                          "be truncated or corrupted.")
    return path


def read_resize_size(model_path: str) -> tuple[int, dict | None]:
    """The resize side from --resize_size or from config.json next to the checkpoint."""
    config_path = os.path.join(os.path.dirname(os.path.abspath(model_path)), CONFIG_FILE)
    if _RESIZE_SIZE.value is not None:
        return _RESIZE_SIZE.value, None
    if not os.path.isfile(config_path):
        raise ExportError(f"--resize_size is required: there is no {CONFIG_FILE} next to "
                          f"{model_path} (`tfmir train` writes one with the resize side).")
    try:
        with open(config_path) as stream:
            config = json.load(stream)
        resize_size = int(config["resize_size"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ExportError(f"could not read resize_size from {config_path} ({error!r}); pass "
                          "--resize_size.") from error
    return resize_size, config


def load_model(path: str):
    import keras

    import tfmir.models  # noqa: F401  (registers tfmir's Keras classes for loading)

    try:
        return keras.saving.load_model(path)
    except Exception as error:  # Keras raises many types for a bad archive
        raise ExportError(f"could not load --model={path} as a Keras model: "
                          f"{type(error).__name__}: {error}") from error


def _describe(spec) -> str:
    shape = "[" + ", ".join("None" if size is None else str(size) for size in spec.shape) + "]"
    return f"{spec.dtype.name} {shape}"


def signature_lines(export_directory: str) -> list[str]:
    """One line per signature of the written export, read back from disk."""
    import tensorflow as tf

    loaded = tf.saved_model.load(export_directory)
    lines = []
    for name, function in sorted(loaded.signatures.items()):
        inputs = ", ".join(f"{key}: {_describe(spec)}"
                           for key, spec in sorted(function.structured_input_signature[1].items()))
        outputs = ", ".join(f"{key}: {_describe(spec)}"
                            for key, spec in sorted(function.structured_outputs.items()))
        lines.append(f"  {name}({inputs}) -> {{{outputs}}}")
    return lines


def export(model_path: str, output: str, version: int) -> None:
    model_path = check_model_path(model_path)
    resize_size, config = read_resize_size(model_path)
    target = os.path.join(output, str(version))
    if os.path.exists(target) and not _OVERWRITE.value:
        raise ExportError(f"{target} already exists; choose another --version (TF Serving serves "
                          "the highest) or pass --overwrite to replace it.")
    model = load_model(model_path)
    image_size = getattr(model, "image_size", None)
    trained_size = (config or {}).get("model", {}).get("image_size")
    if trained_size is not None and image_size is not None and trained_size != image_size:
        raise ExportError(f"{CONFIG_FILE} next to {model_path} is for image_size={trained_size} "
                          f"but the model takes image_size={image_size}; pass --resize_size.")
    if image_size is not None and resize_size < image_size:
        raise ExportError(f"--resize_size={resize_size} is smaller than the model's "
                          f"image_size={image_size}.")

    from tfmir.export import export_saved_model, read_export_info

    try:
        path = export_saved_model(model, target, resize_size=resize_size,
                                  max_image_pixels=_MAX_IMAGE_PIXELS.value)
    except (ValueError, FileExistsError) as error:
        raise ExportError(str(error)) from error
    info = read_export_info(path)
    print(f"Wrote SavedModel version {version} to {path}")
    print(f"  model {model_path} (fingerprint {info['model_fingerprint'][:16]}...), "
          f"image_size {info['image_size']}, resize_size {info['resize_size']}, "
          f"max_image_pixels {info['max_image_pixels']}")
    print("Signatures:")
    for line in signature_lines(path):
        print(line)
    print(f"Serve it with TF Serving: --model_base_path={os.path.abspath(output)}")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        export(_MODEL.value, _OUTPUT.value, _VERSION.value)
    except ExportError as error:
        raise SystemExit(f"tfmir export: error: {error}") from None
