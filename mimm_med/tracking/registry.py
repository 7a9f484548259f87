"""Model registry helpers: list versions, move aliases, load a registered network."""

from __future__ import annotations

import contextlib
import re
import sqlite3
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from sqlalchemy.engine import make_url

from .run_names import filter_prefix
from .served_outputs import OUTPUT_COLUMNS, SplitOutputs
from .uri import printable_uri, require_reachable, resolve_tracking_uri, using_tracking_uri

__all__ = [
    "ExportedNetwork", "list_versions", "load_registered_network", "pinned_model_uri", "promote", "registry_client",
    "version_runs",
]  # fmt: skip

#: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (other forms go to MLflow unchecked).
MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


def registry_client(tracking_uri: str | None = None) -> MlflowClient:
    """Client of the registry at :func:`resolve_tracking_uri` ``(tracking_uri)``.

    A local SQLite store must exist already and be one: listing or promoting in an empty folder is a
    mistake, and MLflow would write its tables into any other SQLite file it is pointed at.
    A tracking server must answer (:func:`~mimm_med.tracking.uri.require_reachable`).
    """
    uri = resolve_tracking_uri(tracking_uri, create=False)
    require_reachable(uri)
    if uri.startswith("sqlite:"):
        database = make_url(uri).database
        if database and database != ":memory:":
            _require_mlflow_store(Path(database))
    return MlflowClient(tracking_uri=uri)


