"""The universal-embedding paper's figures: Recall@1 curves, distance ratios, retrieval rows.

- `plot_recall_curves`: validation Recall@K per source against the training step, from the CSV
  logs the trainers write (Figs. 2 and 3 of the paper).
- `distance_ratios` / `plot_distance_ratios`: for every pair of items, the student's distance over
  the teacher's, split into same-class and different-class pairs, and their histograms (Fig. 4).
- `save_retrieval_comparison`: a query with the top-K of several models, one row each, framed
  green/red like `save_gallery` (Fig. 5).

Plots are drawn on a `matplotlib.figure.Figure` rendered by the Agg canvas, never through pyplot,
so no global backend is switched and nothing needs a display. PNGs are written atomically.

Reference:
    Feng, Liu, Luo, "Universal Model for Multi-Domain Medical Image Retrieval", Figs. 2-5,
    https://arxiv.org/abs/2007.08628
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from tfmir.files import write_atomic
from tfmir.visualization.gallery import save_gallery

PANEL_SIZE = (4.8, 3.6)  # inches per panel; with DPI = 100 a panel is 480 x 360 pixels
DPI = 100
INTRA_COLOR = "#1f77b4"
INTER_COLOR = "#ff7f0e"


def _new_figure(num_panels: int, panel_size=PANEL_SIZE, dpi: int = DPI):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(panel_size[0] * num_panels, panel_size[1]), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, num_panels, squeeze=False)[0]
    return figure, axes


def _save_figure(figure, path: os.PathLike) -> str:
    """Writes `figure` as a PNG atomically (`tfmir.files.write_atomic`); returns the path."""
    path = os.fspath(path)
    # No bbox_inches="tight": the PNG keeps exactly figsize x dpi pixels.
    write_atomic(path, lambda stream: figure.savefig(stream, format="png", dpi=figure.dpi))
    return path


def _read_history(log) -> dict:
    if isinstance(log, Mapping):
        return {key: np.asarray(values, dtype=np.float64) for key, values in log.items()}
    from tfmir.training.fit import read_log

    if not os.path.exists(log):
        raise FileNotFoundError(f"training log not found: {log}")
    return {key: np.asarray(values, dtype=np.float64) for key, values in read_log(log).items()}


def recall_curves(history: Mapping, *, k: int = 1) -> dict[str, np.ndarray]:
    """The per-source validation Recall@k columns of a training log.

    Args:
        history: {column: values} as `tfmir.training.read_log` returns (or Keras' History).
        k: which Recall@k.

    Returns:
        {source: values}: from the `val_recall@k_<source>` columns when there are any, else
        {"": values} from `val_recall@k` (a single-source run).
    """
    pattern = re.compile(rf"^val_recall@{k}_(.+)$")
    curves = {match.group(1): np.asarray(values, dtype=np.float64)
              for key, values in history.items() if (match := pattern.match(key))}
    if not curves and f"val_recall@{k}" in history:
        curves = {"": np.asarray(history[f"val_recall@{k}"], dtype=np.float64)}
    return dict(sorted(curves.items()))


def plot_recall_curves(path: os.PathLike, logs: Mapping, *, steps_per_epoch, k: int = 1,
                       dpi: int = DPI) -> str:
    """Plots validation Recall@k per source against the training step, one panel per log.

    The trainers evaluate after every epoch, so the value of the 0-based CSV row `epoch` is drawn
    at step (epoch + 1) × steps_per_epoch. Each source's best value is marked with a star: the
    paper's Fig. 2 shows that, with naïvely fused training data, the sources peak at different
    steps.

    Args:
        path: output PNG.
        logs: {panel title: a trainer's `log.csv` path or a {column: values} history}.
        steps_per_epoch: int, or {panel title: int} when the runs differ.
        k: which Recall@k to plot.
        dpi: pixels per inch; each panel is `PANEL_SIZE` inches.

    Returns:
        The path written.

    Example:

    ```python
    plot_recall_curves("fig2.png", {"naive fusion": "runs/naive/log.csv"}, steps_per_epoch=100)
    ```
    """
    from matplotlib.ticker import MaxNLocator

    if not logs:
        raise ValueError("logs must name at least one training log. Received none")
    figure, axes = _new_figure(len(logs), dpi=dpi)
    for axis, (title, log) in zip(axes, logs.items()):
        history = _read_history(log)
        curves = recall_curves(history, k=k)
        if not curves:
            raise ValueError(f"log {title!r} has no val_recall@{k} column. Columns: "
                             f"{sorted(history)}")
        spe = steps_per_epoch[title] if isinstance(steps_per_epoch, Mapping) else steps_per_epoch
        epochs = history.get("epoch", np.arange(len(next(iter(curves.values())))))
        steps = (np.asarray(epochs) + 1) * int(spe)
        for index, (source, values) in enumerate(curves.items()):
            color = f"C{index}"
            axis.plot(steps, values, marker="o", markersize=3, color=color,
                      label=source or title)
            if np.isfinite(values).any():
                best = int(np.nanargmax(values))
                axis.plot(steps[best], values[best], marker="*", markersize=11, color=color,
                          linestyle="none")
        axis.set_title(title)
        axis.set_xlabel("training step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel(f"validation Recall@{k}")
        axis.grid(alpha=0.3)
        axis.legend(loc="best", fontsize="small")
    figure.tight_layout()
    return _save_figure(figure, path)


def distance_ratios(student_embeddings, teacher_embeddings, labels, *,
                    min_teacher_distance: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Student-to-teacher Euclidean distance ratios of all item pairs, intra- and inter-class.

    For every unordered pair i < j: ratio = ‖s_i − s_j‖ / ‖t_i − t_j‖. Pairs whose
    teacher distance is at most `min_teacher_distance` (duplicate images) have no defined ratio
    and are left out. A ratio above 1 means the student spreads the pair further apart than
    the teacher.

    Args:
        student_embeddings: (N, D_s), e.g. the universal model's embeddings of a test split.
        teacher_embeddings: (N, D_t), the specialist's embeddings of the same items.
        labels: (N,) class labels.
        min_teacher_distance: teacher distances at or below this are skipped.

    Returns:
        `(intra, inter)`: float64 ratios of the same-class pairs and of the different-class
        pairs, each in (i, j) row-major order of i < j.

    Example:

    ```python
    intra, inter = distance_ratios(universal, specialist, labels)
    intra.mean(), inter.mean()
    ```

    Reference:
        Feng, Liu, Luo, "Universal Model for Multi-Domain Medical Image Retrieval", Fig. 4,
        https://arxiv.org/abs/2007.08628
    """
    student = np.asarray(student_embeddings, dtype=np.float64)
    teacher = np.asarray(teacher_embeddings, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    if student.ndim != 2 or teacher.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D). Received student {student.shape} and "
                         f"teacher {teacher.shape}")
    if not len(student) == len(teacher) == len(labels):
        raise ValueError(f"student, teacher and labels must have one row per item. Received "
                         f"{len(student)}, {len(teacher)} and {len(labels)}")
    rows, columns = np.triu_indices(len(labels), k=1)

    def pair_distances(embeddings):
        squared = np.sum(embeddings ** 2, axis=1)
        gram = embeddings @ embeddings.T
        distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * gram, 0.0))
        return distances[rows, columns]

    student_distances = pair_distances(student)
    teacher_distances = pair_distances(teacher)
    defined = teacher_distances > min_teacher_distance
    ratios = student_distances[defined] / teacher_distances[defined]
    same = (labels[rows] == labels[columns])[defined]
    return ratios[same], ratios[~same]


