"""The evaluation protocol over the iid / balanced / inverted test sets, as nested results,
MLflow metrics and a Markdown table."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mimm_med.evaluation._arrays import as_feature_matrix
from mimm_med.evaluation.leakage import TooFewRowsError, UndefinedLeakageError, linear_probe_leakage, residual_mutual_information
from mimm_med.evaluation.metrics import classification_report, switched_heads

__all__ = ["evaluate_test_sets", "flatten_metrics", "results_table"]

#: The residual-MI estimates of :func:`evaluate_test_sets`: I(f_y; f_z), I(f_y; f_z | y), I(f_y; z).
RESIDUAL_MI_KEYS = ("residual_mi", "residual_mi_given_y", "residual_mi_label")


def evaluate_test_sets(
    outputs_by_set: Mapping[str, Mapping[str, np.ndarray]],
    primary: str,
    spurious: Sequence[str],
    leakage_set: str | None = None,
    residual_mi: Mapping[str, Any] | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Score the primary head on every test set and probe its features for each spurious factor.

    Parameters
    ----------
    outputs_by_set
        Test-set name (``"iid"``, ``"balanced"``, ``"inverted"``) → :func:`collect_outputs` result.
    primary
        Name of the primary factor y.
    spurious
        Names of the spurious factors z_k, each a classification label (bin continuous ones first).
    leakage_set
        Set whose ``f_y`` the linear probe (and the residual MI) reads; ``None``: ``"balanced"`` if
        given, else ``"iid"``. Read it on the balanced set: where z agrees with y (iid), a probe reads
        z through y from features that hold no z at all.
    residual_mi
        If given, also estimate I(f_y; f_zk), I(f_y; f_zk | y) and I(f_y; z_k) (the factor's label,
        one-hot) on ``leakage_set`` with fresh critics, passing
        these keyword arguments to :func:`residual_mutual_information` (e.g. ``{"estimator": "club",
        "steps": 2000, "device": "cuda"}``; ``{}`` takes its defaults). Off by default, since it trains
        fresh critics for every factor; a set too small for them (fewer than
        :data:`~mimm_med.evaluation.leakage.MIN_ROWS_PER_FOLD` rows per fold) gives NaN and a warning.
    seed
        Seed of the probe's folds and, unless ``residual_mi`` sets one, of the residual-MI critics.
    progress
        Show a tqdm bar over the residual-MI estimates, which take most of an evaluation; ``None``:
        only where stderr is a terminal, so that logs of batch jobs stay free of bar updates.

    Returns
    -------
    dict
        ``primary``, ``spurious``; ``sets``: per set the :func:`classification_report` of the primary
        head grouped by every spurious factor, plus ``switched_heads`` (primary head vs z_k) and
        ``switched_heads_reverse`` (z_k head vs y) per factor whose head shares the primary's classes;
        ``leakage``: linear-probe balanced accuracy per factor; ``residual_mi``,
        ``residual_mi_given_y`` and ``residual_mi_label``: nats per factor (empty unless requested).
        On a set where z_k is independent of y (the balanced one), ``residual_mi_label`` is the leak
        alone; f_zk also carries y where its head learnt y as a shortcut for z_k, and
        ``residual_mi`` counts that too.

    Examples
    --------
    Outputs of a network whose f_y, and primary head, read y and the shortcut z alike, on test sets
    where z agrees with y at rate ``r``:

    >>> rng = np.random.default_rng(0)
    >>> def test_set(r, n=200):
    ...     y = rng.integers(0, 2, n)
    ...     z = np.where(rng.random(n) < r, y, 1 - y)
    ...     f_y = np.stack([y, z], axis=1) + rng.normal(0, 0.5, (n, 2))
    ...     logits = (f_y.sum(axis=1, keepdims=True) - 1) * [-1, 1]
    ...     return {"digit_features": f_y, "digit_output": logits, "digit_label": y, "thickness_label": z}
    >>> outputs_by_set = {"iid": test_set(0.9), "balanced": test_set(0.5), "inverted": test_set(0.1)}
    >>> results = evaluate_test_sets(outputs_by_set, "digit", ["thickness"])
    >>> {name: round(report["balanced_accuracy"], 2) for name, report in results["sets"].items()}
    {'iid': 0.85, 'balanced': 0.72, 'inverted': 0.55}
    >>> round(results["leakage"]["thickness"], 2)  # a probe reads z from f_y on the balanced set
    0.8
    """
    if leakage_set is None:
        leakage_set = "balanced" if "balanced" in outputs_by_set else "iid"
    if leakage_set not in outputs_by_set:
        raise KeyError(f"leakage_set {leakage_set!r} is not among the test sets {list(outputs_by_set)}.")
    results: dict[str, Any] = {
        "primary": primary,
        "spurious": list(spurious),
        "sets": {},
        "leakage": {},
        "residual_mi": {},
        "residual_mi_given_y": {},
        "residual_mi_label": {},
    }
    for set_name, outputs in outputs_by_set.items():
        primary_output = _output(outputs, f"{primary}_output", set_name)
        if np.ndim(primary_output) != 2 or np.shape(primary_output)[1] < 2:
            raise ValueError(
                f"test set {set_name!r}: {primary}_output has shape {np.shape(primary_output)}, not (N, C) with "
                f"C >= 2; the protocol scores a classification head, and {primary!r} has a regression head "
                "(num_classes 1): bin the target into classes and train a classification head."
            )
        y = _output(outputs, f"{primary}_label", set_name)
        groups = {factor: _output(outputs, f"{factor}_label", set_name) for factor in spurious}
        try:
            report = classification_report(y, primary_output, groups)
        except ValueError as error:
            # Which of the sets is wrong is what a user needs to find the bad labels or outputs.
            raise ValueError(f"test set {set_name!r}: {error}") from error
        report["switched_heads"], report["switched_heads_reverse"] = {}, {}
        for factor in spurious:
            factor_output = outputs.get(f"{factor}_output")
            # Scoring one head against another factor's labels only means something over the same classes;
            # a regression head's output, (N,) or (N, 1), has none.
            if factor_output is not None and np.shape(factor_output)[1:] == np.shape(primary_output)[1:]:
                report["switched_heads"][factor] = switched_heads(primary_output, groups[factor])
                report["switched_heads_reverse"][factor] = switched_heads(factor_output, y)
        results["sets"][set_name] = report
    probed = outputs_by_set[leakage_set]
    # Checked here so that diverged (NaN) features are reported with the set they come from.
    primary_features = as_feature_matrix(
        _output(probed, f"{primary}_features", leakage_set), f"{primary}_features of the {leakage_set} set"
    )
    hidden = None if progress is None else not progress  # None: tqdm's own test of whether stderr is a terminal
    estimates = tqdm(
        total=len(spurious) * len(RESIDUAL_MI_KEYS),
        desc="residual MI",
        unit="estimate",
        disable=True if residual_mi is None else hidden,
        leave=False,
        dynamic_ncols=True,
    )
    for factor in spurious:
        try:
            results["leakage"][factor] = linear_probe_leakage(
                primary_features, _output(probed, f"{factor}_label", leakage_set), seed=seed
            )
        except UndefinedLeakageError as error:
            # a small or one-sided test set must not cost the metrics of a trained network
            results["leakage"][factor] = float("nan")
            warnings.warn(f"leakage of {factor} on the {leakage_set} set not estimated: {error}", stacklevel=2)
        if residual_mi is not None:
            factor_features = _output(probed, f"{factor}_features", leakage_set)
            pairs = {
                "residual_mi": (factor_features, None),
                "residual_mi_given_y": (factor_features, _output(probed, f"{primary}_label", leakage_set)),
                "residual_mi_label": (_one_hot(_output(probed, f"{factor}_label", leakage_set)), None),
            }
            for key, (other, given) in pairs.items():
                estimates.set_postfix_str(f"{key} of {factor}")
                try:
                    results[key][factor] = residual_mutual_information(
                        primary_features, other, given=given, **{"seed": seed, **residual_mi}
                    )
                except TooFewRowsError as error:
                    # A small test set must not cost the rest of the evaluation.
                    warnings.warn(
                        f"{key} of {factor} on the {leakage_set} set not estimated: "
                        f"{error}. Evaluate on a larger test set, or leave residual MI out (--estimate_residual_mi "
                        "False in a bundle, no --residual-mi in mimm-med benchmark)",
                        stacklevel=2,
                    )
                    results[key][factor] = float("nan")
                estimates.update()
    estimates.close()
    return results


