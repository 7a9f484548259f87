"""Classification metrics for the shortcut evaluation: overall, per (y, z) group, and switched heads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.special import softmax
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from mimm_med.evaluation._arrays import as_class_labels, check_same_length

__all__ = ["as_probabilities", "classification_report", "switched_heads"]


def as_probabilities(logits_or_probs: np.ndarray) -> np.ndarray:
    """Return class probabilities ``(N, C)`` from logits or probabilities.

    Scores are taken as probabilities if every row lies in [0, 1] and sums to 1; otherwise all rows
    are treated as logits and passed through a softmax (one array is never part probabilities).

    Examples
    --------
    >>> as_probabilities(np.array([[0.5, 0.5], [0.2, 0.8]]))
    array([[0.5, 0.5],
           [0.2, 0.8]])
    >>> as_probabilities(np.array([[0.0, 0.0], [0.0, np.log(3.0)]]))
    array([[0.5 , 0.5 ],
           [0.25, 0.75]])
    """
    scores = np.asarray(logits_or_probs, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"expected classification scores of shape (N, C) with C >= 2, got {scores.shape}; for a "
            "positive-class probability p use np.stack([1 - p, p], axis=1)."
        )
    if not np.isfinite(scores).all():
        rows = np.flatnonzero(~np.isfinite(scores).all(axis=1))
        raise ValueError(
            f"{len(rows)} of {len(scores)} rows of classification scores are NaN or infinite (first rows {rows[:5].tolist()}); "
            "the network's outputs diverged: check the checkpoint and the images of those rows"
        )
    is_distribution = np.all((scores >= 0) & (scores <= 1)) and np.allclose(scores.sum(axis=1), 1, atol=1e-4)
    return scores if is_distribution else softmax(scores, axis=1)


def classification_report(
    y_true: np.ndarray,
    logits_or_probs: np.ndarray,
    groups: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Score a classification head overall and per (y, z) group of each spurious factor.

    Parameters
    ----------
    y_true
        Class indices ``(N,)`` in ``[0, C)``.
    logits_or_probs
        Head outputs ``(N, C)``, logits or probabilities (see :func:`as_probabilities`).
    groups
        Spurious factor name → class labels ``(N,)``; continuous factors must be binned first.

    Returns
    -------
    dict
        ``n_samples``, ``accuracy``, ``balanced_accuracy``, ``auroc`` (binary: positive-class
        probability; multi-class: one-vs-rest macro over the classes present),
        ``worst_group_accuracy`` and ``worst_group`` (``"factor/yY_zZ"``, the lowest cell over all
        factors), ``factors`` (per factor: ``group_accuracy`` and ``group_size`` keyed ``"yY_zZ"``,
        ``worst_group``, ``worst_group_accuracy``, ``tpr_gap``) and ``notes`` (why a value is NaN, which groups are empty).

        The TPR gap is max − min over z of the positive class's true-positive rate (binary y); for
        multi-class y, the mean over classes of that gap. The accuracy of cell (y = c, z = v) is
        exactly the TPR of class c within z = v, so the gap is read off the cells.

    Examples
    --------
    A head that predicts sex instead of y is right only where the two agree:

    >>> y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    >>> sex = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    >>> probabilities = np.where(sex[:, None] == [0, 1], 0.9, 0.1)
    >>> report = classification_report(y, probabilities, {"sex": sex})
    >>> report["balanced_accuracy"], report["worst_group"], report["worst_group_accuracy"]
    (0.75, 'sex/y0_z1', 0.0)
    >>> report["factors"]["sex"]["group_accuracy"]
    {'y0_z0': 1.0, 'y0_z1': 0.0, 'y1_z0': 0.0, 'y1_z1': 1.0}
    """
    probabilities = as_probabilities(logits_or_probs)
    n_classes = probabilities.shape[1]
    labels = as_class_labels(y_true, "y_true")
    group_labels = {name: as_class_labels(z, f"groups[{name!r}]") for name, z in (groups or {}).items()}
    n_samples = check_same_length({"y_true": labels, "logits_or_probs": probabilities, **group_labels})
    if n_samples == 0:
        raise ValueError("y_true is empty; there is nothing to score.")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"y_true holds classes {np.unique(labels).tolist()} but the scores have {n_classes} columns; "
            "labels must be class indices in [0, C)."
        )
    predicted = probabilities.argmax(axis=1)
    notes: list[str] = []
    factors = {name: _factor_report(labels, predicted, z, n_classes, name, notes) for name, z in group_labels.items()}
    worst_group, worst_group_accuracy = min(
        ((f"{name}/{factor['worst_group']}", factor["worst_group_accuracy"]) for name, factor in factors.items()),
        key=lambda cell: cell[1],
        default=("", float("nan")),
    )
    return {
        "n_samples": n_samples,
        "accuracy": float(accuracy_score(labels, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "auroc": _auroc(labels, probabilities, notes),
        "worst_group_accuracy": worst_group_accuracy,
        "worst_group": worst_group,
        "factors": factors,
        "notes": notes,
    }


def switched_heads(head_outputs: np.ndarray, other_labels: np.ndarray) -> float:
    """Accuracy of one factor's head predictions scored against another factor's labels.

    Called as ``switched_heads(primary_head_outputs, z)`` it measures how much the primary head
    predicts the spurious factor; the reverse, ``switched_heads(z_head_outputs, y)``, how much the
    spurious head predicts y. Both need the two factors to share class indices (e.g. binary y and
    binary z). Read it on the balanced test set, where y and z are independent: a head that uses
    only its own factor then scores chance (50 % for balanced binary factors), a head that uses
    the shortcut scores above.

    Parameters
    ----------
    head_outputs
        Logits or probabilities ``(N, C)`` of one head.
    other_labels
        Class indices ``(N,)`` in ``[0, C)`` of the other factor.

    Examples
    --------
    On a balanced set, a head that reads its own factor scores chance against the other's labels:

    >>> digit = np.array([0, 0, 1, 1])
    >>> thickness = np.array([0, 1, 0, 1])
    >>> reads_digit, reads_thickness = np.eye(2)[digit], np.eye(2)[thickness]  # one-hot probabilities
    >>> switched_heads(reads_digit, thickness), switched_heads(reads_thickness, thickness)
    (0.5, 1.0)
    """
    predicted = as_probabilities(head_outputs).argmax(axis=1)
    n_classes = np.shape(head_outputs)[1]
    labels = as_class_labels(other_labels, "other_labels")
    check_same_length({"head_outputs": predicted, "other_labels": labels})
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(
            f"other_labels hold classes {np.unique(labels).tolist()} outside the head's {n_classes} classes; "
            "switched heads needs both factors to share class indices."
        )
    return float(accuracy_score(labels, predicted))


def _auroc(labels: np.ndarray, probabilities: np.ndarray, notes: list[str]) -> float:
    present = np.unique(labels)
    if present.size < 2:
        notes.append(f"AUROC is undefined: y_true holds the single class {present[0]}; reported as NaN.")
        return float("nan")
    if probabilities.shape[1] == 2:
        return float(roc_auc_score(labels, probabilities[:, 1]))
    if present.size < probabilities.shape[1]:
        notes.append(
            f"AUROC is the one-vs-rest mean over the {present.size} of {probabilities.shape[1]} classes "
            "present in y_true."
        )
    # One-vs-rest per present class: sklearn's multi_class="ovr" returns NaN once a class is absent.
    return float(np.mean([roc_auc_score(labels == c, probabilities[:, c]) for c in present]))


def _factor_report(
    labels: np.ndarray, predicted: np.ndarray, z: np.ndarray, n_classes: int, name: str, notes: list[str]
) -> dict[str, Any]:
    cell_accuracy: dict[tuple[int, int], float] = {}
    group_size: dict[str, int] = {}
    for y_value in np.unique(labels):
        for z_value in np.unique(z):
            in_cell = (labels == y_value) & (z == z_value)
            if in_cell.any():
                cell_accuracy[y_value, z_value] = float(accuracy_score(labels[in_cell], predicted[in_cell]))
                group_size[f"y{y_value}_z{z_value}"] = int(in_cell.sum())
    group_accuracy = {f"y{y_value}_z{z_value}": acc for (y_value, z_value), acc in cell_accuracy.items()}
    empty = [f"y{y_value}_z{z_value}" for y_value in np.unique(labels) for z_value in np.unique(z)
             if (y_value, z_value) not in cell_accuracy]  # fmt: skip
    if empty:
        # An empty cell has no accuracy; without a note its absence reads as a good worst group.
        notes.append(
            f"{name} groups {empty} have no samples; the worst group and TPR gap of {name!r} are over the "
            f"{len(group_accuracy)} groups that do."
        )
    worst_group = min(group_accuracy, key=group_accuracy.__getitem__)
    return {
        "group_accuracy": group_accuracy,
        "group_size": group_size,
        "worst_group": worst_group,
        "worst_group_accuracy": group_accuracy[worst_group],
        "tpr_gap": _tpr_gap(cell_accuracy, n_classes, name, notes),
    }


def _tpr_gap(cell_accuracy: Mapping[tuple[int, int], float], n_classes: int, name: str, notes: list[str]) -> float:
    classes = [1] if n_classes == 2 else range(n_classes)
    gaps = []
    for c in classes:
        rates = [acc for (y_value, _), acc in cell_accuracy.items() if y_value == c]
        if len(rates) >= 2:
            gaps.append(max(rates) - min(rates))
    if not gaps:
        notes.append(f"TPR gap for {name!r} is undefined: no class has samples in two or more {name} groups; NaN.")
        return float("nan")
    return float(np.mean(gaps))
