"""Figures of a finished training run, saved to disk and logged to its MLflow run."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import logging

import torch

from mimm_med.evaluation import collect_outputs, plot_training_curves, plot_tsne

from .epoch_averages import EpochAverages
from .handler_run import CompletionLogger

if TYPE_CHECKING:
    from monai.handlers import MLFlowHandler

__all__ = ["TrainingPlots"]

logger = logging.getLogger(__name__)


class TrainingPlots(CompletionLogger):
    """At ``COMPLETED``, draw the training curves and a t-SNE of ``f_y`` and log them to MLflow.

    Writes to ``output_dir``, on rank 0 only:

    - ``training_curves.png``: the epoch means of :class:`EpochAverages` (losses, MI estimates
      ``dependence/*``, confounder weights ``weight/*``, task weights ``task_weight/*``,
      ``mi_scale``), one panel per prefix;
    - ``tsne_<primary>_features.png``: t-SNE of the primary features on ``data_loader``, one panel
      per factor it is coloured by (skipped without a ``data_loader``).

    Both go to the artifact folder ``artifact_path`` of the run of ``mlflow_handler``. Config files
    are not this handler's job: give them to ``MLFlowHandler(artifacts=...)``.

    Parameters
    ----------
    mlflow_handler
        MONAI's ``MLFlowHandler`` of the same trainer; its run receives the figures. ``None`` where
        it is disabled, on ranks other than 0.
    epoch_averages
        The :class:`EpochAverages` attached to the same trainer.
    network
        The trained :class:`~mimm_med.networks.MIMMXNet` (may be wrapped in DDP).
    output_dir
        Folder for the PNGs.
    data_loader
        Batches with ``"image"`` and every factor label, e.g. the validation loader.
    factor_names
        Factors to colour the t-SNE by; default every part of the network.
    artifact_path
        Folder of the figures among the run's artifacts.
    max_points
        At most this many samples in the t-SNE.
    seed
        Seed of the t-SNE and its subsample.

    Examples
    --------
    An engine with epoch means to plot, logging to an MLflow store in memory:

    >>> import tempfile
    >>> from ignite.engine import Engine
    >>> from monai.data import DataLoader
    >>> from monai.handlers import MLFlowHandler
    >>> from mimm_med.networks import MIMMXNet
    >>> folder = tempfile.mkdtemp()
    >>> net = MIMMXNet(torch.nn.Flatten(), {"y": 4, "z": 4}, {"y": 2, "z": 2}, backbone_dim=8)
    >>> records = [{"image": torch.rand(8), "y": i % 2, "z": i % 3 % 2} for i in range(30)]
    >>> val_loader = DataLoader(records, batch_size=10)
    >>> trainer = Engine(lambda engine, batch: {"loss": 1.0 / engine.state.epoch})
    >>> mlflow_handler = MLFlowHandler(
    ...     "sqlite:///:memory:", iteration_log=False, experiment_name="plots", artifact_location=folder
    ... )
    >>> mlflow_handler.attach(trainer)
    >>> averages = EpochAverages()
    >>> averages.attach(trainer)
    >>> TrainingPlots(mlflow_handler, averages, net, folder, val_loader).attach(trainer)
    >>> _ = trainer.run([0], max_epochs=3)
    >>> run_id = mlflow_handler.cur_run.info.run_id
    >>> [artifact.path for artifact in mlflow_handler.client.list_artifacts(run_id, "plots")]
    ['plots/training_curves.png', 'plots/tsne_y_features.png']
    """

    def __init__(
        self,
        mlflow_handler: MLFlowHandler | None,
        epoch_averages: EpochAverages,
        network: torch.nn.Module,
        output_dir: str | Path,
        data_loader: Iterable | None = None,
        factor_names: Sequence[str] | None = None,
        artifact_path: str = "plots",
        max_points: int = 2000,
        seed: int = 0,
    ) -> None:
        super().__init__(mlflow_handler)
        self.epoch_averages = epoch_averages
        self.network = network
        self.output_dir = Path(output_dir)
        self.data_loader = data_loader
        self.factor_names = factor_names
        self.artifact_path = artifact_path
        self.max_points = max_points
        self.seed = seed

    def log(self) -> None:
        """Plot and log the figures."""
        run_id = self.run.run_id  # fails before the costly t-SNE when there is no run to log to
        for figure in self.draw():
            self.run.client.log_artifact(run_id, str(figure), self.artifact_path)

    def draw(self) -> list[Path]:
        """Write the figures and return their paths."""
        figures = []
        if self.epoch_averages.history:
            history = pd.DataFrame(self.epoch_averages.history).set_index("epoch")
            figures.append(plot_training_curves(history, self.output_dir / "training_curves.png"))
        if self.data_loader is not None:
            try:
                figures.append(self._tsne())
            except ValueError as error:  # e.g. a validation set too small for t-SNE: the run itself is fine
                logger.warning("t-SNE of the primary features skipped: %s", error)
        return figures

    def _tsne(self) -> Path:
        # Forward the bare module: DDP's forward would wait for the other ranks, which do not plot.
        network = getattr(self.network, "module", self.network)
        factor_names = list(self.factor_names or network.part_names)
        device = next(network.parameters()).device
        outputs = collect_outputs(network, self.data_loader, factor_names, device)
        key = f"{network.primary}_features"
        labels = {name: outputs[f"{name}_label"] for name in factor_names}
        return plot_tsne(outputs[key], labels, self.output_dir / f"tsne_{key}.png", self.seed, self.max_points)