def flatten_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """Flatten :func:`evaluate_test_sets` results to MLflow metric names.

    Names: ``{set}/y_acc``, ``{set}/y_bacc``, ``{set}/y_auroc``, ``{set}/worst_group_acc``;
    per factor ``{set}/{factor}/worst_group_acc``, ``{set}/{factor}/tpr_gap``,
    ``{set}/{factor}/acc_y{y}_z{z}``, ``{set}/{factor}/switched_heads``,
    ``{set}/{factor}/switched_heads_reverse``; and ``leakage/{factor}``, ``residual_mi/{factor}``,
    ``residual_mi_given_y/{factor}``, ``residual_mi_label/{factor}``; ``{set}/skipped_images`` where
    the results count images left out as unreadable (:func:`~mimm_med.evaluation.report.evaluate_checkpoint`).
    Undefined values stay NaN.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y, z = rng.integers(0, 2, (2, 200))  # a balanced set: z independent of y
    >>> f_y = np.stack([y, z], axis=1) + rng.normal(0, 0.5, (200, 2))
    >>> logits = (f_y.sum(axis=1, keepdims=True) - 1) * [-1, 1]  # a head that reads z as much as y
    >>> balanced = {"digit_features": f_y, "digit_output": logits, "digit_label": y, "thickness_label": z}
    >>> results = evaluate_test_sets({"balanced": balanced}, "digit", ["thickness"])
    >>> {name: round(value, 2) for name, value in flatten_metrics(results).items()}  # doctest: +NORMALIZE_WHITESPACE
    {'balanced/y_acc': 0.74, 'balanced/y_bacc': 0.74, 'balanced/y_auroc': 0.82, 'balanced/worst_group_acc': 0.52,
     'balanced/thickness/worst_group_acc': 0.52, 'balanced/thickness/tpr_gap': 0.39,
     'balanced/thickness/acc_y0_z0': 0.86, 'balanced/thickness/acc_y0_z1': 0.6,
     'balanced/thickness/acc_y1_z0': 0.52, 'balanced/thickness/acc_y1_z1': 0.91, 'leakage/thickness': 0.82}
    """
    metrics: dict[str, float] = {}
    for set_name, report in results["sets"].items():
        metrics[f"{set_name}/y_acc"] = report["accuracy"]
        metrics[f"{set_name}/y_bacc"] = report["balanced_accuracy"]
        metrics[f"{set_name}/y_auroc"] = report["auroc"]
        metrics[f"{set_name}/worst_group_acc"] = report["worst_group_accuracy"]
        for factor, factor_report in report["factors"].items():
            metrics[f"{set_name}/{factor}/worst_group_acc"] = factor_report["worst_group_accuracy"]
            metrics[f"{set_name}/{factor}/tpr_gap"] = factor_report["tpr_gap"]
            for cell, accuracy in factor_report["group_accuracy"].items():
                metrics[f"{set_name}/{factor}/acc_{cell}"] = accuracy
        for key in ("switched_heads", "switched_heads_reverse"):
            for factor, accuracy in report[key].items():
                metrics[f"{set_name}/{factor}/{key}"] = accuracy
    for key in ("leakage", *RESIDUAL_MI_KEYS):
        for factor, value in results.get(key, {}).items():
            metrics[f"{key}/{factor}"] = value
    for set_name, count in results.get("skipped_images", {}).items():
        metrics[f"{set_name}/skipped_images"] = count
    return {name: float(value) for name, value in metrics.items()}


