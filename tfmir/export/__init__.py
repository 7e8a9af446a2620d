"""SavedModel export for TF Serving and plain-TensorFlow consumers."""

from tfmir.export.saved_model import (
    DEFAULT_MAX_IMAGE_PIXELS,
    EXPORT_INFO_DIR,
    EXPORT_INFO_FILE,
    OUTPUT_KEY,
    PIXELS_SIGNATURE,
    SERVING_SIGNATURE,
    export_saved_model,
    model_fingerprint,
    read_export_info,
    resolve_export_directory,
)

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "EXPORT_INFO_DIR",
    "EXPORT_INFO_FILE",
    "OUTPUT_KEY",
    "PIXELS_SIGNATURE",
    "SERVING_SIGNATURE",
    "export_saved_model",
    "model_fingerprint",
    "read_export_info",
    "resolve_export_directory",
]
