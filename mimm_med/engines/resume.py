"""Resume a training run from the newest checkpoint in its folder, if there is one."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

logger = logging.getLogger(__name__)


def latest_checkpoint(directory: str | Path, pattern: str = "*.pt") -> Path | None:
    """The most recently written complete file matching ``pattern`` in ``directory``, or ``None``.

    MONAI's ``CheckpointSaver`` writes in place (ignite's ``Checkpoint`` first removes the oldest of its
    ``n_saved`` files), so a run killed while saving leaves a truncated newest file: such files
    (``torch.save`` archives without their closing zip directory) are skipped with a warning. Save
    with ``n_saved=2`` so that a complete checkpoint is left in that case.
    """
    candidates = sorted(Path(directory).glob(pattern), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    for path in candidates:
        if _is_complete_archive(path):
            return path
        logger.warning("skipping %s: not a complete checkpoint (the run was probably stopped while saving it)", path)
    return None


def _is_complete_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path):  # reads the directory at the end of the file, which is written last
            return True
    except (zipfile.BadZipFile, OSError):
        return False


class ResumeFromLatest:
    """On ``STARTED``, load the newest checkpoint of ``directory`` into ``load_dict`` with MONAI's CheckpointLoader.

    A run killed mid-epoch restarts at the start of the epoch after its last checkpoint, with network,
    critics, optimizers, scaler, epoch counter and weighting state as saved; one killed while saving
    restarts from the checkpoint before (see :func:`latest_checkpoint`). Nothing happens when the
    folder holds no checkpoint yet (a fresh run).

    Parameters
    ----------
    directory
        Where ``CheckpointSaver`` writes the run's checkpoints.
    load_dict
        Objects to restore, e.g. ``trainer.checkpoint_items()``.
    pattern
        Glob of the resumable checkpoints in ``directory``.
    """

    def __init__(self, directory: str | Path, load_dict: Mapping[str, Any], pattern: str = "checkpoint_*.pt") -> None:
        self.directory = Path(directory)
        self.load_dict = dict(load_dict)
        self.pattern = pattern

    def attach(self, engine: Engine) -> None:
        """Load on ``STARTED``; list this handler first so later ``STARTED`` handlers see the restored state."""
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        path = latest_checkpoint(self.directory, self.pattern)
        if path is None:
            return
        CheckpointLoader(load_path=str(path), load_dict=self.load_dict, map_location=str(engine.state.device))(engine)
        logger.info("resumed from %s at epoch %d", path, engine.state.epoch)
