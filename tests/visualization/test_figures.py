import csv

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image

from tfmir.visualization import (
    MATCH_COLOR,
    MISMATCH_COLOR,
    distance_ratios,
    plot_distance_ratios,
    plot_recall_curves,
    recall_curves,
    save_retrieval_comparison,
)
from tfmir.visualization.figures import INTER_COLOR, INTRA_COLOR


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def _has_color(pixels, color, tolerance=2):
    rgb = np.round(np.array(to_rgb(color) if isinstance(color, str) else color) *
                   (255 if isinstance(color, str) else 1))
    return bool(np.any(np.all(np.abs(pixels.astype(int) - rgb) <= tolerance, axis=-1)))


def test_distance_ratios_match_an_explicit_loop():
    rng = np.random.default_rng(0)
    student = rng.normal(size=(7, 4))
    teacher = rng.normal(size=(7, 3))
    teacher[5] = teacher[2]  # a duplicate for the teacher: that pair has no ratio
    labels = np.array([0, 1, 0, 2, 1, 0, 1])
    intra, inter = distance_ratios(student, teacher, labels)
    expected_intra, expected_inter = [], []
    for i in range(7):
        for j in range(i + 1, 7):
            teacher_distance = np.sqrt(np.sum((teacher[i] - teacher[j]) ** 2))
            if teacher_distance <= 1e-6:
                continue
            ratio = np.sqrt(np.sum((student[i] - student[j]) ** 2)) / teacher_distance
            (expected_intra if labels[i] == labels[j] else expected_inter).append(ratio)
    assert len(intra) + len(inter) == 21 - 1
    np.testing.assert_allclose(intra, expected_intra, rtol=1e-10)
    np.testing.assert_allclose(inter, expected_inter, rtol=1e-10)
    with pytest.raises(ValueError, match="one row per item. Received 7, 7 and 6"):
        distance_ratios(student, teacher, labels[:6])


def _write_log(path, columns):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", *columns])
        for epoch in range(4):
            writer.writerow([epoch, *[values[epoch] for values in columns.values()]])


def test_recall_curves_png_has_one_panel_per_log_and_a_line_per_source(tmp_path):
    fused = tmp_path / "fused.csv"
    _write_log(fused, {"loss": [3, 2, 1, 0.5], "val_recall@1": [0.3, 0.4, 0.5, 0.45],
                       "val_recall@1_retina": [0.2, 0.4, 0.5, 0.45],
                       "val_recall@1_xray": [0.6, 0.5, 0.4, 0.3]})
    single = tmp_path / "single.csv"
    _write_log(single, {"val_recall@1": [0.1, 0.2, 0.3, 0.4]})
    from tfmir.training import read_log

    assert list(recall_curves(read_log(fused))) == ["retina", "xray"]
    assert list(recall_curves(read_log(single))) == [""]

    path = plot_recall_curves(tmp_path / "fig2.png", {"fused": fused, "single": single},
                              steps_per_epoch={"fused": 100, "single": 50})
    pixels = _pixels(path)
    assert pixels.shape == (360, 2 * 480, 3)
    left, right = pixels[:, :480], pixels[:, 480:]
    # Two sources on the left (C0, C1), one curve on the right (C0 only).
    assert _has_color(left, "C0") and _has_color(left, "C1")
    assert _has_color(right, "C0") and not _has_color(right, "C1")
    with pytest.raises(ValueError, match="no val_recall@2 column"):
        plot_recall_curves(tmp_path / "bad.png", {"single": single}, steps_per_epoch=1, k=2)


def test_distance_ratio_histograms(tmp_path):
    rng = np.random.default_rng(0)
    ratios = {"skin": (rng.normal(1.2, 0.1, 300), rng.normal(1.1, 0.05, 900)),
              "xray": (rng.normal(1.0, 0.1, 300), np.array([]))}
    path = plot_distance_ratios(tmp_path / "fig4.png", ratios)
    pixels = _pixels(path)
    assert pixels.shape == (360, 2 * 480, 3)
    assert _has_color(pixels[:, :480], INTRA_COLOR) and _has_color(pixels[:, :480], INTER_COLOR)
    # The right panel has no inter-class pairs: no inter-class histogram colour.
    assert _has_color(pixels[:, 480:], INTRA_COLOR)
    assert not _has_color(pixels[:, 480:], INTER_COLOR)


def _color_runs(line):
    """Run-length encoding of a pixel row, white left out: [(colour, length), ...]."""
    runs = []
    for pixel in map(tuple, line):
        if pixel == (255, 255, 255):
            runs.append(None)
        elif runs and runs[-1] is not None and runs[-1][0] == pixel:
            runs[-1] = (pixel, runs[-1][1] + 1)
        else:
            runs.append((pixel, 1))
    return [run for run in runs if run is not None]


def test_retrieval_comparison_frames_each_models_row(tmp_path):
    rng = np.random.default_rng(0)
    tile, border, k = 40, 4, 3
    queries = rng.integers(0, 255, (2, 28, 28, 3), dtype=np.uint8)
    images = rng.integers(0, 255, (2, k, 28, 28, 3), dtype=np.uint8)
    specialist_labels = np.array([[0, 0, 1], [1, 0, 1]])
    universal_labels = np.array([[1, 0, 0], [1, 1, 1]])
    path = save_retrieval_comparison(
        tmp_path / "fig5.png", queries, [0, 1],
        {"specialist": (images, specialist_labels), "universal": (images, universal_labels)},
        class_names=["normal", "pneumonia"], query_titles=["xray", "xray"], tile_size=tile,
        border=border)
    pixels = _pixels(path)
    # Find the rows: the query tile's top-left corner carries the query frame colour at x = 1.
    column = pixels[:, 1]
    query_color = tuple(pixels[np.flatnonzero(np.any(column != 255, axis=1))[0], 1])
    tops = [y for y in range(1, len(column)) if tuple(column[y]) == query_color
            and tuple(column[y - 1]) != query_color]
    assert len(tops) == 4  # 2 queries x 2 models
    expected_rows = [specialist_labels[0] == 0, universal_labels[0] == 0,
                     specialist_labels[1] == 1, universal_labels[1] == 1]
    for top, matches in zip(tops, expected_rows):
        runs = _color_runs(pixels[top + 1])  # inside the top frame of every tile of the row
        colors = [color for color, length in runs if length >= tile - 2]
        assert colors[0] == query_color
        assert colors[1:] == [MATCH_COLOR if match else MISMATCH_COLOR for match in matches]
