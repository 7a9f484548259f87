"""GradNorm under two gloo ranks: every rank records the global batch's first losses, as one process would."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from gloo_ranks import leave_process_group, spawn_gloo_ranks
from torch import nn

from mimm_med.weighting import GradNorm

WORLD_SIZE = 2
FIRST_LOSSES = ((0.5, 2.0), (1.5, 4.0))  # rank 0's and rank 1's, from their own shards


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        shared = nn.Linear(2, 2)
        gradnorm = GradNorm(["a", "b"])
        scale = shared(torch.ones(1, 2)).sum() * 0 + 1  # losses that reach the shared layer
        losses = {name: scale * value for name, value in zip(gradnorm.task_names, FIRST_LOSSES[rank])}
        gradnorm.gradnorm_loss(losses, list(shared.parameters()))
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(gradnorm.initial_losses.tolist()))
    finally:
        leave_process_group()


def test_every_rank_records_the_mean_first_losses(tmp_path):
    spawn_gloo_ranks(run_rank, tmp_path, WORLD_SIZE)
    expected = torch.tensor(FIRST_LOSSES).mean(dim=0)
    for rank in range(WORLD_SIZE):
        found = torch.tensor(json.loads((tmp_path / f"rank{rank}.json").read_text()))
        assert torch.allclose(found, expected), (rank, found)
