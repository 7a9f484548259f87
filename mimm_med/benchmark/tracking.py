"""MLflow runs of a benchmark: one parent run per output folder, one child run per cell."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mimm_med.benchmark.matrix import Cell, cell_metrics
from mimm_med.data.writers import atomic_output
from mimm_med.tracking import default_artifact_location, ended_status, require_reachable, resolve_tracking_uri
from mimm_med.tracking.run_names import experiment_named
from mimm_med.tracking.uri import keep_password_out_of_run_links, printable_uri

RUN_FILE = "mlflow_run.json"


class BenchmarkTracker:
    """Log a benchmark to MLflow: a parent run for the whole matrix, a nested run per cell.

    The parent run's id is kept in ``<out>/mlflow_run.json``, so a resumed benchmark logs into the
    same parent run, and cells logged there before are not logged twice. A rerun of another matrix
    or into another experiment gets a parent run of its own, which the stored cells are logged into
    again: MLflow keeps a run's params as first logged.

    Parameters
    ----------
    out
        The benchmark's output folder.
    experiment
        MLflow experiment name (created with :func:`~mimm_med.tracking.default_artifact_location`).
    params
        Parameters of the parent run (logged when it is created).
    tracking_uri
        Passed to :func:`~mimm_med.tracking.resolve_tracking_uri`.

    Examples
    --------
    A smoke run of one cell (see :func:`~mimm_med.benchmark.matrix.run_matrix`), logged to a new SQLite
    store: creating the store's tables alone takes MLflow several seconds, hence not run as a test.

    >>> import tempfile
    >>> from mimm_med.benchmark import DigitsData, plan_cells, run_matrix, write_results
    >>> out = tempfile.mkdtemp()
    >>> cells = plan_cells(["digits"], ["erm"], [0.9], [0])
    >>> smoke = {"epochs": 1, "batch_size": 16, "backbone_kwargs": {"channels": [4]}}
    >>> with BenchmarkTracker(out, "mimm-med-benchmark", smoke, f"sqlite:///{out}/mlflow.db") as tracker:  # doctest: +SKIP
    ...     results = run_matrix(cells, {"digits": DigitsData(limit=32)}, out, smoke, on_result=tracker.log_cell)
    ...     tracker.log_artifacts(write_results(results, out).values())
    >>> sorted(results[0]["mlflow"])  # doctest: +SKIP
    ['parent_run_id', 'run_id']
    """

    def __init__(
        self, out: str | Path, experiment: str, params: Mapping[str, Any], tracking_uri: str | None = None
    ) -> None:
        self.uri = resolve_tracking_uri(tracking_uri)
        require_reachable(self.uri)
        keep_password_out_of_run_links(self.uri)
        self.client = MlflowClient(self.uri)
        self.run_file = Path(out) / RUN_FILE
        # before any MLflow run exists: an --out that cannot be written must not leave one RUNNING
        self.run_file.parent.mkdir(parents=True, exist_ok=True)
        self.run_id = self._resume(experiment, params) or self._create(experiment, params)
        self.experiment_id = self.client.get_run(self.run_id).info.experiment_id

    @property
    def _recorded_uri(self) -> str:
        """The URI as ``mlflow_run.json`` keeps it: without its password (the file sits among the results), nor a final slash."""
        return printable_uri(self.uri).rstrip("/")

    def _resume(self, experiment: str, params: Mapping[str, Any]) -> str | None:
        """The recorded parent run, RUNNING again; ``None`` if it is of another store, experiment or matrix, or gone."""
        if not self.run_file.exists():
            return None
        try:
            stored = json.loads(self.run_file.read_text(encoding="utf-8"))
            recorded_uri, run_id = stored["tracking_uri"], stored["run_id"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(
                f"{self.run_file} is damaged ({type(error).__name__}: {error}); delete it and the benchmark logs "
                "to a new parent run (its finished cells are kept)"
            ) from None
        if recorded_uri != self._recorded_uri:
            return None
        try:
            run = self.client.get_run(run_id)
            if self.client.get_experiment(run.info.experiment_id).name != experiment:
                return None  # --experiment changed: a parent run there, the stored cells logged into it again
            if run.data.params != {name: _param(value) for name, value in params.items()}:
                return None  # another matrix (methods, seeds, ...): its params are immutable, so a parent run of its own
            self.client.update_run(run_id, status="RUNNING")
        except MlflowException:  # deleted, or the store was wiped
            return None
        return run_id

    def _create(self, experiment: str, params: Mapping[str, Any]) -> str:
        experiment_id = experiment_named(self.client, experiment, default_artifact_location(tracking_uri=self.uri))
        run_id = self.client.create_run(experiment_id, run_name=self.run_file.parent.name).info.run_id
        try:
            self.client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in params.items()])
            with atomic_output(self.run_file) as tmp:  # interrupted, the file stays as it was, never half written
                tmp.write_text(json.dumps({"tracking_uri": self._recorded_uri, "run_id": run_id}), encoding="utf-8")
        except BaseException:
            self.client.delete_run(run_id)  # a run of a benchmark that never started would stay RUNNING
            raise
        return run_id

    def log_cell(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """Log a cell result as a child run unless it is logged under this parent already.

        Returns
        -------
        dict
            ``{"mlflow": {"parent_run_id", "run_id"}}`` to store with the cell, or ``{}`` if nothing was logged.
        """
        if result.get("mlflow", {}).get("parent_run_id") == self.run_id:
            return {}
        cell = result["cell"]
        # The child run spans the cell's training, ending now (a stored cell is logged after the fact).
        now = int(time.time() * 1000)
        training = int(1000 * result["seconds"]) if math.isfinite(result["seconds"]) else 0
        child = self.client.create_run(
            self.experiment_id,
            start_time=now - training,
            run_name=Cell(**cell).key,
            tags={MLFLOW_PARENT_RUN_ID: self.run_id},
        ).info.run_id
        params = {**result["config"], **cell}
        self.client.log_batch(
            child,
            metrics=[Metric(name, value, now, 0) for name, value in cell_metrics(result).items()] + _training_curves(result, now),
            params=[Param(name, _param(value)) for name, value in params.items()],
        )
        self.client.set_terminated(child, status="FINISHED" if result["diverged"] is None else "FAILED", end_time=now)
        return {"mlflow": {"parent_run_id": self.run_id, "run_id": child}}

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        """Attach files (the results table, Markdown and plots) to the parent run."""
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def __enter__(self) -> BenchmarkTracker:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.client.set_terminated(self.run_id, status=ended_status(error))


def _training_curves(result: Mapping[str, Any], timestamp: int) -> list[Metric]:
    """The cell's per-epoch training means (losses, MI estimates, confounder weights) as ``train/...`` steps, logged at ``timestamp`` (ms).

    Where a penalty fails to remove a factor, these curves show when and how; the final metrics do not.
    Terms a method lacks (ERM's critic loss) are NaN and left out.
    """
    return [
        Metric(f"train/{name}", float(value), timestamp, int(epoch["epoch"]))
        for epoch in result["history"]
        for name, value in epoch.items()
        if name != "epoch" and isinstance(value, (int, float)) and math.isfinite(value)
    ]


def _param(value: Any) -> str:
    """MLflow parameter text: JSON for containers, ``str`` otherwise."""
    return json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)
