"""Resume a training run from the newest checkpoint in its folder, if there is one."""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver

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

    The best-model saver (``save_key_metric=True``) keeps its ranking only in memory; saved with
    ``key_metric_save_state=True`` the ranking travels in its file, and handing that saver here
    restores it, so the first validation after a resume replaces the best model only when it beats
    the best before the kill.

    Parameters
    ----------
    directory
        Where ``CheckpointSaver`` writes the run's checkpoints.
    load_dict
        Objects to restore, e.g. ``trainer.checkpoint_items()``.
    pattern
        Glob of the resumable checkpoints in ``directory``.
    best_model_saver
        The run's best-model ``CheckpointSaver`` (``key_metric_save_state=True``), or None.
    best_model_file
        Its ``key_metric_filename`` in ``directory``.
    """

    def __init__(
        self,
        directory: str | Path,
        load_dict: Mapping[str, Any],
        pattern: str = "checkpoint_*.pt",
        best_model_saver: CheckpointSaver | None = None,
        best_model_file: str = "model.pt",
    ) -> None:
        self.directory = Path(directory)
        self.load_dict = dict(load_dict)
        self.pattern = pattern
        self.best_model_saver = best_model_saver
        self.best_model_file = best_model_file

    def attach(self, engine: Engine) -> None:
        """Load on ``STARTED``; list this handler first so later ``STARTED`` handlers see the restored state."""
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        path = latest_checkpoint(self.directory, self.pattern)
        if path is None:
            return
        CheckpointLoader(load_path=str(path), load_dict=self.load_dict, map_location=str(engine.state.device))(engine)
        logger.info("resumed from %s at epoch %d", path, engine.state.epoch)
        self._restore_best_model_ranking()

    def _restore_best_model_ranking(self) -> None:
        best = self.directory / self.best_model_file
        if self.best_model_saver is None or not _is_complete_archive(best):
            return
        state = torch.load(best, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "checkpointer" not in state:
            logger.warning("%s holds no ranking (saved without key_metric_save_state); the next validation replaces it", best)
            return
        self.best_model_saver.load_state_dict(state["checkpointer"])
        logger.info("restored the ranking of the best model %s: %s", best, dict(state["checkpointer"]))
