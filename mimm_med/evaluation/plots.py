"""Figures of an evaluation: t-SNE of the primary features, training curves, per-group accuracy.

Figures are drawn on :class:`matplotlib.figure.Figure` objects, which render with the Agg
backend and leave pyplot's global state untouched, so they are safe in headless and threaded runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.manifold import TSNE

from mimm_med.data.writers import atomic_output
from mimm_med.evaluation._arrays import as_feature_matrix, check_same_length

__all__ = ["plot_group_accuracy", "plot_training_curves", "plot_tsne"]

#: Labels with at most this many integer values get a legend per value; others a colour bar.
MAX_LEGEND_CLASSES = 10


def plot_tsne(
    features: np.ndarray,
    labels_by_factor: Mapping[str, np.ndarray],
    path: str | Path,
    seed: int = 0,
    max_points: int = 2000,
) -> Path:
    """Save a 2-D t-SNE of ``features`` with one panel per factor, coloured by that factor.

    Parameters
    ----------
    features
        Primary features ``f_y``, ``(N, D)``.
    labels_by_factor
        Factor name → labels ``(N,)``; discrete labels get a legend, continuous ones a colour bar.
    path
        PNG to write; parent folders are created.
    seed
        Seed of the subsample and of t-SNE.
    max_points
        Rows are subsampled to at most this many, since t-SNE is quadratic in their number.

    Examples
    --------
    >>> import tempfile
    >>> rng = np.random.default_rng(0)
    >>> thickness = rng.integers(0, 2, 60)
    >>> digit_features = rng.normal(size=(60, 8)) + thickness[:, None]
    >>> folder = Path(tempfile.mkdtemp())
    >>> plot_tsne(digit_features, {"thickness": thickness}, folder / "tsne.png").name
    'tsne.png'
    """
    features = as_feature_matrix(features, "features")
    if not labels_by_factor:
        raise ValueError("labels_by_factor is empty; give at least one factor to colour the t-SNE by.")
    labels = {name: np.asarray(values).reshape(len(values), -1)[:, 0] for name, values in labels_by_factor.items()}
    n_rows = check_same_length({"features": features, **labels})
    if n_rows < 3:
        raise ValueError(f"t-SNE needs at least 3 rows, got {n_rows}.")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n_rows, size=max_points, replace=False)) if n_rows > max_points else np.arange(n_rows)
    # sklearn requires perplexity < n_samples; a third of the rows keeps tiny sets well-posed.
    perplexity = min(30.0, (rows.size - 1) / 3)
    # Features that collapsed to one point (a network predicting one class) give PCA a zero first
    # component, which sklearn divides by and the Barnes-Hut step then crashes the process on.
    init = "pca" if np.ptp(features[rows], axis=0).max() > 0 else "random"
    embedding = TSNE(n_components=2, perplexity=perplexity, init=init, random_state=seed).fit_transform(
        features[rows]
    )
    figure = Figure(figsize=(4.5 * len(labels), 4.2), layout="constrained")
    for axes, (name, values) in zip(figure.subplots(1, len(labels), squeeze=False)[0], labels.items()):
        _scatter_coloured(figure, axes, embedding, values[rows])
        axes.set_title(f"t-SNE of f_y by {name}")
        axes.set_xticks([])
        axes.set_yticks([])
    return _save(figure, path)


def plot_training_curves(history: pd.DataFrame | Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """Save training curves, one panel per metric prefix and one line per metric.

    Columns are grouped by the text before their first ``"/"``, so ``"mi/digit-thickness"`` and
    ``"mi/digit-rotation"`` share the panel ``mi`` while ``"weight/thickness"`` goes to ``weight``;
    columns without ``"/"`` share one panel. The x-axis is the frame's index (epochs for a
    mapping of lists).

    Parameters
    ----------
    history
        A DataFrame of numeric columns, or metric name → values over training (lengths may differ).
    path
        PNG to write; parent folders are created.

    Examples
    --------
    >>> import tempfile
    >>> history = {"mi/digit-thickness": [0.9, 0.4, 0.1], "weight/thickness": [0.5, 0.7, 0.6]}
    >>> plot_training_curves(history, Path(tempfile.mkdtemp()) / "curves.png").name
    'curves.png'
    """
    if isinstance(history, pd.DataFrame):
        frame = history.select_dtypes("number")
    else:
        frame = pd.DataFrame({name: pd.Series(values, dtype=float) for name, values in history.items()})
    if frame.empty:
        raise ValueError("history has no numeric values to plot.")
    panels: dict[str, list[str]] = {}
    for column in frame.columns:
        panels.setdefault(str(column).split("/", 1)[0] if "/" in str(column) else "", []).append(column)
    figure = Figure(figsize=(5.0 * len(panels), 3.8), layout="constrained")
    for axes, (prefix, columns) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        for column in columns:
            axes.plot(frame.index, frame[column], marker="." if len(frame) < 30 else None, label=str(column))
        axes.set_title(prefix or "metrics")
        axes.set_xlabel(frame.index.name or "epoch")
        axes.legend(fontsize="small")
    return _save(figure, path)


def plot_group_accuracy(reports: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Save grouped bar charts of per-(y, z) group accuracy, one panel per spurious factor.

    Parameters
    ----------
    reports
        Test-set name → :func:`~mimm_med.evaluation.classification_report` result, e.g.
        ``evaluate_test_sets(...)["sets"]``; each set is one bar colour.
    path
        PNG to write; parent folders are created.

    Examples
    --------
    >>> import tempfile
    >>> from mimm_med.evaluation import classification_report
    >>> y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    >>> sex = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    >>> reports = {
    ...     "reads y": classification_report(y, np.eye(2)[y], {"sex": sex}),
    ...     "reads sex": classification_report(y, np.eye(2)[sex], {"sex": sex}),
    ... }
    >>> plot_group_accuracy(reports, Path(tempfile.mkdtemp()) / "groups.png").name
    'groups.png'
    """
    factors = list(dict.fromkeys(factor for report in reports.values() for factor in report["factors"]))
    if not factors:
        raise ValueError("the reports hold no spurious-factor groups; pass groups to classification_report.")
    figure = Figure(figsize=(1.5 + 3.5 * len(factors), 3.8), layout="constrained")
    bar_width = 0.8 / len(reports)
    for axes, factor in zip(figure.subplots(1, len(factors), squeeze=False)[0], factors):
        accuracy_by_set = {
            name: report["factors"].get(factor, {}).get("group_accuracy", {}) for name, report in reports.items()
        }
        cells = sorted({cell for accuracy in accuracy_by_set.values() for cell in accuracy})
        positions = np.arange(len(cells))
        for index, (set_name, accuracy) in enumerate(accuracy_by_set.items()):
            offset = (index - (len(reports) - 1) / 2) * bar_width
            axes.bar(positions + offset, [accuracy.get(cell, np.nan) for cell in cells], bar_width, label=set_name)
        axes.set_xticks(positions, cells)
        axes.set_ylim(0, 1)
        axes.set_ylabel("accuracy")
        axes.set_title(f"accuracy per (y, {factor}) group")
        axes.legend(fontsize="small")
    return _save(figure, path)


