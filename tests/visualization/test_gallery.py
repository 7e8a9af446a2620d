import numpy as np
from PIL import Image

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
