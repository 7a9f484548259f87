"""RankLoaderSeeds under two gloo ranks: the ranks augment differently, and alike when rerun or resumed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from gloo_ranks import leave_process_group, spawn_gloo_ranks
from ignite.engine import Engine
from monai.data import DataLoader, Dataset, DistributedSampler
from monai.transforms import RandGaussianNoised
from monai.utils import set_determinism

from mimm_med.engines import RankLoaderSeeds

WORLD_SIZE, EPOCHS, IMAGES = 2, 2, 8


def _epoch_draws(num_workers: int, resume_after: int = 0) -> list[list[float]]:
    """Per epoch, the mean noise of each (all-zero) image this rank draws over :data:`EPOCHS` epochs.

    With ``resume_after``, a fresh loader and engine take over after that epoch with torch's global
    generator state at the stop, loaded after the loader is built, as a run resumed from its checkpoint
    (``RandomStates``) does.
    """
    set_determinism(0)
    draws: dict[int, list[float]] = {}

    def run(epochs_done: int, max_epochs: int, rng_state: torch.Tensor | None = None) -> None:
        records = [{"image": np.zeros((1, 4), np.float32)} for _ in range(IMAGES)]
        dataset = Dataset(records, RandGaussianNoised(keys="image", prob=1.0))
        loader = DataLoader(dataset, batch_size=2, sampler=DistributedSampler(dataset, shuffle=False), num_workers=num_workers)
        engine = Engine(lambda e, batch: draws.setdefault(e.state.epoch, []).extend(batch["image"].mean(dim=(1, 2)).tolist()))
        RankLoaderSeeds(loader).attach(engine)
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        engine.load_state_dict({"epoch": epochs_done, "max_epochs": max_epochs, "epoch_length": len(loader)})
        engine.run(loader)

    if not resume_after:
        run(0, EPOCHS)
    else:
        run(0, resume_after)
        state = torch.get_rng_state()
        set_determinism(1)  # a new process: other generator states until the checkpoint's are loaded
        run(resume_after, EPOCHS, state)
    return [draws[epoch] for epoch in sorted(draws)]


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    try:
        results = {
            "in_process": _epoch_draws(0),
            "workers": _epoch_draws(1),
            "rerun": _epoch_draws(0),
            "resumed": _epoch_draws(0, resume_after=1),
        }
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        leave_process_group()


def test_ranks_augment_differently_and_reproducibly(tmp_path):
    spawn_gloo_ranks(run_rank, tmp_path, WORLD_SIZE)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    for loading in ("in_process", "workers"):
        for epoch in range(EPOCHS):
            # without the handler both ranks drew the same noise at every position of every epoch
            assert not np.allclose(ranks[0][loading][epoch], ranks[1][loading][epoch]), (loading, epoch)
        assert not np.allclose(*ranks[0][loading])  # and each epoch draws anew
    for rank in ranks:
        assert rank["rerun"] == rank["in_process"]
        assert rank["resumed"] == rank["in_process"]
