"""EpochAverages under two gloo ranks: the epoch means are over every rank's iterations, the same on each rank."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch.distributed as dist
from gloo_ranks import leave_process_group, spawn_gloo_ranks
from ignite.engine import Engine

from mimm_med.tracking import EpochAverages

WORLD_SIZE = 2
#: Per rank, per iteration: each rank's loss of its part of the global batch; critic_loss NaN on rank 1 once.
OUTPUTS = (
    ({"loss": 1.0, "critic_loss": 0.5}, {"loss": 3.0, "critic_loss": 0.7}),
    ({"loss": 5.0, "critic_loss": math.nan}, {"loss": 7.0, "critic_loss": 0.9}),
)


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        averages = EpochAverages()
        engine = Engine(lambda engine, output: output)
        averages.attach(engine)
        engine.run(list(OUTPUTS[rank]), max_epochs=1)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps([engine.state.metrics, averages.state_dict()]))
    finally:
        leave_process_group()


def test_every_rank_holds_the_means_over_all_ranks(tmp_path):
    spawn_gloo_ranks(run_rank, tmp_path, WORLD_SIZE)
    expected = {"train/loss": (1 + 3 + 5 + 7) / 4, "train/critic_loss": (0.5 + 0.7 + 0.9) / 3}
    found = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    for metrics, _ in found:
        assert metrics == expected
    # rank 0's checkpoint item is every rank's: a resumed rank 1 goes on from the same sums
    assert found[0][1] == found[1][1]
    assert found[0][1]["counts"] == {"loss": 4, "critic_loss": 3}
