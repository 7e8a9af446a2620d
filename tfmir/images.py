"""What images every tfmir reader accepts, and how they reach a model: one decision for all.

Training and evaluation (`tfmir.data.make_dataset`), `tfmir index` / `tfmir search`
(`tfmir.data.find_unreadable`, `tfmir.index.load_embedding_function`), `tfmir serve`
(`tfmir.serving`) and exported SavedModels (their graph's header check) treat an image the same
way:

- Size limits come from the header, before anything is decoded: more than `max_image_pixels`
  (default `DEFAULT_MAX_IMAGE_PIXELS`) pixels is refused as too large (a decompression bomb is a
  small file whose header promises a huge image); a side under `MIN_IMAGE_SIDE` is refused as too
  small (a 1 × 1 image would be upsampled to one flat colour and still get a confident answer).
- PNG (8 or 16 bits, gray, RGB, palette, alpha), JPEG (gray, RGB, CMYK) and GIF are decoded by
  TensorFlow (`tfmir.data.decode_image`, inside SavedModels too); a JPEG's EXIF orientation is
  applied (a phone photo comes out upright); a GIF gives its first frame; alpha is dropped;
  16-bit values v become round(v / 257).
- Other formats PIL reads (BMP, TIFF, WebP, ...) and DICOM (with the optional `pydicom`:
  `pip install tfmir[dicom]`; uncompressed pixel data, the first frame, its modality LUT, then
  its first window (else its own min..max) mapped onto 0..255, MONOCHROME1 inverted) are
  decoded here with the same rules (`decode_rgb`); to reach a SavedModel they are re-encoded as
  PNG (`graph_bytes`).
- Anything else (empty, truncated, not an image) is refused with the reason.

This module imports no TensorFlow, so the HTTP front end of `tfmir serve` can use it.
"""

from __future__ import annotations

import dataclasses
import io
import struct

import numpy as np

# The most pixels (height × width, from the header) an image may have before it is decoded, in
# every reader. Decoding takes several bytes per pixel (about 16 for an 8-bit RGB PNG: the pixels,
# then float32 for the resize).
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# The shortest side an image may have.
MIN_IMAGE_SIDE = 8

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
# A DICOM file (Part 10) has a 128-byte preamble, then "DICM".
DICOM_MAGIC_OFFSET = 128
DICOM_MAGIC = b"DICM"
# The formats the TensorFlow graph decodes itself (`tfmir.data.decode_image`).
GRAPH_FORMATS = ("PNG", "JPEG", "GIF")
# 16-bit -> 8-bit: round(value / 257) maps 0..65535 onto 0..255 and 257 * v back onto v.
SIXTEEN_BIT_DIVISOR = 257


class ImageError(ValueError):
    """An image no reader accepts. The message says what it is ("an empty file", "corrupt
    (...)", ...), to follow "the image is"; `too_large` is set when its pixel count is the
    problem."""

    def __init__(self, message: str, *, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


@dataclasses.dataclass(frozen=True)
class ImageHeader:
    """What an image's header says: its format (PIL's name, or "DICOM") and size in pixels."""

    format: str
    width: int
    height: int


def image_size_problem(width: int, height: int, max_image_pixels: int) -> str | None:
    """Why an image of `width` × `height` pixels (from its header) must not be decoded, or None."""
    if width * height > max_image_pixels:
        return (f"{width} × {height} = {width * height} pixels, more than "
                f"max_image_pixels={max_image_pixels}")
    if min(width, height) < MIN_IMAGE_SIDE:
        return f"{width} × {height} pixels, a side shorter than the minimum of {MIN_IMAGE_SIDE}"
    return None


def is_dicom(data: bytes) -> bool:
    return data[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + len(DICOM_MAGIC)] == DICOM_MAGIC


def read_header(data: bytes, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageHeader:
    """Reads an image's format and size from its header alone and checks the size limits.

    Args:
        data: the encoded image (the whole file).
        max_image_pixels: the most pixels (height × width) it may have.

    Returns:
        Its `ImageHeader`.

    Raises:
        ImageError: empty bytes, no image format known here, an unreadable header, or a size
            outside the limits (`too_large` set when it has too many pixels).
    """
    if not data:
        raise ImageError("an empty file")
    header = _dicom_header(data) if is_dicom(data) else _pil_header(data)
    problem = image_size_problem(header.width, header.height, max_image_pixels)
    if problem:
        raise ImageError(problem,
                         too_large=header.width * header.height > max_image_pixels)
    return header


def _pil_header(data: bytes) -> ImageHeader:
    from PIL import GifImagePlugin, Image, JpegImagePlugin, PngImagePlugin

    # The format's own reader for the graph formats: it reads the header only, and without PIL's
    # process-wide decompression-bomb limit, so max_image_pixels alone decides.
    readers = ((PNG_SIGNATURE, PngImagePlugin.PngImageFile),
               (JPEG_SIGNATURE, JpegImagePlugin.JpegImageFile),
               (GIF_SIGNATURES, GifImagePlugin.GifImageFile))
    try:
        for signature, reader in readers:
            if data.startswith(signature):
                with reader(io.BytesIO(data)) as image:
                    return ImageHeader(image.format, *image.size)
        with Image.open(io.BytesIO(data)) as image:
            return ImageHeader(image.format or "unknown", *image.size)
    except Image.DecompressionBombError as error:
        raise ImageError(f"too large to decode safely ({error})",
                         too_large=True) from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"not in a known image format (it starts with {data[:8]!r}); PNG, JPEG, "
                         "GIF, BMP, TIFF and DICOM are read") from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error) as error:
        # What PIL's readers raise for a damaged header.
        raise ImageError(f"corrupt (unreadable header: {error})") from None


