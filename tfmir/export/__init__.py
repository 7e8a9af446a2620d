"""SavedModel export for TF Serving and plain-TensorFlow consumers."""

from tfmir.export.saved_model import (
    BITS_KEY,
    CODE_KEY,
    DEFAULT_MAX_IMAGE_PIXELS,
    EXPORT_INFO_DIR,
    EXPORT_INFO_FILE,
    MASK_KEY,
    MASK_SIGNATURE,
    OUTPUT_KEY,
    PIXELS_SIGNATURE,
    SERVING_SIGNATURE,
    export_saved_model,
    model_fingerprint,
    pack_sign_bits,
    read_export_info,
    resolve_export_directory,
)

__all__ = [
    "BITS_KEY",
    "CODE_KEY",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "EXPORT_INFO_DIR",
    "EXPORT_INFO_FILE",
    "MASK_KEY",
    "MASK_SIGNATURE",
    "OUTPUT_KEY",
    "PIXELS_SIGNATURE",
    "SERVING_SIGNATURE",
    "export_saved_model",
    "model_fingerprint",
    "pack_sign_bits",
    "read_export_info",
    "resolve_export_directory",
]
