"""Stops by a scheduler's SIGTERM handled as Ctrl-C, so that cleanup runs."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["terminate_as_interrupt"]


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Raise ``KeyboardInterrupt`` on SIGTERM while the block runs, as on Ctrl-C.

    Schedulers stop jobs with SIGTERM (SLURM at its time limit, Kubernetes on eviction); handled
    like Ctrl-C, the commands' cleanup runs: finished work is recorded, MLflow runs are ended as
    KILLED instead of staying RUNNING, and nothing is left half-written. Only the main thread can
    set a signal handler, so elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
