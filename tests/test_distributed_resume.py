"""A resumed DDP run: every rank resumes from the checkpoint rank 0 chose, whatever its own listing shows."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist
from gloo_ranks import leave_process_group, spawn_gloo_ranks
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver

import mimm_med.engines.resume as resume_module
from mimm_med.engines import ResumeFromLatest

WORLD_SIZE = 2
EPOCHS = 4


def counting_trainer() -> Engine:
    """A trainer of ``EPOCHS`` one-iteration epochs."""
    trainer = Engine(lambda engine, batch: None)
    trainer.state.max_epochs, trainer.state.device = EPOCHS, "cpu"  # as MONAI's workflows set them
    return trainer


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        folder = Path(out_dir) / "run"
        if rank == 1:
            # a stale listing of the shared folder (another node's cache): it shows epoch 1 as the newest
            resume_module.latest_checkpoint = lambda directory, pattern: folder / "checkpoint_trainer_epoch=1.pt"
        trainer = counting_trainer()
        resume = ResumeFromLatest(folder, {"trainer": trainer})
        resume.attach(trainer)
        started = {}
        trainer.add_event_handler(Events.STARTED, lambda engine: started.update(epoch=engine.state.epoch))
        trainer.run([0], max_epochs=EPOCHS)
        found = {"checkpoint": resume.checkpoint.name, "resumed_at": started["epoch"], "iterations": trainer.state.iteration}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(found))
    finally:
        leave_process_group()


def test_every_rank_resumes_from_the_checkpoint_rank_zero_chose(tmp_path):
    folder = tmp_path / "run"
    trainer = counting_trainer()
    CheckpointSaver(str(folder), {"trainer": trainer}, save_interval=1, epoch_level=True, n_saved=2, file_prefix="checkpoint").attach(trainer)
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda engine: engine.terminate())  # killed after epoch 2
    trainer.run([0], max_epochs=EPOCHS)
    assert sorted(path.name for path in folder.glob("checkpoint_*.pt")) == ["checkpoint_trainer_epoch=1.pt", "checkpoint_trainer_epoch=2.pt"]

    spawn_gloo_ranks(run_rank, tmp_path, WORLD_SIZE)
    for rank in range(WORLD_SIZE):
        found = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert found == {"checkpoint": "checkpoint_trainer_epoch=2.pt", "resumed_at": 2, "iterations": EPOCHS}, rank
