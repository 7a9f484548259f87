"""Evaluate a trained network on the three test sets and write the report (JSON, Markdown, plots, MLflow)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import torch
from monai.data import DataLoader

from mimm_med.data.manifest import ManifestError
from mimm_med.data.skipping import ReadableBatches, SkippingDataset, collate_readable
from mimm_med.data.writers import atomic_output, write_json
from mimm_med.engines.resume import load_trained_weights, trained_checkpoint
from mimm_med.evaluation.outputs import collect_outputs
from mimm_med.evaluation.plots import plot_group_accuracy, plot_tsne
from mimm_med.evaluation.protocol import evaluate_test_sets, flatten_metrics, results_table
from mimm_med.tracking.run_names import experiment_named, runs_named, set_aside
from mimm_med.tracking.training_run import ended_status
from mimm_med.tracking.uri import keep_password_out_of_run_links, printable_uri, require_reachable

#: Tag of an evaluation run that a later evaluation of the same name replaced: the later run's id.
SUPERSEDED_TAG = "mimm_med.superseded_by"

TEST_SET_FILES: dict[str, str] = {"iid": "test-iid.csv", "balanced": "test-balanced.csv", "inverted": "test-inverted.csv"}


def evaluate_network(
    network: torch.nn.Module,
    loaders: Mapping[str, Any],
    primary: str,
    spurious: Sequence[str],
    device: torch.device | str,
    amp: bool = False,
    residual_mi: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, dict]]:
    """Run the evaluation protocol (:mod:`~mimm_med.evaluation.protocol`) on test loaders ``iid``, ``balanced``, ``inverted``.

    Leakage and residual MI read f_y of the balanced set, where z is independent of y, so a probe
    cannot score by predicting y.

    Returns
    -------
    results, outputs
        :func:`evaluate_test_sets` results and the collected outputs per set.
    """
    factors = [primary, *spurious]
    outputs = {name: collect_outputs(network, loader, factors, device, amp=amp) for name, loader in loaders.items()}
    if residual_mi is not None:
        residual_mi = {"device": device, **residual_mi}
    results = evaluate_test_sets(outputs, primary, spurious, leakage_set="balanced", residual_mi=residual_mi, seed=seed)
    return results, outputs


def write_report(
    results: Mapping[str, Any], outputs: Mapping[str, Mapping], primary: str, spurious: Sequence[str], output_dir: str | Path
) -> dict[str, Path]:
    """Write ``results.json``, ``results.md``, the group-accuracy bars and the t-SNE of f_y; return their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "results.json", "markdown": output_dir / "results.md"}
    write_json(paths["json"], {**results, "metrics": flatten_metrics(results)})
    with atomic_output(paths["markdown"]) as temporary:
        temporary.write_text(results_table(results) + "\n", encoding="utf-8")
    paths["group_accuracy"] = plot_group_accuracy(results["sets"], output_dir / "group_accuracy.png")
    balanced = outputs["balanced"]
    labels = {name: balanced[f"{name}_label"] for name in (primary, *spurious)}
    paths["tsne"] = plot_tsne(balanced[f"{primary}_features"], labels, output_dir / "tsne_primary_features.png")
    return paths


def log_report(
    metrics: Mapping[str, float],
    paths: Mapping[str, Path],
    tracking_uri: str,
    experiment_name: str,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    artifact_location: str | None = None,
) -> str:
    """Log metrics and report files as an MLflow run ``run_name``; return its run id.

    The newest evaluation keeps the name: once this run is logged, earlier runs of ``run_name`` that
    evaluated the same checkpoint (the ``checkpoint`` param) are renamed
    ``<run_name>-superseded-<start time>`` and tagged ``mimm_med.superseded_by``. Evaluations of other
    checkpoints of that name (another folder's, another person's on a shared server) are left alone. A run whose
    logging fails is marked FAILED (KILLED on Ctrl-C) and renamed ``<run_name>-failed-<start time>``,
    and the earlier runs keep the name. The metrics are logged at step 0 with the time of logging
    (MLflow's charts and their "wall time" axis read it; 0 would date them 1970).
    """
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = experiment_named(client, experiment_name, artifact_location)
    checkpoint = (params or {}).get("checkpoint")
    earlier = [run for run in runs_named(client, experiment_id, run_name) if run.data.params.get("checkpoint") == checkpoint]
    run = client.create_run(experiment_id, run_name=run_name)
    run_id = run.info.run_id
    try:
        for name, value in (params or {}).items():
            client.log_param(run_id, name, value)
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items()])
        for path in paths.values():
            client.log_artifact(run_id, str(path), artifact_path="evaluation")
    except BaseException as error:
        set_aside(client, run, "failed", ended_status(error))
        raise
    client.set_terminated(run_id)
    for old in earlier:
        set_aside(client, old, "superseded")
        client.set_tag(old.info.run_id, SUPERSEDED_TAG, run_id)
    return run_id