def _scatter_coloured(figure: Figure, axes: Axes, points: np.ndarray, values: np.ndarray) -> None:
    is_numeric = values.dtype.kind in "biuf"
    # Rows without a label (NaN) are drawn apart in grey: a colour map would leave them out unseen,
    # and they would make an integer factor look continuous.
    missing = np.isnan(values) if values.dtype.kind == "f" else np.zeros(len(values), dtype=bool)
    present = values[~missing]
    classes = np.unique(present)
    is_discrete = not is_numeric or values.dtype.kind in "biu" or np.all(present == np.round(present))
    if not is_numeric or (is_discrete and classes.size <= MAX_LEGEND_CLASSES):
        for value in classes:
            chosen = ~missing & (values == value)
            axes.scatter(points[chosen, 0], points[chosen, 1], s=6, label=f"{value:g}" if is_numeric else str(value))
    else:
        figure.colorbar(
            axes.scatter(points[~missing, 0], points[~missing, 1], s=6, c=present, cmap="viridis"), ax=axes
        )
    if missing.any():
        axes.scatter(points[missing, 0], points[missing, 1], s=6, c="lightgrey", label=f"missing ({missing.sum()})")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize="small", markerscale=2)


def _save(figure: Figure, path: str | Path) -> Path:
    # An interrupted save (a killed job, a full disk) leaves the previous figure, not a truncated PNG.
    path = Path(path)
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=120)
    return path
