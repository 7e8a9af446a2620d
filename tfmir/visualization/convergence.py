"""Paper 001's Fig. 2: training-set kNN accuracy per epoch, deep-kNN loss against triplet loss.

`plot_convergence` draws, for each data set (one panel), one curve per training run from the
`train_knn...` column its `log.csv` holds (`tfmir.training.evaluators.TrainingKNNClassification`):
the paper's blue deep-kNN curve and orange triplet curve. Drawn on a `matplotlib.figure.Figure`
with the Agg canvas, never through pyplot; the PNG is written atomically.

Reference:
    Zhuang et al., "Deep kNN for Medical Image Classification", MICCAI 2020,
    https://doi.org/10.1007/978-3-030-59710-8_13, Fig. 2.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from tfmir.visualization.figures import DPI, _new_figure, _read_history, _save_figure

DEFAULT_METRIC = "train_knn@1_accuracy"


def convergence_curve(history: Mapping, metric: str = DEFAULT_METRIC):
    """(epochs, values) of one column of a training log, epochs counted from 1.

    Args:
        history: {column: values} as `tfmir.training.read_log` returns.
        metric: the column.

    Returns:
        Two float arrays of equal length.

    Raises:
        ValueError: the log has no such column (the message lists its columns).
    """
    if metric not in history:
        raise ValueError(f"the training log has no {metric!r} column. Columns: {sorted(history)}")
    values = np.asarray(history[metric], dtype=np.float64)
    epochs = np.asarray(history.get("epoch", np.arange(len(values))), dtype=np.float64) + 1
    return epochs, values


def plot_convergence(path: os.PathLike, panels: Mapping[str, Mapping], *,
                     metric: str = DEFAULT_METRIC, ylabel: str | None = None,
                     dpi: int = DPI) -> str:
    """Plots one training metric against the epoch: one panel per data set, one curve per run.

    Args:
        path: output PNG.
        panels: {panel title: {curve label: a `log.csv` path or a {column: values} history}},
            e.g. {"Skin-7": {"deep kNN": "runs/skin7/deep_knn/log.csv", "triplet": ...}}.
            Curves take the colours C0, C1, ... in order (deep kNN first: blue, as in the paper).
        metric: the log column to plot.
        ylabel: the y-axis label (default: `metric`).
        dpi: pixels per inch; each panel is `PANEL_SIZE` inches.

    Returns:
        The path written.

    Example:

    ```python
    plot_convergence("fig2.png", {"Skin-7": {"deep kNN": "runs/deep_knn/log.csv",
                                             "triplet": "runs/triplet/log.csv"}})
    ```
    """
    from matplotlib.ticker import MaxNLocator

    if not panels or not all(panels.values()):
        raise ValueError("panels must hold at least one panel, each with at least one log. "
                         f"Received: {dict(panels)!r}")
    figure, axes = _new_figure(len(panels), dpi=dpi)
    for axis, (title, logs) in zip(axes, panels.items()):
        for index, (label, log) in enumerate(logs.items()):
            epochs, values = convergence_curve(_read_history(log), metric)
            axis.plot(epochs, values, marker="o", markersize=3, color=f"C{index}", label=label)
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(ylabel or metric)
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize="small")
    figure.tight_layout()
    return _save_figure(figure, path)
