"""The configuration of a bundle run: its config files and its network as built, logged under their own paths."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from torch import nn

from .handler_run import CompletionLogger

if TYPE_CHECKING:
    from monai.handlers import MLFlowHandler

__all__ = ["NETWORK_FILE", "ConfigArtifacts", "network_summary"]

#: Artifact, under the configs folder, holding the network's full definition (its ``repr``).
NETWORK_FILE = "network.txt"


def network_summary(network: nn.Module, artifact_path: str = "configs") -> str:
    """One line naming ``network``'s class, its direct submodules and its parameter count, for an MLflow param.

    MLflow cuts a param at 6,000 characters, less than the ``repr`` of a ResNet-50 or a DenseNet-121;
    :class:`ConfigArtifacts` logs that ``repr`` in full, and the line says where.

    Examples
    --------
    >>> network_summary(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
    'Sequential(0: Linear, 1: ReLU), 9 parameters; definition in configs/network.txt'
    """
    children = ", ".join(f"{name}: {type(child).__name__}" for name, child in network.named_children())
    parameters = sum(p.numel() for p in network.parameters())
    return (
        f"{type(network).__name__}({children}), {parameters:,} parameters; "
        f"definition in {PurePosixPath(artifact_path, NETWORK_FILE)}"
    )


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
    network
        The network as built, whose ``repr`` is logged as ``<artifact_path>/network.txt``: command-line
        overrides of its definition appear in no config file.
    """

    def __init__(
        self,
        mlflow_handler: MLFlowHandler | None,
        files: Sequence[str | Path],
        artifact_path: str = "configs",
        network: nn.Module | None = None,
    ) -> None:
        super().__init__(mlflow_handler)
        self.files = [Path(f) for f in files]
        self.artifact_path = artifact_path
        self.network = network

    def log(self) -> None:
        run_id = self.run.run_id
        for file in self.files:
            folder = PurePosixPath(self.artifact_path, *file.parent.parts) if not file.is_absolute() else PurePosixPath(self.artifact_path)
            self.run.client.log_artifact(run_id, str(file), str(folder))
        if self.network is not None:
            self.run.client.log_text(run_id, repr(self.network), str(PurePosixPath(self.artifact_path, NETWORK_FILE)))
