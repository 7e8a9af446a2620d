"""Retrieval galleries: each row a query followed by its top-k results, framed green or red."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from tfmir.files import write_atomic

MATCH_COLOR = (0, 170, 0)
MISMATCH_COLOR = (210, 0, 0)
QUERY_COLOR = (60, 60, 60)


def _tile(image: np.ndarray, size: int, color, border: int) -> Image.Image:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    side = size - 2 * border
    # Upscaled thumbnails keep their pixels visible; larger images are downscaled smoothly.
    resample = Image.NEAREST if max(image.shape[:2]) <= side else Image.BILINEAR
    inner = Image.fromarray(image[..., :3]).resize((side, side), resample)
    tile = Image.new("RGB", (size, size), color)
    tile.paste(inner, (border, border))
    return tile


def save_gallery(path: os.PathLike, query_images, query_labels, result_images, result_labels, *,
                 predicted_labels=None, class_names=None, row_titles=None, tile_size: int = 96,
                 border: int = 5) -> str:
    """Writes a PNG: one row per query, the query on the left, then its results in rank order.

    Each result is framed green when its label equals the query's and red otherwise; the label
    name is written under every tile. The query's caption says what is known: "query: <label>"
    for its true label, "predicted: <label>" for a prediction (both when both are given). When
    the true labels are unknown the frames compare each result with the prediction.

    Args:
        path: output PNG path (written atomically).
        query_images: (Q, H, W[, 3]) uint8 images.
        query_labels: (Q,) int true labels of the queries, or None when they are not known
            (then `predicted_labels` is required).
        result_images: (Q, K, H, W[, 3]) uint8 images of the top-K results.
        result_labels: (Q, K) int labels of the results.
        predicted_labels: optional (Q,) int labels predicted for the queries (e.g. the
            majority label of their results).
        class_names: label index -> name (default: the index).
        row_titles: optional text per row (e.g. the source), written above the query.
        tile_size: side of one tile in pixels.
        border: frame width in pixels.

    Returns:
        The path written.
    """
    if query_labels is None and predicted_labels is None:
        raise ValueError("need the queries' true labels or their predicted labels (or both). "
                         "Received: query_labels=None, predicted_labels=None")
    result_labels = np.asarray(result_labels)
    num_queries, k = result_labels.shape
    known = None if query_labels is None else np.asarray(query_labels).reshape(-1)
    predicted = None if predicted_labels is None else np.asarray(predicted_labels).reshape(-1)
    if (len(query_images) != num_queries or len(result_images) != num_queries
            or any(len(labels) != num_queries for labels in (known, predicted)
                   if labels is not None)):
        raise ValueError(
            f"need one row of results and one label per query; received {len(query_images)} "
            f"queries, {len(result_images)} result rows and labels of shape "
            f"{result_labels.shape}."
        )
    # A prediction is no ground truth: frames compare with the true label when there is one.
    reference = known if known is not None else predicted
    name = (lambda label: str(class_names[int(label)])) if class_names is not None else str
    caption, gap = 14, 12
    width = (k + 1) * tile_size + gap + k * 2
    # A prediction gets a caption line of its own, below the results' labels it may run into.
    row_height = tile_size + (2 if predicted is None else 3) * caption
    canvas = Image.new("RGB", (width, num_queries * row_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row in range(num_queries):
        top = row * row_height + caption
        if row_titles is not None:
            draw.text((2, top - caption + 1), str(row_titles[row]), fill=(0, 0, 0))
        canvas.paste(_tile(query_images[row], tile_size, QUERY_COLOR, border), (0, top))
        if known is not None:
            draw.text((2, top + tile_size + 1), f"query: {name(known[row])}", fill=(0, 0, 0))
        if predicted is not None:
            draw.text((2, top + tile_size + 1 + caption), f"predicted: {name(predicted[row])}",
                      fill=(0, 0, 0))
        for rank in range(k):
            match = result_labels[row, rank] == reference[row]
            left = tile_size + gap + rank * (tile_size + 2)
            tile = _tile(result_images[row][rank], tile_size,
                         MATCH_COLOR if match else MISMATCH_COLOR, border)
            canvas.paste(tile, (left, top))
            draw.text((left + 2, top + tile_size + 1), f"{rank + 1}: {name(result_labels[row, rank])}",
                      fill=MATCH_COLOR if match else MISMATCH_COLOR)
    path = os.fspath(path)
    write_atomic(path, lambda stream: canvas.save(stream, format="PNG"))
    return path
