"""Start and leave gloo ranks for the distributed tests."""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

#: Seconds the ranks of one spawn may take; a hung rank fails the test instead of the CI run's time limit.
RANKS_TIMEOUT_S = 300.0


def spawn_gloo_ranks(run_rank: Callable[..., None], out_dir: Path, world_size: int) -> None:
    """``mp.spawn(run_rank, (init_file, out_dir))`` with one retry when a rank is killed by a signal.

    On the shared 2-core CI machine gloo has, rarely, aborted a rank (SIGABRT before any test code ran)
    while another test worker was starting its own process group. A rank killed by a signal is retried
    once with a fresh rendezvous file; an exception raised by test code still fails at once. Ranks
    still running after :data:`RANKS_TIMEOUT_S` are killed and the test fails naming them.
    """
    for attempt in (1, 2):
        init_file = out_dir / f"init-{uuid.uuid4().hex}"
        context = mp.spawn(run_rank, args=(str(init_file), str(out_dir)), nprocs=world_size, join=False)
        deadline = time.monotonic() + RANKS_TIMEOUT_S
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    running = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
                    for process in context.processes:
                        process.kill()
                    raise TimeoutError(f"gloo ranks {running} of {world_size} still running after {RANKS_TIMEOUT_S:.0f} s")
            return
        except mp.ProcessExitedException as error:
            if attempt == 2 or error.signal_name is None:
                raise


def leave_process_group() -> None:
    """Free what holds the process group, then leave it: call in a rank's ``finally``, after its work.

    A ``DistributedDataParallel`` freed only after ``destroy_process_group`` (still a local of the
    rank, or in a reference cycle such as an ignite engine's) destroys the gloo group from its
    reducer's destructor, with the GIL held, while gloo's worker thread waits for the GIL to free a
    finished work item: the rank hung for good (seen once in a CI rehearsal).
    """
    gc.collect()
    dist.destroy_process_group()
