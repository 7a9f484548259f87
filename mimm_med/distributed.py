"""The process group of a distributed (torchrun) run: joining it, which process tracks, choices rank 0 makes for all."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch.distributed as dist

__all__ = ["LAUNCHER_VARIABLES", "gathered_rows", "is_rank_zero", "rank_zero_choice", "start_process_group", "world_size"]

#: What torchrun sets in each process it starts, and ``init_process_group``'s env:// rendezvous reads.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def world_size() -> int:
    """The number of ranks of ``torch.distributed``'s process group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_rank_zero() -> bool:
    """Whether this process logs: always without ``torch.distributed``, else only rank 0."""
    return world_size() == 1 or dist.get_rank() == 0


def start_process_group(backend: str, bundle_name: str) -> None:
    """Join the process group torchrun set up for this process, unless it is joined already, and set up ignite's view of it.

    Raises a ``RuntimeError`` that says how to launch bundle ``bundle_name`` when the process was not
    started by torchrun (torch's own error names one variable and not the launcher).
    """
    if dist.is_initialized():
        return
    missing = [name for name in LAUNCHER_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"multi_gpu_train.json trains with one process per GPU (or per CPU process), started by torchrun, "
            f"but this process lacks the variables torchrun sets ({', '.join(missing)}). Launch it with "
            f"torchrun --standalone --nproc_per_node=<processes> -m monai.bundle run training --config_file "
            f"\"['bundles/{bundle_name}/configs/train.json','bundles/{bundle_name}/configs/multi_gpu_train.json']\", or "
            f"leave multi_gpu_train.json out to train in this one process"
        )
    dist.init_process_group(backend=backend)
    # ignite sets up its view of the group (collectives on a group of its own) the first time a process
    # asks it for its rank; CheckpointSaver asks on rank 0 alone, which then waits for the other ranks
    # in those collectives, a deadlock once they wait for rank 0 in one of theirs. Set up on every rank now.
    idist.sync()


def rank_zero_choice(path: Path | None) -> Path | None:
    """Rank 0's ``path`` on every rank of ``torch.distributed``; ``path`` itself without a process group."""
    if world_size() == 1:
        return path
    choice = [None if path is None else str(path)]
    dist.broadcast_object_list(choice, src=0)
    return None if choice[0] is None else Path(choice[0])


def gathered_rows(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every rank's rows of each array, concatenated in rank order, on every rank; ``arrays`` itself without a process group.

    For what each rank computed over its own part of a data set (a forward pass over the training
    set), so that every rank fits the same thing on all of it.
    """
    if world_size() == 1:
        return dict(arrays)
    parts: list[Mapping[str, np.ndarray] | None] = [None] * world_size()
    dist.all_gather_object(parts, dict(arrays))
    return {key: np.concatenate([part[key] for part in parts]) for key in arrays}
