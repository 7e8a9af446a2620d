"""The image sizes every tfmir reader accepts, checked from the header before decoding.

Training, `tfmir index` / `search` (`tfmir.data.find_unreadable`), `tfmir serve`
(`tfmir.serving.check_image`) and exported SavedModels (the graph's header check) refuse the same
images. This module imports nothing heavy, so the HTTP front end can use it without TensorFlow.
"""

from __future__ import annotations

# The most pixels (height × width, from the header) an image may have before it is decoded, in
# every reader (training, `tfmir index` / `search`, `tfmir serve`, exported SavedModels).
# Decoding takes several bytes per pixel; a decompression bomb is a small file whose header
# promises a huge image.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# The shortest side an image may have: smaller ones carry nothing to retrieve by (a 1 × 1 image
# would be upsampled to one flat colour and still get a confident answer).
MIN_IMAGE_SIDE = 8


def image_size_problem(width: int, height: int, max_image_pixels: int) -> str | None:
    """Why an image of `width` × `height` pixels (from its header) must not be decoded, or None."""
    if width * height > max_image_pixels:
        return (f"{width} × {height} = {width * height} pixels, more than "
                f"max_image_pixels={max_image_pixels}")
    if min(width, height) < MIN_IMAGE_SIDE:
        return f"{width} × {height} pixels, a side shorter than the minimum of {MIN_IMAGE_SIDE}"
    return None
