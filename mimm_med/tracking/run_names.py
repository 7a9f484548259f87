"""MLflow experiments and runs by name: the experiment's id, the runs of one name, and one set aside under a longer name."""

from __future__ import annotations

import re
import time

from mlflow import MlflowClient
from mlflow.entities import Run

__all__ = ["experiment_named", "filter_prefix", "runs_named", "set_aside"]


def experiment_named(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """The id of the experiment ``name``, created with ``artifact_location`` if the store has none of that name."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def filter_prefix(name: str) -> str:
    """The text of ``name`` before its first quote, to search with ``LIKE '<prefix>%'`` and then compare names.

    MLflow's filter strings cannot quote a name holding both quote characters; the prefix's LIKE wildcards
    (``%``, ``_``) only widen the search.
    """
    return re.split(r"['\"]", name)[0]


def runs_named(client: MlflowClient, experiment_id: str, name: str) -> list[Run]:
    """Every run of ``experiment_id`` named ``name``, over all result pages.

    The store is searched for the :func:`filter_prefix` of the name and the names are compared here.
    """
    prefix = filter_prefix(name)
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], f"attributes.run_name LIKE '{prefix}%'", page_token=token)
        runs.extend(run for run in page if run.info.run_name == name)
        token = page.token
        if not token:
            return runs


def set_aside(client: MlflowClient, run: Run, label: str, status: str | None = None) -> None:
    """Rename ``run`` to ``<name>-<label>-<start time>``, so that its name is free and it stays visible.

    ``status`` (an MLflow ``RunStatus`` name), if given, also ends the run with that status.
    """
    started = time.strftime("%Y%m%d-%H%M%S", time.localtime(run.info.start_time / 1000))
    client.update_run(run.info.run_id, status=status, name=f"{run.info.run_name}-{label}-{started}")
