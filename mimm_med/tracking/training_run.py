"""A bundle's training run and its MLflow run: a fresh start gets a run of its own, a crash marks it."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ignite.engine import Engine, Events
from mlflow import MlflowClient
from mlflow.entities import LifecycleStage, Run, RunStatus
from mlflow.exceptions import MlflowException

from mimm_med.data.writers import atomic_output
from mimm_med.interruption import terminate_as_interrupt, termination_ignored

from .run_names import experiment_named, set_aside
from .uri import TrackingServerUnreachable, keep_password_out_of_run_links, printable_uri, require_reachable

if TYPE_CHECKING:
    from monai.handlers import MLFlowHandler

__all__ = ["ended_status", "run_tracked"]

# The trainer's per-iteration total loss (MIMMXTrainer's ``engine.state.output["loss"]``), logged at
# every iteration by the MLFlowHandler, whose history shows how far an earlier attempt logged.
ITERATION_KEY = "loss"

logger = logging.getLogger(__name__)


def ended_status(error: BaseException | None) -> str:
    """The MLflow status of a run that ended with ``error``: FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED."""
    if error is None:
        return RunStatus.to_string(RunStatus.FINISHED)
    return RunStatus.to_string(RunStatus.KILLED if isinstance(error, KeyboardInterrupt) else RunStatus.FAILED)


def run_tracked(
    trainer: Engine,
    handler: MLFlowHandler | None,
    fresh: bool,
    run_record: str | Path | None = None,
    followers: Sequence[MLFlowHandler | None] = (),
) -> None:
    """Run ``trainer``, whose ``handler`` logs to MLflow; mark the MLflow run FAILED (KILLED on Ctrl-C or SIGTERM) if it raises.

    SIGTERM (a scheduler's time limit, torchrun stopping the other ranks) is taken as Ctrl-C
    (:func:`~mimm_med.interruption.terminate_as_interrupt`): it would otherwise end the process
    with the run left RUNNING. While the run is being ended, SIGTERM is ignored: when a DDP rank
    dies, the others' collectives fail as torchrun sends them SIGTERM, which would cut off their
    marking of the run as FAILED.

    A tracking server that does not answer stops the run before training
    (:func:`~mimm_med.tracking.uri.require_reachable`), not minutes of retries later.

    The MLflow run is found by the id kept in ``run_record`` (a JSON file beside the checkpoints),
    not by its name as MONAI's ``MLFlowHandler`` would: on a shared server other people's runs of
    the same bundle carry the same names (``erm-seed0``), running or interrupted. A ``fresh`` run
    (no checkpoint to resume) gets a new MLflow run; an unfinished one recorded by an earlier attempt
    in the same folder (crashed before its first checkpoint) is marked FAILED and renamed
    ``<name>-failed-<start time>``, so that it stays visible and the new run takes the name. A resumed
    run continues its recorded run, marked RUNNING again; a checkpoint without a record of its run
    continues in a new run, with a warning. The iterations a resumed run repeats (those after its
    checkpoint that the killed attempt had logged) are not logged again: MLflow would keep both
    values at every such step, and on CPU the repeat gives the same values.

    Parameters
    ----------
    trainer
        The engine to run.
    handler
        The ``MLFlowHandler`` attached to ``trainer``, or ``None`` where tracking is off (ranks other than 0).
    fresh
        Whether the run starts from scratch rather than from a checkpoint
        (:attr:`mimm_med.engines.ResumeFromLatest.checkpoint` is ``None``).
    run_record
        JSON file that keeps the run's id; ``None`` keeps none (every call then starts a new MLflow run).
    followers
        Other handlers that log to the same run, e.g. the validation evaluator's.
    """
    if handler is not None:
        require_reachable(handler.client.tracking_uri)
        keep_password_out_of_run_links(handler.client.tracking_uri)
        run = _own_run(handler, fresh, Path(run_record) if run_record is not None else None)
        for follower in (handler, *followers):
            if follower is not None:
                follower.cur_run = run
        if not fresh:
            _log_only_new_iterations(trainer, handler, run.info.run_id)
    try:
        with terminate_as_interrupt():
            trainer.run()
    except BaseException as error:
        if handler is not None and handler.cur_run is not None:
            with termination_ignored():  # torchrun's SIGTERM to the ranks a dead rank leaves behind
                _end_run(handler.client, handler.cur_run.info.run_id, ended_status(error), run_record)
        raise


def _end_run(client: MlflowClient, run_id: str, status: str, record: str | Path | None) -> None:
    """Mark the run ``status``, unless its server is gone: MLflow would retry for minutes, past a scheduler's grace period."""
    try:
        require_reachable(client.tracking_uri)
    except TrackingServerUnreachable as lost:
        logger.error("%s; MLflow run %s stays RUNNING, and rerunning the same command resumes it from its checkpoints (%s)",
                     lost, run_id, Path(record).parent if record is not None else "none recorded")  # fmt: skip
        return
    client.set_terminated(run_id, status)


def _log_only_new_iterations(trainer: Engine, handler: MLFlowHandler, run_id: str) -> None:
    """Re-attach ``handler``'s iteration logging behind a filter that also passes only the iterations ``run_id`` lacks."""
    logged = max((metric.step for metric in handler.client.get_metric_history(run_id, ITERATION_KEY)), default=0)
    if not logged or not trainer.has_event_handler(handler.iteration_completed, Events.ITERATION_COMPLETED):
        return
    chosen = handler.iteration_log if callable(handler.iteration_log) else (lambda engine, iteration: True)

    def unlogged(engine: Engine, iteration: int) -> bool:
        return iteration > logged and chosen(engine, iteration)

    trainer.remove_event_handler(handler.iteration_completed, Events.ITERATION_COMPLETED)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(event_filter=unlogged), handler.iteration_completed)


def _own_run(handler: MLFlowHandler, fresh: bool, record: Path | None) -> Run:
    """The MLflow run this training logs to: the recorded one when resuming, else a new one, recorded."""
    client = handler.client
    recorded = _recorded_run(client, record)
    if recorded is not None and not fresh:
        client.update_run(recorded.info.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return client.get_run(recorded.info.run_id)
    if recorded is not None and recorded.info.status != RunStatus.to_string(RunStatus.FINISHED):
        set_aside(client, recorded, "failed", RunStatus.to_string(RunStatus.FAILED))
    if not fresh:
        logger.warning(
            "no record of the MLflow run of the resumed checkpoint (%s); the resumed epochs go to a new run", record
        )
    experiment_id = experiment_named(client, handler.experiment_name, handler.artifact_location)
    run = client.create_run(experiment_id, run_name=handler.run_name)
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(record) as tmp:
            tmp.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": printable_uri(client.tracking_uri)}))
    return run


def _recorded_run(client: MlflowClient, record: Path | None) -> Run | None:
    """The run ``record`` names, if the file exists and the store holds that run."""
    if record is None or not record.is_file():
        return None
    run_id = json.loads(record.read_text(encoding="utf-8"))["run_id"]
    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    # A run deleted in the UI is still found, but refuses every update.
    if run is None or run.info.lifecycle_stage == LifecycleStage.DELETED:
        logger.warning("%s names run %s, which %s does not hold (or holds deleted); logging to a new run",
                       record, run_id, printable_uri(client.tracking_uri))  # fmt: skip
        return None
    return run
