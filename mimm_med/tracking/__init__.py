"""MLflow tracking and registry for mimm-med runs.

MONAI's ``monai.handlers.MLFlowHandler`` logs parameters and metrics; this package adds what it
lacks: epoch means of the MIMM-X training terms (:class:`EpochAverages`), training figures
(:class:`TrainingPlots`), model registration (:class:`ModelRegistration`, served by MLflow's pyfunc
through :mod:`~mimm_med.tracking.served_outputs`), the store location
(:func:`resolve_tracking_uri`) and registry helpers. See ``mimm_med/tracking/README.md``.
"""

from .config_artifacts import ConfigArtifacts, network_summary
from .epoch_averages import EpochAverages
from .model_registration import ModelRegistration, default_pip_requirements, require_registered_settings
from .registry import list_versions, load_registered_network, pinned_model_uri, promote, registry_client, version_runs
from .training_plots import TrainingPlots
from .training_run import ended_status, run_tracked
from .uri import (
    TrackingServerUnreachable,
    default_artifact_location,
    printable_uri,
    require_reachable,
    resolve_tracking_uri,
)

__all__ = [
    "ConfigArtifacts",
    "EpochAverages",
    "ModelRegistration",
    "TrackingServerUnreachable",
    "TrainingPlots",
    "default_artifact_location",
    "default_pip_requirements",
    "ended_status",
    "list_versions",
    "network_summary",
    "printable_uri",
    "load_registered_network",
    "pinned_model_uri",
    "promote",
    "registry_client",
    "require_reachable",
    "require_registered_settings",
    "resolve_tracking_uri",
    "run_tracked",
    "version_runs",
]
