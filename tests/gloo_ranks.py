"""Start gloo ranks for the distributed tests."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp


def spawn_gloo_ranks(run_rank: Callable[..., None], out_dir: Path, world_size: int) -> None:
    """``mp.spawn(run_rank, (init_file, out_dir))`` with one retry when a rank is killed by a signal.

    On the shared 2-core CI machine gloo has, rarely, aborted a rank (SIGABRT before any test code ran)
    while another test worker was starting its own process group. A rank killed by a signal is retried
    once with a fresh rendezvous file; an exception raised by test code still fails at once.
    """
    for attempt in (1, 2):
        init_file = out_dir / f"init-{uuid.uuid4().hex}"
        try:
            mp.spawn(run_rank, args=(str(init_file), str(out_dir)), nprocs=world_size, join=True)
            return
        except mp.ProcessExitedException as error:
            if attempt == 2 or error.signal_name is None:
                raise