def plot_distance_ratios(path: os.PathLike, ratios: Mapping, *, bins: int = 50,
                         dpi: int = DPI) -> str:
    """Histograms (densities) of intra- and inter-class distance ratios, one panel per source.

    Args:
        path: output PNG.
        ratios: {source: (intra, inter)} as `distance_ratios` returns.
        bins: histogram bins (shared by the two histograms of a panel).
        dpi: pixels per inch; each panel is `PANEL_SIZE` inches.

    Returns:
        The path written.
    """
    if not ratios:
        raise ValueError("ratios must hold at least one source. Received none")
    figure, axes = _new_figure(len(ratios), dpi=dpi)
    for axis, (source, (intra, inter)) in zip(axes, ratios.items()):
        intra, inter = np.asarray(intra, np.float64), np.asarray(inter, np.float64)
        both = np.concatenate([intra, inter])
        if both.size == 0:
            raise ValueError(f"source {source!r} has no pair with a defined ratio")
        edges = np.histogram_bin_edges(both, bins=bins)
        for values, color, name in ((intra, INTRA_COLOR, "intra-class"),
                                    (inter, INTER_COLOR, "inter-class")):
            if values.size == 0:
                continue
            axis.hist(values, bins=edges, density=True, histtype="step", linewidth=1.6,
                      color=color,
                      label=f"{name}: mean {values.mean():.2f}, var {values.var():.3f}")
            axis.axvline(values.mean(), color=color, linestyle="--", linewidth=1)
        axis.axvline(1.0, color="black", linewidth=0.8, alpha=0.6)
        axis.set_title(source)
        axis.set_xlabel("distance ratio (universal / specialist)")
        axis.set_ylabel("density")
        axis.legend(loc="upper right", fontsize="x-small")
    figure.tight_layout()
    return _save_figure(figure, path)


