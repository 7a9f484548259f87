"""DDP: two gloo ranks train like one process on the global batch; the bundle runs under torchrun."""

from __future__ import annotations

import math
import re
import subprocess
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
from bundle_runs import (
    BATCH_SIZE,
    REPO,
    RUN_NAME,
    bundle_runs,
    checkpoint_dir,
    checkpoint_files,
    metric_steps,
    run_env,
    training_command,
)
from gloo_ranks import leave_process_group, spawn_gloo_ranks
from mlflow import MlflowClient
from torch import nn

from mimm_med.engines import MIMMXObjective, MIMMXTrainer
from mimm_med.networks import MIMMXNet

WORLD_SIZE = 2
BATCH = 8
PARTS = {"y": 6, "a": 4, "b": 4}
IMAGE = (1, 4, 4)
# Equal to one process on the global batch: the MI estimates and what follows from them.
GLOBAL_KEYS = ("dependence/", "weight/", "critic_loss", "mi_scale")


def global_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    labels = {name: torch.randint(2, (BATCH,), generator=generator) for name in PARTS}
    image = torch.randn(BATCH, *IMAGE, generator=generator) + labels["y"].view(-1, 1, 1, 1)
    return {"image": image, **labels}


def build_trainer(batch: dict[str, torch.Tensor], distributed: bool) -> MIMMXTrainer:
    """MIMM-X on a BatchNorm-free network (BatchNorm statistics are per rank; SyncBatchNorm needs a GPU).

    λ = 100 makes the MI gradient larger than the task gradient, so its clipping (α < 1) is exercised.
    SGD rather than Adam: Adam's first step is about ``lr·sign(g)``, which turns rounding-level
    differences of near-zero gradients into differences of ``lr``.
    """
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(IMAGE), 16), nn.ReLU())
    net = MIMMXNet(backbone, PARTS, dict.fromkeys(PARTS, 2), backbone_dim=16)
    objective = MIMMXObjective.for_network("mimmx", net, mi_weight=100.0, estimator_options={"hidden_dim": 32})
    network = nn.parallel.DistributedDataParallel(net) if distributed else net
    return MIMMXTrainer(
        "cpu",
        1,
        [batch],
        network,
        torch.optim.SGD(network.parameters(), lr=0.1),
        objective,
        torch.optim.SGD(objective.critic_parameters(), lr=1.0),
        torch.optim.SGD(objective.gradnorm.parameters(), lr=0.1),
        n_critic=3,
    )


def train_one_iteration(batch: dict[str, torch.Tensor], distributed: bool) -> dict:
    trainer = build_trainer(batch, distributed)
    trainer.run()
    core = getattr(trainer.network, "module", trainer.network)
    return {"output": dict(trainer.state.output), "network": {k: v.clone() for k, v in core.state_dict().items()}}


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        half = BATCH // WORLD_SIZE
        batch = {key: value[rank * half : (rank + 1) * half] for key, value in global_batch().items()}
        torch.save(train_one_iteration(batch, distributed=True), Path(out_dir) / f"rank{rank}.pt")
    finally:
        leave_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ranks")
    spawn_gloo_ranks(run_rank, out_dir, WORLD_SIZE)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def test_ranks_report_the_single_process_mi_estimates_of_the_global_batch(rank_results):
    single = train_one_iteration(global_batch(), distributed=False)["output"]
    global_keys = [key for key in single if key.startswith(GLOBAL_KEYS)]
    assert {"dependence/a", "dependence/b", "weight/a", "mi_scale", "critic_loss"} <= set(global_keys)
    assert single["mi_scale"] < 1
    for rank, result in enumerate(rank_results):
        for key in global_keys:
            assert result["output"][key] == pytest.approx(single[key], rel=1e-4, abs=1e-7), (rank, key)


def test_ranks_take_the_single_process_step_and_keep_equal_task_weights(rank_results):
    # DDP averages the per-rank gradients of task loss + α·MI into the global batch's; α is the global one.
    single = train_one_iteration(global_batch(), distributed=False)["network"]
    for result in rank_results:
        for name, value in single.items():
            torch.testing.assert_close(result["network"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    weights = [{k: v for k, v in result["output"].items() if k.startswith("task_weight/")} for result in rank_results]
    assert weights[0] and weights[0] == pytest.approx(weights[1], abs=1e-7)


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}"]
EPOCHS = 2


def test_bundle_trains_on_two_gloo_ranks_and_rank_zero_alone_tracks(brain_splits, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    root = tmp_path / "bundle"
    command = training_command(["train.json", "multi_gpu_train.json"], brain_splits, root, EPOCHS, TORCHRUN)
    # with the refit: its features are computed over refit_shard on each rank and gathered in validation
    command += ["--invariant_head", "true", "--run_name", RUN_NAME]
    result = subprocess.run(command, cwd=REPO, env=run_env(uri), capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]

    # train_shard: each rank loads and caches its half of the (padded) training set, trained in whole batches
    shard = math.ceil(len(pd.read_csv(brain_splits / "train.csv")) / WORLD_SIZE)
    iterations = shard // BATCH_SIZE
    assert iterations >= 2
    # CacheDataset's progress bars: every rank caches its shard, none the whole training set (and each the validation set)
    # (tqdm may print a finished bar twice, in a log that is not a terminal, when the machine is loaded)
    cached = Counter(int(n) for n in re.findall(r"Loading dataset: 100%\|\S+\| (\d+)/\1 ", log))
    validation = len(pd.read_csv(brain_splits / "val.csv"))
    assert set(cached) == {shard, validation} and min(cached.values()) >= WORLD_SIZE, cached
    assert log.count(f"Epoch: 1/{EPOCHS}, Iter: 1/{iterations} --") == 1  # rank 0's StatsHandler only
    (run,) = bundle_runs(uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == str(WORLD_SIZE) and run.data.params["invariant_head"] == "True"
    assert run.data.params["epoch_length"] == str(iterations)
    assert metric_steps(uri, run.info.run_id, "train/dependence/sex") == list(range(1, EPOCHS + 1))
    assert metric_steps(uri, run.info.run_id, "val_bacc") == list(range(1, EPOCHS + 1))
    assert metric_steps(uri, run.info.run_id, "loss") == list(range(1, EPOCHS * iterations + 1))
    (version,) = MlflowClient(uri).search_model_versions("name = 'mimmx_brain'")
    assert version.run_id == run.info.run_id
    saved = [f"checkpoint_checkpoint_epoch={epoch}.pt" for epoch in range(1, EPOCHS + 1)]  # n_saved = 2
    assert [path.name for path in checkpoint_files(root)] == saved
    assert (checkpoint_dir(root) / "model.pt").is_file()
