"""Stops by a scheduler's SIGTERM handled as Ctrl-C, so that cleanup runs."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["terminate_as_interrupt", "termination_ignored"]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _on_termination(action: Callable[[int, Any], None] | signal.Handlers) -> Iterator[None]:
    """Handle SIGTERM with ``action`` while the block runs; only the main thread can set a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, action)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def terminate_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """Raise ``KeyboardInterrupt`` on SIGTERM while the block runs, as on Ctrl-C.

    Schedulers stop jobs with SIGTERM (SLURM at its time limit, Kubernetes on eviction); handled
    like Ctrl-C, the commands' cleanup runs: finished work is recorded, MLflow runs are ended as
    KILLED instead of staying RUNNING, and nothing is left half-written. Only the main thread can
    set a signal handler, so elsewhere the block runs unchanged.
    """
    return _on_termination(_interrupt)


def termination_ignored() -> contextlib.AbstractContextManager[None]:
    """Ignore SIGTERM while the block runs: for a short cleanup that must not be cut off.

    When one DDP rank dies, torchrun sends SIGTERM to the others at the moment their collectives
    fail, i.e. just as their own cleanup (ending the MLflow run as FAILED) starts. A scheduler that
    is not answered escalates to SIGKILL after its grace period, so the block should be short.
    """
    return _on_termination(signal.SIG_IGN)
