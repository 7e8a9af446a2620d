"""Fig. 2 of paper 001: training kNN accuracy curves from training logs."""

import csv

import numpy as np
import pytest
from PIL import Image

from tfmir.visualization import convergence_curve, plot_convergence


def _write_log(path, values):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "loss", "train_knn@1_accuracy"])
        for epoch, value in enumerate(values):
            writer.writerow([epoch, 1.0 / (epoch + 1), value])
    return path


def test_curve_counts_epochs_from_one():
    epochs, values = convergence_curve({"epoch": [0, 1, 2], "train_knn@1_accuracy": [.5, .6, .7]})
    np.testing.assert_array_equal(epochs, [1, 2, 3])
    np.testing.assert_array_equal(values, [.5, .6, .7])
    with pytest.raises(ValueError, match=r"no 'train_knn@5_accuracy' column. Columns: \['epoch'"):
        convergence_curve({"epoch": [0]}, "train_knn@5_accuracy")


def test_two_panels_of_two_curves(tmp_path):
    logs = {"deep kNN": _write_log(tmp_path / "deep.csv", [0.5, 0.7, 0.8]),
            "triplet": {"epoch": [0, 1, 2], "train_knn@1_accuracy": [0.4, 0.5, 0.6]}}
    path = plot_convergence(tmp_path / "fig2.png", {"Skin-7": logs, "pneumonia": logs})
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (360, 960, 3)  # two 4.8 x 3.6 inch panels at 100 dpi
    assert pixels.std() > 5
    # The paper's colours: blue for deep kNN (first), orange for the triplet loss (second).
    assert (np.abs(pixels.astype(int) - [31, 119, 180]).sum(axis=2) < 30).sum() > 50
    assert (np.abs(pixels.astype(int) - [255, 127, 14]).sum(axis=2) < 30).sum() > 50
    with pytest.raises(ValueError, match="at least one panel"):
        plot_convergence(tmp_path / "empty.png", {})
