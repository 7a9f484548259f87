"""Bundle training in a subprocess, launched from the repository root as a user launches it."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run

REPO = Path(__file__).resolve().parents[1]
BRAIN_CONFIGS = "bundles/mimmx_brain/configs"
#: ``run_name`` of the brain bundle at its default method and seed: the folder of its checkpoints.
RUN_NAME = "mimmx-seed0"
#: Small and fast: 16³ volumes, 4 per batch.
SPATIAL_SIZE, BATCH_SIZE = 16, 4


def training_command(
    config_files: Sequence[str], splits: Path, bundle_root: Path, epochs: int, launcher: Sequence[str] = ()
) -> list[str]:
    """``python [launcher] -m monai.bundle run training`` of ``config_files`` on the ``splits`` folder.

    ``launcher`` goes between the interpreter and ``-m monai.bundle``, e.g.
    ``["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]``.
    """
    return [
        sys.executable, *launcher, "-m", "monai.bundle", "run", "training",
        "--config_file", str([f"{BRAIN_CONFIGS}/{name}" for name in config_files]),
        "--dataset_dir", str(splits),
        "--bundle_root", str(bundle_root),
        "--epochs", str(epochs),
        "--batch_size", str(BATCH_SIZE),
        "--spatial_size", json.dumps([SPATIAL_SIZE] * 3),
    ]  # fmt: skip


def run_env(tracking_uri: str) -> dict[str, str]:
    """The environment of a bundle subprocess: its MLflow store, one thread per process (two cores)."""
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def checkpoint_dir(bundle_root: Path) -> Path:
    return bundle_root / "models" / RUN_NAME


def checkpoint_files(bundle_root: Path) -> list[Path]:
    """The resumable checkpoints ``CheckpointSaver`` has written so far."""
    return sorted(checkpoint_dir(bundle_root).glob("checkpoint_*.pt"))


def bundle_runs(tracking_uri: str) -> list[Run]:
    """Every MLflow run of the brain bundle's experiment."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("mimmx_brain")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def metric_steps(tracking_uri: str, run_id: str, key: str) -> list[int]:
    """Steps at which ``key`` was logged to the run, in order."""
    return sorted(metric.step for metric in MlflowClient(tracking_uri).get_metric_history(run_id, key))


def error_chain(error: BaseException | None) -> list[BaseException]:
    """``error`` and the errors it was raised from or during (``monai.bundle`` wraps a config's errors)."""
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain
