"""Log the best network of a training run as an MLflow model and register it."""

from __future__ import annotations

import ast
import copy
import logging
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import infer_signature

from mimm_med.engines.resume import refuse_other_settings

from .handler_run import CompletionLogger
from .registry import registry_client
from .served_outputs import OUTPUT_COLUMNS, ConcatenatedOutputs, output_columns
from .uri import using_tracking_uri

if TYPE_CHECKING:
    from monai.handlers import MLFlowHandler

__all__ = [
    "REGISTERED_SETTINGS",
    "ModelRegistration",
    "default_pip_requirements",
    "network_code_paths",
    "require_registered_settings",
]

logger = logging.getLogger(__name__)

#: Size of the example batch: ``torch.export`` fixes dimensions of size 1, so a batch of 1 would
#: fix the batch size of the logged model.
EXAMPLE_BATCH = 2
#: The settings that a registered network's use depends on: it comes with its own definition, but
#: which output is the task, what its classes are and what size its images must be are settings.
REGISTERED_SETTINGS = ("label_levels", "primary", "spatial_size")


def default_pip_requirements(serialization_format: str = "pt2") -> list[str]:
    """What loading a network logged in ``serialization_format`` needs, pinned to the installed versions (local tags dropped).

    A ``torch.export`` program (``"pt2"``) holds torch operators only: ``torch``. A pickle holds
    MONAI's and mimm-med's classes: ``torch`` and ``monai``, with mimm-med's code logged beside the
    model (:func:`network_code_paths`), since mimm-med is not on PyPI for ``mlflow models serve`` to install.
    """
    names = ("torch",) if serialization_format == "pt2" else ("torch", "monai")
    return [f"{name}=={version(name).split('+')[0]}" for name in names]


def network_code_paths(serialization_format: str = "pt2") -> list[str] | None:
    """The code a network logged in ``serialization_format`` needs beside it: the ``mimm_med`` package for a pickle."""
    return None if serialization_format == "pt2" else [str(Path(__file__).resolve().parents[1])]


def require_registered_settings(model_uri: str, current: Mapping[str, Any], tracking_uri: str | None = None) -> None:
    """Refuse ``current`` settings that differ in :data:`REGISTERED_SETTINGS` from those of the run that logged ``model_uri``.

    The run's MLflow params (what :class:`ModelRegistration`'s training logged, each as the ``str``
    of its value) are read back as Python literals and compared by
    :func:`mimm_med.engines.resume.refuse_other_settings`. A model logged outside a run is not checked.

    Raises
    ------
    mimm_med.engines.resume.SettingsMismatch
        Naming each differing setting, both values and the overrides that match the training.
    """
    client = registry_client(tracking_uri)
    with using_tracking_uri(client.tracking_uri):
        run_id = mlflow.models.get_model_info(model_uri).run_id
    if run_id is None:
        return
    params = client.get_run(run_id).data.params
    trained = {key: _literal(params[key]) for key in REGISTERED_SETTINGS if key in params}
    refuse_other_settings(current, trained, f"the params of MLflow run {run_id}, which logged {model_uri}", REGISTERED_SETTINGS)


def _literal(text: str) -> Any:
    """The value whose ``str`` MLflow stored; a string is stored bare, so what is no literal is that string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


class ModelRegistration(CompletionLogger):
    """At ``COMPLETED``, log the best network to the MLflow run, register it and mark it ``candidate``.

    The weights come from ``best_checkpoint`` (a file of MONAI's ``CheckpointSaver``, e.g. with
    ``save_key_metric=True, key_metric_filename="model.pt"``; its ``"network"`` entry) or, when no
    such file exists, from ``network`` as it is at the end of training, i.e. the final checkpoint.
    The model is logged with ``mlflow.pytorch.log_model`` (``torch.export`` format by default, so
    loading it needs neither pickle nor this package; a pickle brings this package's code along), a
    signature inferred from a zero batch of ``input_shape`` and :func:`default_pip_requirements`.
    The logged module returns the network's outputs side by side in one array, as MLflow's pyfunc
    and ``mlflow models serve`` require (:class:`~mimm_med.tracking.served_outputs.ConcatenatedOutputs`;
    the columns of each output are in the model's metadata, and
    :func:`~mimm_med.tracking.load_registered_network` gives the dict back);
    it is then registered as a new version of ``model_name`` and given the alias ``alias``.
    On ranks other than 0 it does nothing.

    Parameters
    ----------
    mlflow_handler
        MONAI's ``MLFlowHandler`` of the same trainer; the model is logged to its run. ``None`` where
        it is disabled, on ranks other than 0.
    network
        The trained network (may be wrapped in DDP); a copy on the CPU receives the checkpoint.
    model_name
        Registered model name, e.g. the bundle's name.
    input_shape
        Shape of one input image ``(channels, *spatial)``, without the batch dimension.
    best_checkpoint
        File written by ``CheckpointSaver`` whose ``"network"`` entry holds the best weights.
    alias
        Alias set on the new version.
    artifact_path
        Name of the logged model.
    serialization_format
        ``"pt2"`` (``torch.export``) or ``"pickle"`` (for a network that ``torch.export`` rejects).

    Attributes
    ----------
    registered_version
        The new :class:`mlflow.entities.model_registry.ModelVersion` after ``COMPLETED``.

    Examples
    --------
    A trainer that logs to an MLflow store in memory (a project's lives in ``mlruns/mlflow.db``, see
    :func:`~mimm_med.tracking.resolve_tracking_uri`), with the best weights in ``model.pt``:

    >>> import tempfile
    >>> from pathlib import Path
    >>> from ignite.engine import Engine
    >>> from monai.handlers import MLFlowHandler
    >>> from mimm_med.networks import MIMMXNet
    >>> folder = Path(tempfile.mkdtemp())
    >>> net = MIMMXNet(torch.nn.Flatten(), {"age_group": 4, "sex": 4}, {"age_group": 2, "sex": 2}, backbone_dim=8)
    >>> torch.save({"network": net.state_dict()}, folder / "model.pt")
    >>> trainer = Engine(lambda engine, batch: None)
    >>> mlflow_handler = MLFlowHandler(
    ...     "sqlite:///:memory:", iteration_log=False, experiment_name="registration", artifact_location=str(folder)
    ... )
    >>> mlflow_handler.attach(trainer)
    >>> registration = ModelRegistration(mlflow_handler, net, "mimmx_demo", (8,), folder / "model.pt")
    >>> registration.attach(trainer)
    >>> _ = trainer.run([0])
    >>> registration.registered_version.name, registration.registered_version.aliases
    ('mimmx_demo', ['candidate'])
    """

    def __init__(
        self,
        mlflow_handler: MLFlowHandler | None,
        network: torch.nn.Module,
        model_name: str,
        input_shape: Sequence[int],
        best_checkpoint: str | Path | None = None,
        alias: str = "candidate",
        artifact_path: str = "model",
        serialization_format: str = "pt2",
    ) -> None:
        super().__init__(mlflow_handler)
        self.network = network
        self.model_name = model_name
        self.input_shape = tuple(int(size) for size in input_shape)
        self.best_checkpoint = Path(best_checkpoint) if best_checkpoint is not None else None
        self.alias = alias
        self.artifact_path = artifact_path
        self.serialization_format = serialization_format
        self.registered_version: ModelVersion | None = None

    def log(self) -> None:
        """Log and register the best weights; attach this handler after the ``CheckpointSaver``."""
        network, source = self.trained_network()
        self.registered_version = self.register(network, source)

    def trained_network(self) -> tuple[torch.nn.Module, str]:
        """A CPU copy of the network in eval mode with the best weights, and where they came from."""
        network = copy.deepcopy(getattr(self.network, "module", self.network)).cpu().eval()
        if self.best_checkpoint is None or not self.best_checkpoint.is_file():
            logger.warning("no best checkpoint at %s; registering the weights at the end of training",
                           self.best_checkpoint)
            return network, "end of training"
        checkpoint = torch.load(self.best_checkpoint, map_location="cpu", weights_only=True)
        # ignite stores a one-entry save_dict as the bare state dict
        network.load_state_dict(checkpoint.get("network", checkpoint))
        return network, str(self.best_checkpoint)

    def register(self, network: torch.nn.Module, source: str) -> ModelVersion:
        """Log ``network`` to the run, register it under :attr:`model_name` and set :attr:`alias`.

        A run that already has a version of :attr:`model_name` keeps it and only gets :attr:`alias`:
        a run killed after registering but before it was marked finished is resumed and completes
        again, which would otherwise register the same weights as a second version.
        """
        client, run_id = self.run.client, self.run.run_id
        registered = client.search_model_versions(f"name = '{self.model_name}' and run_id = '{run_id}'")
        if registered:
            model_version = str(min(int(version.version) for version in registered))
            client.set_registered_model_alias(self.model_name, self.alias, model_version)
            logger.info("run %s already registered %s version %s; set @%s", run_id, self.model_name, model_version, self.alias)
            return client.get_model_version(self.model_name, model_version)
        example = torch.zeros(EXAMPLE_BATCH, *self.input_shape)
        with torch.no_grad():
            columns = output_columns(network(example))
            served = ConcatenatedOutputs(network, list(columns)).eval()
            signature = infer_signature(example.numpy(), served(example).numpy())
        # Created here so the model lands in the run's experiment: log_model alone would take the
        # process's active experiment, which MONAI's handler never sets.
        logged = client.create_logged_model(
            client.get_run(run_id).info.experiment_id, name=self.artifact_path, source_run_id=run_id
        )
        with using_tracking_uri(self.run.tracking_uri):
            info = mlflow.pytorch.log_model(
                served,
                name=self.artifact_path,
                model_id=logged.model_id,
                run_id=run_id,
                signature=signature,
                input_example=example.numpy(),  # MLflow saves a NumPy example; a tensor it drops without a word
                pip_requirements=default_pip_requirements(self.serialization_format),
                code_paths=network_code_paths(self.serialization_format),
                serialization_format=self.serialization_format,
                registered_model_name=self.model_name,
                metadata={OUTPUT_COLUMNS: columns},
            )
        model_version = str(info.registered_model_version)
        client.set_model_version_tag(self.model_name, model_version, "weights", source)
        client.set_registered_model_alias(self.model_name, self.alias, model_version)
        logger.info("registered %s version %s (%s) as @%s", self.model_name, model_version, source, self.alias)
        return client.get_model_version(self.model_name, model_version)