def results_table(results: Mapping[str, Any]) -> str:
    """Markdown tables of :func:`evaluate_test_sets` results: one row per test set, one per factor.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> y, z = rng.integers(0, 2, (2, 200))  # a balanced set: z independent of y
    >>> f_y = np.stack([y, z], axis=1) + rng.normal(0, 0.5, (200, 2))
    >>> logits = (f_y.sum(axis=1, keepdims=True) - 1) * [-1, 1]  # a head that reads z as much as y
    >>> balanced = {"digit_features": f_y, "digit_output": logits, "digit_label": y, "thickness_label": z}
    >>> results = evaluate_test_sets({"balanced": balanced}, "digit", ["thickness"])
    >>> print(results_table(results))
    | test set | accuracy | balanced acc. | AUROC | worst group | thickness TPR gap | thickness switched |
    | --- | --- | --- | --- | --- | --- | --- |
    | balanced | 0.740 | 0.739 | 0.821 | 0.522 (thickness/y1_z0) | 0.386 | – |
    <BLANKLINE>
    | factor | linear-probe leakage (bal. acc.) | residual MI with f_z (nats) | residual MI with f_z given y (nats) | residual MI with z (nats) |
    | --- | --- | --- | --- | --- |
    | thickness | 0.823 | – | – | – |
    """
    spurious = results["spurious"]
    header = ["test set", "accuracy", "balanced acc.", "AUROC", "worst group"]
    header += [f"{factor} {column}" for factor in spurious for column in ("TPR gap", "switched")]
    rows = []
    for set_name, report in results["sets"].items():
        row = [set_name] + [_cell(report[key]) for key in ("accuracy", "balanced_accuracy", "auroc")]
        row.append(f"{_cell(report['worst_group_accuracy'])} ({report['worst_group']})" if spurious else "–")
        for factor in spurious:
            row += [_cell(report["factors"][factor]["tpr_gap"]), _cell(report["switched_heads"].get(factor))]
        rows.append(row)
    tables = [_markdown(header, rows)]
    if results["leakage"] or results["residual_mi"]:
        probe_rows = [
            [factor, _cell(results["leakage"].get(factor))]
            + [_cell(results.get(key, {}).get(factor)) for key in RESIDUAL_MI_KEYS]
            for factor in spurious
        ]
        header = ["factor", "linear-probe leakage (bal. acc.)", "residual MI with f_z (nats)",
                  "residual MI with f_z given y (nats)", "residual MI with z (nats)"]  # fmt: skip
        tables.append(_markdown(header, probe_rows))
    skipped = {name: count for name, count in results.get("skipped_images", {}).items() if count}
    if skipped:
        counts = ", ".join(f"{count} of the {name} set" for name, count in skipped.items())
        tables.append(f"Left out as unreadable (the warnings name them): {counts}; the figures are over the other images.")
    return "\n\n".join(tables)


def _one_hot(labels: np.ndarray) -> np.ndarray:
    codes = np.unique(labels, return_inverse=True)[1].reshape(-1)
    return np.eye(codes.max() + 1)[codes]


def _output(outputs: Mapping[str, np.ndarray], key: str, set_name: str) -> np.ndarray:
    if key not in outputs:
        raise KeyError(
            f"test set {set_name!r} has no {key!r} (it has {sorted(outputs)}); gather it with collect_outputs."
        )
    return outputs[key]


def _cell(value: float | None) -> str:
    if value is None:
        return "–"
    return "n/a" if np.isnan(value) else f"{value:.3f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