def save_retrieval_comparison(path: os.PathLike, query_images, query_labels, results: Mapping, *,
                              class_names=None, query_titles=None, tile_size: int = 72,
                              border: int = 4) -> str:
    """Writes a PNG with, for each query, one row of top-K results per model (Fig. 5).

    Rows come in query order and, within a query, in the order of `results`; each row starts
    with the query and is titled "<query title>: <model>". Results are framed green when their
    class equals the query's and red otherwise (`save_gallery`'s drawing).

    Args:
        path: output PNG.
        query_images: (Q, H, W[, 3]) uint8.
        query_labels: (Q,) int.
        results: {model name: (result_images (Q, K, H, W[, 3]) uint8, result_labels (Q, K))},
            e.g. {"specialist": ..., "universal": ...}; every model must return the same K.
        class_names: label index -> name.
        query_titles: (Q,) text per query, e.g. its source.
        tile_size: side of one tile in pixels.
        border: frame width in pixels.

    Returns:
        The path written.
    """
    query_labels = np.asarray(query_labels).reshape(-1)
    num_queries = len(query_labels)
    if len(query_images) != num_queries:
        raise ValueError(f"need one label per query. Received {len(query_images)} images and "
                         f"{num_queries} labels")
    if not results:
        raise ValueError("results must hold at least one model's retrievals. Received none")
    shapes = {name: np.shape(labels) for name, (_, labels) in results.items()}
    if len(set(shapes.values())) != 1 or next(iter(shapes.values()))[0] != num_queries:
        raise ValueError(f"every model needs result labels of shape ({num_queries}, K) with the "
                         f"same K. Received {shapes}")
    titles = list(query_titles) if query_titles is not None else [f"query {q + 1}"
                                                                    for q in range(num_queries)]
    rows_images, rows_queries, rows_labels, rows_results, rows_titles = [], [], [], [], []
    for query in range(num_queries):
        for name, (images, labels) in results.items():
            rows_queries.append(query_images[query])
            rows_labels.append(query_labels[query])
            rows_images.append(np.asarray(images[query]))
            rows_results.append(np.asarray(labels)[query])
            rows_titles.append(f"{titles[query]}: {name}")
    return save_gallery(path, rows_queries, rows_labels, rows_images, np.stack(rows_results),
                        class_names=class_names, row_titles=rows_titles, tile_size=tile_size,
                        border=border)
