import numpy as np
import pytest
from PIL import Image, ImageDraw

from tfmir.visualization import MATCH_COLOR, MISMATCH_COLOR, save_gallery


def test_frames_are_green_for_same_class_and_red_otherwise(tmp_path):
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 255, (2, 28, 28, 3), dtype=np.uint8)
    results = rng.integers(0, 255, (2, 3, 28, 28), dtype=np.uint8)  # grayscale results work too
    result_labels = np.array([[0, 1, 0], [1, 1, 0]])
    path = save_gallery(tmp_path / "g.png", queries, [0, 1], results, result_labels,
                        class_names=["normal", "pneumonia"], tile_size=40, border=4)
    image = np.asarray(Image.open(path).convert("RGB"))
    caption, gap, tile = 14, 12, 40
    row_height = tile + 2 * caption
    for row in range(2):
        for rank in range(3):
            top = row * row_height + caption
            left = tile + gap + rank * (tile + 2)
            corner = tuple(image[top + 1, left + 1])
            expected = MATCH_COLOR if result_labels[row, rank] == row else MISMATCH_COLOR
            assert corner == expected, (row, rank, corner)
    # The query tile shows the query image itself (nearest-neighbour upscaling of pixel [0, 0]).
    assert tuple(image[caption + 4, 4]) == tuple(queries[0, 0, 0])


def _captions(monkeypatch) -> list:
    """Records every text `save_gallery` draws."""
    drawn = []
    original = ImageDraw.ImageDraw.text

    def text(self, xy, message, *args, **kwargs):
        drawn.append(message)
        return original(self, xy, message, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    return drawn


def test_a_predicted_label_is_captioned_as_a_prediction(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 255, (1, 28, 28, 3), dtype=np.uint8)
    results = rng.integers(0, 255, (1, 2, 28, 28, 3), dtype=np.uint8)
    names = ["normal", "pneumonia"]
    drawn = _captions(monkeypatch)
    # The query's true label is unknown (`tfmir search` without --query_label).
    path = save_gallery(tmp_path / "predicted.png", queries, None, results, [[1, 0]],
                        predicted_labels=[1], class_names=names, tile_size=40, border=4)
    assert "predicted: pneumonia" in drawn
    assert not any(text.startswith("query:") for text in drawn), drawn
    # With nothing else to go by, frames compare each result with the prediction.
    image = np.asarray(Image.open(path).convert("RGB"))
    caption, gap, tile = 14, 12, 40
    corners = [tuple(image[caption + 1, tile + gap + rank * (tile + 2) + 1]) for rank in range(2)]
    assert corners == [MATCH_COLOR, MISMATCH_COLOR]

    drawn.clear()
    # Both known: the caption gives both, and frames compare with the true label.
    path = save_gallery(tmp_path / "both.png", queries, [0], results, [[1, 0]],
                        predicted_labels=[1], class_names=names, tile_size=40, border=4)
    assert "query: normal" in drawn and "predicted: pneumonia" in drawn
    image = np.asarray(Image.open(path).convert("RGB"))
    corners = [tuple(image[caption + 1, tile + gap + rank * (tile + 2) + 1]) for rank in range(2)]
    assert corners == [MISMATCH_COLOR, MATCH_COLOR]

    with pytest.raises(ValueError, match="true labels or their predicted labels"):
        save_gallery(tmp_path / "none.png", queries, None, results, [[1, 0]])
