"""Checks that turn user arrays into the shapes the evaluation functions expect."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["as_class_labels", "as_feature_matrix", "check_same_length"]


def as_class_labels(values: np.ndarray, name: str) -> np.ndarray:
    """Return ``values`` as 1-D integer class labels.

    ``(N, 1)`` columns are flattened and integer-valued floats are accepted, since label tensors
    collected from batches often come that way. Continuous values are refused.
    """
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D class labels (N,), got shape {array.shape}.")
    if array.dtype.kind == "O":  # numbers in an object array (a pandas column with None, say) are still numbers
        try:
            array = array.astype(np.float64)
        except (TypeError, ValueError):
            pass  # text: refused below
    if array.dtype.kind in "biu":
        return array.astype(np.int64)
    if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        return array.astype(np.int64)
    if array.dtype.kind == "f" and np.isnan(array).any():
        # A missing label is not a continuous factor: say which rows lack it rather than suggest binning.
        rows = np.flatnonzero(np.isnan(array))
        raise ValueError(
            f"{name} is missing (NaN) for {rows.size} of {array.size} samples (first rows {rows[:5].tolist()}); "
            "drop those samples, or give the missing value a class of its own, before scoring."
        )
    raise ValueError(
        f"{name} holds non-integer values (dtype {array.dtype}, e.g. {array[:3].tolist()}); "
        "give integer class labels, and bin a continuous factor such as age first (e.g. np.digitize)."
    )


def as_feature_matrix(values: np.ndarray, name: str) -> np.ndarray:
    """Return ``values`` as a finite float ``(N, D)`` matrix; a 1-D array becomes one column."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"{name} must be a feature matrix (N, D), got shape {array.shape}.")
    if not np.isfinite(array).all():
        # sklearn would only say "Input X contains NaN", an SVD would not converge, a critic would learn NaN.
        rows = np.flatnonzero(~np.isfinite(array).all(axis=1))
        raise ValueError(
            f"{rows.size} of {len(array)} rows of {name} are NaN or infinite (first rows {rows[:5].tolist()}); "
            "the network's features diverged: check the checkpoint and the images of those rows."
        )
    return array


def check_same_length(arrays: Mapping[str, np.ndarray]) -> int:
    """Return the common number of rows of ``arrays``; raise naming the arrays that differ."""
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have one row per sample, but their lengths differ: {lengths}.")
    return next(iter(lengths.values()))
