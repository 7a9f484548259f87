"""A two-rank bundle run resumed after its first epoch ends with the weights of the same run uninterrupted."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import torch
from bundle_runs import REPO, checkpoint_dir, run_env, training_command

from mimm_med.engines.resume import SETTINGS_FILE

WORLD_SIZE = 2
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}"]
EPOCHS = 2
FIRST_CHECKPOINT = "checkpoint_checkpoint_epoch=1.pt"


def train(splits: Path, bundle_root: Path, tracking_uri: str) -> str:
    """Train the brain bundle on two gloo ranks into ``bundle_root``; its log."""
    command = training_command(["train.json", "multi_gpu_train.json"], splits, bundle_root, EPOCHS, TORCHRUN)
    result = subprocess.run(command, cwd=REPO, env=run_env(tracking_uri), capture_output=True, encoding="utf-8", errors="replace", timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    return log


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def differing(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> list[str]:
    """The names whose tensors are not bit-identical in ``found`` and ``expected``."""
    assert found.keys() == expected.keys()
    return [name for name, value in expected.items() if not torch.equal(found[name], value)]


def test_a_run_resumed_on_every_rank_from_rank_zeros_checkpoint_ends_as_the_uninterrupted_one(brain_splits, tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    train(brain_splits, uninterrupted, f"sqlite:///{tmp_path / 'uninterrupted.db'}")

    # what a run killed in its second epoch leaves (tests/test_resume.py kills one): the first checkpoint, the settings
    resumed = tmp_path / "resumed"
    checkpoint_dir(resumed).mkdir(parents=True)
    for name in (FIRST_CHECKPOINT, SETTINGS_FILE):
        shutil.copy2(checkpoint_dir(uninterrupted) / name, checkpoint_dir(resumed) / name)
    log = train(brain_splits, resumed, f"sqlite:///{tmp_path / 'resumed.db'}")
    assert log.count(f"resumed from {checkpoint_dir(resumed) / FIRST_CHECKPOINT} at epoch 1") == WORLD_SIZE

    # Only rank 0 saves, so every rank state must be rank 0's: GradNorm's first losses, recorded per
    # rank on its own shard, made rank 1 go on with rank 0's and the weights diverge.
    final = f"checkpoint_checkpoint_epoch={EPOCHS}.pt"
    expected, found = (load(checkpoint_dir(root) / final) for root in (uninterrupted, resumed))
    for item in ("network", "objective"):
        different = differing(expected[item], found[item])
        assert not different, f"the resumed run ends with another {item} than the uninterrupted one: {different}"