def _require_mlflow_store(database: Path) -> None:
    """Raise ``FileNotFoundError`` unless ``database`` is an SQLite file holding MLflow's tables; read only."""
    where = "run from the project folder, pass --tracking-uri or set MLFLOW_TRACKING_URI"
    if not database.is_file():
        raise FileNotFoundError(f"no MLflow store at {database}; {where}.")
    try:
        with contextlib.closing(sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as error:  # not SQLite at all, or damaged
        raise FileNotFoundError(f"{database} is not an MLflow store ({error}); {where}.") from None
    if not {"experiments", "registered_models"} <= tables:
        raise FileNotFoundError(f"{database} is an SQLite file but no MLflow store (it has no MLflow tables); {where}.")


def list_versions(name: str, tracking_uri: str | None = None) -> list[ModelVersion]:
    """Versions of the registered model ``name``, newest first, with their aliases and run ids.

    Raises
    ------
    LookupError
        No registered model ``name``; the message lists those that exist.
    """
    return _versions(registry_client(tracking_uri), name)


def version_runs(name: str, tracking_uri: str | None = None) -> list[tuple[ModelVersion, str]]:
    """:func:`list_versions` of ``name``, each with the name of the run it was registered from.

    The name is ``"-"`` for a version without a run, or whose run was deleted for good.
    """
    client = registry_client(tracking_uri)
    return [(version, _run_name(client, version.run_id)) for version in _versions(client, name)]


def promote(name: str, version: int | str, alias: str = "champion", tracking_uri: str | None = None) -> ModelVersion:
    """Point ``alias`` of the registered model ``name`` at ``version`` (moving it from any other).

    Raises
    ------
    LookupError
        No registered model ``name`` or no such version; the message lists what exists.

    Examples
    --------
    Three versions of a model in an MLflow store in memory (versions of a project's store come
    from :class:`~mimm_med.tracking.ModelRegistration`):

    >>> import tempfile
    >>> uri = "sqlite:///:memory:"
    >>> client = MlflowClient(uri)
    >>> _ = client.create_registered_model("promote_demo")
    >>> for _ in range(3):
    ...     _ = client.create_model_version("promote_demo", source=tempfile.mkdtemp())
    >>> promote("promote_demo", 3, tracking_uri=uri).aliases  # models:/promote_demo@champion is now version 3
    ['champion']
    >>> promote("promote_demo", 4, tracking_uri=uri)
    Traceback (most recent call last):
        ...
    LookupError: registered model 'promote_demo' has no version 4; its versions: ['3', '2', '1'].
    """
    client = registry_client(tracking_uri)
    _check_version(client, name, str(version))
    client.set_registered_model_alias(name, alias, str(version))
    return client.get_model_version(name, str(version))


def load_registered_network(model_uri: str, tracking_uri: str | None = None) -> torch.nn.Module:
    """Load a network logged by :class:`~mimm_med.tracking.ModelRegistration`.

    Parameters
    ----------
    model_uri
        ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model`` or any URI MLflow
        resolves.
    tracking_uri
        Tracking (and, unless ``MLFLOW_REGISTRY_URI`` says otherwise, registry) URI.

    Returns
    -------
    torch.nn.Module
        A module on the CPU in eval mode whose ``forward(image)`` returns the network's dict of
        tensors (:class:`~mimm_med.tracking.served_outputs.SplitOutputs` around the served module,
        an :class:`ExportedNetwork` for models logged in the ``torch.export`` format).

    Examples
    --------
    A network registered by a training that logged to an MLflow store in memory:

    >>> import tempfile
    >>> from ignite.engine import Engine
    >>> from monai.handlers import MLFlowHandler
    >>> from mimm_med.networks import MIMMXNet
    >>> from mimm_med.tracking import ModelRegistration
    >>> uri = "sqlite:///:memory:"
    >>> trainer = Engine(lambda engine, batch: None)
    >>> mlflow_handler = MLFlowHandler(
    ...     uri, iteration_log=False, experiment_name="loading", artifact_location=tempfile.mkdtemp()
    ... )
    >>> mlflow_handler.attach(trainer)
    >>> trained = MIMMXNet(torch.nn.Flatten(), {"age_group": 4, "sex": 4}, {"age_group": 2, "sex": 2}, backbone_dim=8)
    >>> ModelRegistration(mlflow_handler, trained, "loading_demo", input_shape=(8,)).attach(trainer)
    >>> _ = trainer.run([0])  # registers models:/loading_demo@candidate

    >>> net = load_registered_network("models:/loading_demo@candidate", tracking_uri=uri)
    >>> image = torch.zeros(1, 8)
    >>> net(image)["age_group_output"].shape
    torch.Size([1, 2])
    """
    client = registry_client(tracking_uri)
    match = MODELS_URI.match(model_uri)
    if match and match["alias"]:
        aliases = {alias for version in _versions(client, match["name"]) for alias in version.aliases}
        if match["alias"] not in aliases:
            raise LookupError(
                f"registered model {match['name']!r} has no alias {match['alias']!r}; it has {sorted(aliases)}."
            )
    elif match:
        _check_version(client, match["name"], match["version"])
    with using_tracking_uri(client.tracking_uri):
        model_dir = mlflow.artifacts.download_artifacts(model_uri)
    network = mlflow.pytorch.load_model(model_dir, map_location="cpu")
    try:
        network = network.eval()
    except NotImplementedError:  # raised by torch.export modules, whatever the mode
        network = ExportedNetwork(network)
    # Models registered before the outputs were served side by side return the dict themselves.
    columns = (Model.load(model_dir).metadata or {}).get(OUTPUT_COLUMNS)
    return SplitOutputs(network, columns).eval() if columns else network


def pinned_model_uri(model_uri: str, tracking_uri: str | None = None) -> str:
    """``model_uri`` with an alias replaced by the version it points at now: ``models:/NAME/VERSION``.

    What a table of predictions records as its model: an alias moves on (a promotion), a version
    names the same weights for good. Other URIs (``runs:/...``, a version already) are returned as given.

    Examples
    --------
    >>> import tempfile
    >>> uri = "sqlite:///:memory:"
    >>> client = MlflowClient(uri)
    >>> _ = client.create_registered_model("pinned_demo")
    >>> for _ in range(2):
    ...     _ = client.create_model_version("pinned_demo", source=tempfile.mkdtemp())
    >>> _ = promote("pinned_demo", 1, tracking_uri=uri)  # models:/pinned_demo@champion is version 1
    >>> pinned_model_uri("models:/pinned_demo@champion", tracking_uri=uri)
    'models:/pinned_demo/1'
    """
    match = MODELS_URI.match(model_uri)
    if not match or not match["alias"]:
        return model_uri
    version = registry_client(tracking_uri).get_model_version_by_alias(match["name"], match["alias"]).version
    return f"models:/{match['name']}/{version}"


class ExportedNetwork(torch.nn.Module):
    """A ``torch.export`` module (exported in eval mode) that MONAI's engines can switch to eval mode.

    Such a module refuses ``eval()`` and ``train()``; evaluators call ``eval()`` on their network.
    Here ``eval()`` is a no-op and ``train()`` an error, because the exported graph is fixed in the
    mode it was exported in.

    Parameters
    ----------
    module
        ``ExportedProgram.module()``, e.g. what ``mlflow.pytorch.load_model`` returns for a pt2 model.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.training = False

    def train(self, mode: bool = True) -> ExportedNetwork:
        if mode:
            raise RuntimeError(
                "a registered model in the torch.export format is fixed in eval mode; to train further, load "
                "the best checkpoint of its run into the bundle's network_def"
            )
        return self

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.module(image)


def _versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":  # a refused permission or a broken store is not "no such model"
            raise
        names = sorted(model.name for model in client.search_registered_models())
        raise LookupError(
            f"no registered model {name!r} at {printable_uri(client.tracking_uri)}; registered models: {names or 'none'}."
        ) from None
    found = [v for v in client.search_model_versions(f"name LIKE '{filter_prefix(name)}%'") if v.name == name]
    numbers = sorted((int(version.version) for version in found), reverse=True)
    # search_model_versions leaves the aliases out; get_model_version fills them in.
    return [client.get_model_version(name, str(number)) for number in numbers]


def _run_name(client: MlflowClient, run_id: str | None) -> str:
    if not run_id:
        return "-"
    try:
        return client.get_run(run_id).info.run_name or "-"
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return "-"


def _check_version(client: MlflowClient, name: str, version: str) -> None:
    versions = [str(model.version) for model in _versions(client, name)]
    if version not in versions:
        raise LookupError(f"registered model {name!r} has no version {version}; its versions: {versions}.")
