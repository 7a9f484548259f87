"""InvariantHeadRefit under two gloo ranks: each rank's part of the training set, one refit on all of it."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from gloo_ranks import leave_process_group, spawn_gloo_ranks
from monai.data import partition_dataset
from test_head_refit import _identity_network, _loader, _records

from mimm_med.engines import InvariantHeadRefit

WORLD_SIZE = 2


def _refitted(train: list[dict], held_out: list[dict]) -> dict[str, torch.Tensor]:
    network = _identity_network()
    InvariantHeadRefit(_loader(train), "y", ["z"], held_out_loader=_loader(held_out)).refit(network)
    # what the refit changes; the z head is a random initialization of each process
    return {name: value.clone() for name, value in network.state_dict().items() if not name.startswith("heads.z")}


def _parts(records: list[dict], rank: int) -> list[dict]:
    # 301 and 151 records: the ranks' parts differ in length, as partition_dataset leaves them
    return partition_dataset(records, num_partitions=WORLD_SIZE, shuffle=False, even_divisible=False)[rank]


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        train, held_out = _records(301, 0.9, seed=0), _records(151, 0.9, seed=2)
        torch.save(_refitted(_parts(train, rank), _parts(held_out, rank)), Path(out_dir) / f"rank{rank}.pt")
    finally:
        leave_process_group()


def test_every_rank_refits_on_all_ranks_parts_as_one_process_on_the_whole_set(tmp_path):
    spawn_gloo_ranks(run_rank, tmp_path, WORLD_SIZE)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]
    whole = _refitted(_records(301, 0.9, seed=0), _records(151, 0.9, seed=2))
    for name, value in whole.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name}: the ranks refitted different heads"
        # the same rows in another order: only floating-point summation order differs
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.allclose(whole["heads.y.weight"], _identity_network().state_dict()["heads.y.weight"])
