"""A bundle's training run and its MLflow run: a fresh start gets a run of its own, a crash marks it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ignite.engine import Engine
from mlflow.entities import RunStatus

from mimm_med.interruption import terminate_as_interrupt

from .run_names import runs_named, set_aside
from .uri import require_reachable

if TYPE_CHECKING:
    from monai.handlers import MLFlowHandler

__all__ = ["ended_status", "run_tracked"]


def ended_status(error: BaseException | None) -> str:
    """The MLflow status of a run that ended with ``error``: FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED."""
    if error is None:
        return RunStatus.to_string(RunStatus.FINISHED)
    return RunStatus.to_string(RunStatus.KILLED if isinstance(error, KeyboardInterrupt) else RunStatus.FAILED)


def run_tracked(trainer: Engine, handler: MLFlowHandler | None, fresh: bool) -> None:
    """Run ``trainer``, whose ``handler`` logs to MLflow; mark the MLflow run FAILED (KILLED on Ctrl-C or SIGTERM) if it raises.

    SIGTERM (a scheduler's time limit, torchrun stopping the other ranks) is taken as Ctrl-C
    (:func:`~mimm_med.interruption.terminate_as_interrupt`): it would otherwise end the process
    with the run left RUNNING.

    A tracking server that does not answer stops the run before training
    (:func:`~mimm_med.tracking.uri.require_reachable`), not minutes of retries later.

    MONAI's ``MLFlowHandler`` continues an unfinished run of its name, which is what a run resumed
    from its checkpoint wants. A ``fresh`` run (no checkpoint to resume) must not: an unfinished run
    of the same name was left by an attempt that crashed before its first checkpoint, or whose
    folder was deleted, and MLflow refuses to change its parameters. Such runs are marked FAILED and
    renamed ``<name>-failed-<start time>``, so that they stay visible and the fresh run takes the name.

    Parameters
    ----------
    trainer
        The engine to run.
    handler
        The ``MLFlowHandler`` attached to ``trainer``, or ``None`` where tracking is off (ranks other than 0).
    fresh
        Whether the run starts from scratch rather than from a checkpoint
        (:attr:`mimm_med.engines.ResumeFromLatest.checkpoint` is ``None``).
    """
    if handler is not None:
        require_reachable(handler.client.tracking_uri)
    if handler is not None and fresh:
        _retire_unfinished_runs(handler)
    try:
        with terminate_as_interrupt():
            trainer.run()
    except BaseException as error:
        if handler is not None and handler.cur_run is not None:
            handler.client.set_terminated(handler.cur_run.info.run_id, ended_status(error))
        raise


def _retire_unfinished_runs(handler: MLFlowHandler) -> None:
    experiment = handler.client.get_experiment_by_name(handler.experiment_name)
    if experiment is None or handler.run_name is None:
        return
    finished = RunStatus.to_string(RunStatus.FINISHED)
    for run in runs_named(handler.client, experiment.experiment_id, handler.run_name):
        if run.info.status != finished:
            set_aside(handler.client, run, "failed", RunStatus.to_string(RunStatus.FAILED))
