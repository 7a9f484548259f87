"""Stops by Ctrl-C or a scheduler's SIGTERM, raised where cleanup can then run."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import Any

__all__ = ["terminate_as_interrupt", "termination_ignored"]


def _runs_a_transaction(module: str) -> bool:
    """Whether an interrupt inside ``module`` could leave a database transaction open.

    SQLAlchemy and MLflow's SQL stores: SQLite then stays locked to the cleanup that follows in the
    same process (ending the MLflow run), which fails with "database is locked" and leaves the run
    RUNNING. Not MLflow's REST store, whose retries against a lost server an interrupt must cut short.
    """
    return module.startswith(("sqlalchemy", "mlflow.store.db")) or module.endswith("sqlalchemy_store")


def _outermost_transaction_frame(frame: FrameType | None) -> FrameType | None:
    """The outermost frame of ``frame``'s stack that runs a transaction (:func:`_runs_a_transaction`), if any."""
    outermost = None
    while frame is not None:
        if _runs_a_transaction(frame.f_globals.get("__name__", "")):
            outermost = frame
        frame = frame.f_back
    return outermost


def _interrupt_on_return(frame: FrameType) -> None:
    """Raise ``KeyboardInterrupt`` in ``frame``'s caller as ``frame`` returns (or raises)."""
    previous = sys.gettrace()

    def on_return(traced: FrameType, event: str, arg: Any) -> Callable | None:
        if event == "return":
            sys.settrace(previous)
            raise KeyboardInterrupt
        return on_return

    frame.f_trace_lines = False
    frame.f_trace = on_return
    # Local trace functions run only while a global one is set; this one traces no other frame.
    sys.settrace(previous or (lambda called, event, arg: None))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    transaction = _outermost_transaction_frame(frame)
    if transaction is None:
        raise KeyboardInterrupt
    _interrupt_on_return(transaction)


@contextlib.contextmanager
def _on_signals(signums: Sequence[int], action: Callable[[int, Any], None] | signal.Handlers) -> Iterator[None]:
    """Handle ``signums`` with ``action`` while the block runs; only the main thread can set a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, action) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def terminate_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """Raise ``KeyboardInterrupt`` on SIGTERM while the block runs, as on Ctrl-C, but never inside a database write.

    Schedulers stop jobs with SIGTERM (SLURM at its time limit, Kubernetes on eviction); handled
    like Ctrl-C, the commands' cleanup runs: finished work is recorded, MLflow runs are ended as
    KILLED instead of staying RUNNING, and nothing is left half-written. An interrupt (SIGTERM or
    Ctrl-C) that arrives while MLflow writes to its store is raised as the write returns: raised
    inside it, it would leave the SQLite store locked to that cleanup. Only the main thread can set
    a signal handler, so elsewhere the block runs unchanged.
    """
    return _on_signals((signal.SIGTERM, signal.SIGINT), _interrupt)


def termination_ignored() -> contextlib.AbstractContextManager[None]:
    """Ignore SIGTERM while the block runs: for a short cleanup that must not be cut off.

    When one DDP rank dies, torchrun sends SIGTERM to the others at the moment their collectives
    fail, i.e. just as their own cleanup (ending the MLflow run as FAILED) starts. A scheduler that
    is not answered escalates to SIGKILL after its grace period, so the block should be short.
    """
    return _on_signals((signal.SIGTERM,), signal.SIG_IGN)
