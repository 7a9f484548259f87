"""The MLflow run of a MONAI ``MLFlowHandler``, as seen by handlers that log into it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ignite.engine import Engine, Events
from mlflow import MlflowClient

from mimm_med.distributed import is_rank_zero

if TYPE_CHECKING:
    from monai.handlers import MLFlowHandler

__all__ = ["CompletionLogger", "HandlerRun"]


class HandlerRun:
    """Follows the run of a MONAI ``MLFlowHandler`` so that artifacts can be logged at ``COMPLETED``.

    The handler creates its run at ``STARTED`` and, with ``close_on_complete``, forgets it at
    ``COMPLETED``; ignite calls handlers of one event in the order they were attached, so a handler
    of ours may run before the run exists or after it was closed. The run id is therefore read at
    every ``EPOCH_COMPLETED``, when the run always exists; MLflow accepts artifacts and models for
    a finished run.

    Parameters
    ----------
    handler
        The ``monai.handlers.MLFlowHandler`` attached to the same engine; ``None`` on ranks other than
        0 where a multi-GPU bundle disables it (``"_disabled_"``).
    """

    def __init__(self, handler: MLFlowHandler | None) -> None:
        self.handler = handler
        self._run_id: str | None = None

    def attach(self, engine: Engine) -> None:
        """Read the run id at every epoch end."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.update)

    def update(self, engine: Engine | None = None) -> None:
        """Remember the handler's current run, if it has one (rank 0 only)."""
        if is_rank_zero() and self.handler.cur_run is not None:
            self._run_id = self.handler.cur_run.info.run_id

    @property
    def run_id(self) -> str:
        """Id of the handler's run; raises ``RuntimeError`` before the handler started one."""
        self.update()
        if self._run_id is None:
            raise RuntimeError(
                "the MLFlowHandler has no run yet; attach it to the same engine (it starts its run at STARTED)."
            )
        return self._run_id

    @property
    def client(self) -> MlflowClient:
        """The handler's client, bound to its tracking URI."""
        return self.handler.client

    @property
    def tracking_uri(self) -> str:
        """The tracking URI the handler logs to (``MLFLOW_TRACKING_URI`` resolved)."""
        return self.handler.client.tracking_uri


class CompletionLogger:
    """Base of the handlers that log into the run of an ``MLFlowHandler`` once their engine completes.

    Subclasses implement :meth:`log`, which runs on rank 0 only.

    Parameters
    ----------
    mlflow_handler
        The ``monai.handlers.MLFlowHandler`` attached to the same engine (``None`` off rank 0).
    """

    def __init__(self, mlflow_handler: MLFlowHandler | None) -> None:
        self.run = HandlerRun(mlflow_handler)

    def attach(self, engine: Engine) -> None:
        """Log when ``engine`` completes, after the handlers attached before this one."""
        self.run.attach(engine)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if is_rank_zero():
            self.log()

    def log(self) -> None:
        """Log into :attr:`run`."""
        raise NotImplementedError
