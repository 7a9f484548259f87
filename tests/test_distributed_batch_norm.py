"""Recomputed BatchNorm statistics under two gloo ranks: one network on every rank, as one process over all batches."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from gloo_ranks import leave_process_group, spawn_gloo_ranks
from torch import nn

from mimm_med.engines.batch_norm import RecomputeBatchNorm

WORLD_SIZE = 2


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def shard(rank: int) -> list[dict[str, torch.Tensor]]:
    """Two batches per rank, the ranks' images of clearly different means and spreads."""
    generator = torch.Generator().manual_seed(rank)
    return [{"image": (1 + 2 * rank) * torch.randn(4, 1, 6, 6, generator=generator) + 3 * rank} for _ in range(2)]


def recomputed(batches: list[dict[str, torch.Tensor]]) -> nn.Module:
    net = network()
    net(batches[0]["image"])  # materialize the lazy layer alike in every process
    RecomputeBatchNorm(batches)(SimpleNamespace(network=net))
    return net


def statistics(net: nn.Module) -> dict[str, list[float]]:
    norm = net[1]
    return {"mean": norm.running_mean.tolist(), "var": norm.running_var.tolist()}


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(statistics(recomputed(shard(rank)))))
    finally:
        leave_process_group()


def test_every_rank_holds_the_statistics_of_all_ranks_batches(tmp_path):
    spawn_gloo_ranks(run_rank, tmp_path, WORLD_SIZE)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    expected = statistics(recomputed(shard(0) + shard(1)))
    for found in ranks:
        for name in ("mean", "var"):
            assert torch.allclose(torch.tensor(found[name]), torch.tensor(expected[name]), rtol=1e-5, atol=1e-6), (found, expected)
    assert statistics(recomputed(shard(0)))["mean"] != expected["mean"]  # a rank's own statistics are not the pooled ones