def evaluate_checkpoint(
    network: torch.nn.Module,
    checkpoint: str | Path,
    dataset_dir: str | Path,
    datalist_fn: Callable[[Path], list[dict]],
    transform: Callable,
    primary: str,
    spurious: Sequence[str],
    device: torch.device | str,
    output_dir: str | Path,
    batch_size: int = 8,
    amp: bool = False,
    tracking_uri: str | None = None,
    experiment_name: str | None = None,
    run_name: str | None = None,
    artifact_location: str | None = None,
    seed: int = 0,
    residual_mi: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load ``checkpoint`` (a CheckpointSaver file with a ``network`` entry) and evaluate on the test splits.

    A test image that cannot be loaded or transformed is left out with a warning naming it, and
    counted per set in ``results["skipped_images"]`` (also in the report and MLflow).

    This is what every bundle's ``evaluate.json`` runs. With ``tracking_uri`` and ``experiment_name``
    the metrics and report files are logged as an MLflow run ``run_name``, with ``params`` (the
    training run's settings, so that evaluations can be filtered and compared by them) beside the
    checkpoint. ``residual_mi``, if given, holds the options of the residual-MI critics
    (:func:`evaluate_network`; ``{}`` for MINE's defaults).

    Returns
    -------
    dict
        ``results`` (nested), ``metrics`` (flat) and ``paths`` of the report files.
    """
    checkpoint = trained_checkpoint(checkpoint)
    if tracking_uri and experiment_name:
        require_reachable(tracking_uri)  # before the evaluation, not after it
        keep_password_out_of_run_links(tracking_uri)
    load_trained_weights(network, checkpoint, map_location=device).to(device)
    datalists = {name: datalist_fn(Path(dataset_dir) / filename) for name, filename in TEST_SET_FILES.items()}
    for name, datalist in datalists.items():
        if not datalist:  # else "none of the 0 images could be read", naming no file
            raise ManifestError(
                f"{Path(dataset_dir) / TEST_SET_FILES[name]} holds no image to evaluate (no row, or none with status "
                "'ok'): split a cohort with more subjects, or give the test sets a larger share "
                "(`mimm-med cohort split --fractions TRAIN,VAL,TEST`)"
            )
    # One unreadable test image costs its own row, not the evaluation; the report counts what it left out.
    loaders = {
        name: ReadableBatches(
            DataLoader(SkippingDataset(datalist, transform=transform, name_key="image"), batch_size=batch_size, collate_fn=collate_readable)
        )
        for name, datalist in datalists.items()
    }
    results, outputs = evaluate_network(network, loaders, primary, spurious, device, amp=amp, residual_mi=residual_mi, seed=seed)
    results["skipped_images"] = {name: len(datalist) - len(outputs[name][f"{primary}_label"]) for name, datalist in datalists.items()}
    paths = write_report(results, outputs, primary, spurious, output_dir)
    metrics = flatten_metrics(results)
    logged = ""
    if tracking_uri and experiment_name:
        log_report(metrics, paths, tracking_uri, experiment_name, run_name or "evaluate", {**(params or {}), "checkpoint": str(Path(checkpoint).resolve())}, artifact_location)
        logged = f"; MLflow run {run_name or 'evaluate'!r} of experiment {experiment_name!r} at {printable_uri(tracking_uri)}"
    print(results_table(results))
    # The table alone does not say where the files went (``--bundle_root`` moves them).
    print(f"evaluate: report {paths['markdown']}, with results.json and the plots in {Path(output_dir)}{logged}")
    return {"results": results, "metrics": metrics, "paths": paths}
