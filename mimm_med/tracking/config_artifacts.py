"""The configuration files of a bundle run, logged under their own paths."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from .handler_run import CompletionLogger

if TYPE_CHECKING:
    from monai.handlers import MLFlowHandler

__all__ = ["ConfigArtifacts"]


class ConfigArtifacts(CompletionLogger):
    """Log config files into the run of an ``MLFlowHandler`` at ``COMPLETED``, each under ``<artifact_path>/<its folder>``.

    MONAI's ``MLFlowHandler(artifacts=...)`` logs every file at the root of the run's artifacts, so
    a bundle's ``configs/train.json`` and the shared ``bundles/common/configs/train.json`` overwrite
    each other there and one of them is lost.

    Parameters
    ----------
    mlflow_handler
        The ``monai.handlers.MLFlowHandler`` attached to the same engine (``None`` off rank 0).
    files
        Config files, relative to the working folder (the repository root for the bundles).
    artifact_path
        Folder of the run's artifacts that holds them.
    """

    def __init__(self, mlflow_handler: MLFlowHandler | None, files: Sequence[str | Path], artifact_path: str = "configs") -> None:
        super().__init__(mlflow_handler)
        self.files = [Path(f) for f in files]
        self.artifact_path = artifact_path

    def log(self) -> None:
        run_id = self.run.run_id
        for file in self.files:
            folder = PurePosixPath(self.artifact_path, *file.parent.parts) if not file.is_absolute() else PurePosixPath(self.artifact_path)
            self.run.client.log_artifact(run_id, str(file), str(folder))