def _dicom_module():
    try:
        import pydicom
    except ImportError:
        raise ImageError("a DICOM file, which needs the optional pydicom package: "
                         "pip install 'tfmir[dicom]'") from None
    return pydicom


def _read_dicom(data: bytes, *, pixels: bool):
    pydicom = _dicom_module()
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=not pixels)
    except Exception as error:  # noqa: BLE001 - pydicom raises many kinds for a damaged file
        raise ImageError(f"a corrupt DICOM file ({type(error).__name__}: {error})") from None


def _dicom_header(data: bytes) -> ImageHeader:
    dataset = _read_dicom(data, pixels=False)
    rows, columns = dataset.get("Rows"), dataset.get("Columns")
    if not rows or not columns:
        raise ImageError("a DICOM file without an image (no Rows / Columns)")
    return ImageHeader("DICOM", int(columns), int(rows))


def decode_rgb(data: bytes, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decodes any accepted image with PIL (or pydicom) into uint8 RGB, by the rules above.

    This is the decoder for the formats TensorFlow does not read; for PNG, JPEG and GIF it gives
    what `tfmir.data.decode_image` gives (up to the JPEG decoder's rounding), which the tests
    check.

    Args:
        data: the encoded image.
        max_image_pixels: checked from the header before decoding.

    Returns:
        uint8 array (H, W, 3).

    Raises:
        ImageError: as `read_header`, or when the pixel data cannot be decoded.
    """
    header = read_header(data, max_image_pixels)
    if header.format == "DICOM":
        return _decode_dicom(data)
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
                pixels = np.asarray(image, dtype=np.int64)
                pixels = np.clip((pixels + SIXTEEN_BIT_DIVISOR // 2) // SIXTEEN_BIT_DIVISOR,
                                 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
            elif image.mode == "F":
                image = Image.fromarray(np.clip(np.rint(np.asarray(image)), 0, 255)
                                        .astype(np.uint8))
            else:
                image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Image.DecompressionBombError as error:
        raise ImageError(f"too large to decode safely ({error})",
                         too_large=True) from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error) as error:
        raise ImageError(f"corrupt ({type(error).__name__}: {error})") from None


def _decode_dicom(data: bytes) -> np.ndarray:
    dataset = _read_dicom(data, pixels=True)
    from pydicom.pixels import apply_modality_lut

    try:
        pixels = dataset.pixel_array
    except Exception as error:  # noqa: BLE001 - compressed syntaxes need extra plugins, ...
        raise ImageError(f"a DICOM file whose pixel data cannot be decoded "
                         f"({type(error).__name__}: {error})") from None
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    interpretation = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if pixels.ndim == 3 and interpretation == "RGB":
        return np.clip(pixels, 0, 255).astype(np.uint8)
    if pixels.ndim != 2 or not interpretation.startswith("MONOCHROME"):
        raise ImageError(f"a {interpretation} DICOM image of shape {pixels.shape}; only "
                         "MONOCHROME1/2 and RGB images are read")
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        # The first window the file recommends, mapped linearly onto 0..255.
        center = float(np.ravel(dataset.WindowCenter)[0])
        width = float(np.ravel(dataset.WindowWidth)[0])
        low, high = center - width / 2, center + width / 2
        values = np.clip(values, low, high)
    else:
        low, high = values.min(), values.max()
    scaled = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
    if interpretation == "MONOCHROME1":  # 0 is white
        scaled = 255 - scaled
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def graph_bytes(data: bytes, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> bytes:
    """The bytes to give a SavedModel's `serving_default` for an accepted image.

    PNG, JPEG and GIF go through unchanged (the graph decodes them, EXIF orientation included);
    any other accepted format is decoded by `decode_rgb` and re-encoded as an 8-bit RGB PNG, so
    the graph sees the same pixels.

    Raises:
        ImageError: as `read_header` / `decode_rgb`.
    """
    header = read_header(data, max_image_pixels)
    if header.format in GRAPH_FORMATS:
        return data
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(decode_rgb(data, max_image_pixels)).save(buffer, format="PNG")
    return buffer.getvalue()
