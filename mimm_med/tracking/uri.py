"""Where runs and artifacts go: an explicit URI, ``MLFLOW_TRACKING_URI``, or an embedded SQLite file."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import mlflow
import requests
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE, MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.uri import get_uri_scheme
from monai.utils import path_to_sqlite_uri
from sqlalchemy.engine import make_url

__all__ = [
    "TrackingServerUnreachable",
    "default_artifact_location",
    "keep_password_out_of_run_links",
    "printable_text",
    "printable_uri",
    "require_reachable",
    "resolve_tracking_uri",
]

#: ``user:password@`` after ``//`` in a URL.
_USER_PASSWORD = re.compile(r"(?<=//)([^/\s:@]+):[^/\s]*@")  # greedy: a password may hold "@"

#: Folder of the embedded store under the project root: ``mlflow.db`` and ``artifacts/``.
STORE_FOLDER = "mlruns"


def resolve_tracking_uri(uri: str | None = None, root: str | Path = ".", create: bool = True) -> str:
    """Return the MLflow tracking URI to use.

    An explicit ``uri`` wins over the ``MLFLOW_TRACKING_URI`` environment variable, which wins over
    the embedded default ``sqlite:///<root>/mlruns/mlflow.db`` (absolute; its folder is created
    unless ``create`` is false).
    MLflow ≥ 3 has no file store by default, hence a SQLite file rather than a folder of runs; a
    ``file:`` URI or a bare path (which MLflow reads as a file store) is refused with a
    ``ValueError`` that names the fix, unless ``MLFLOW_ALLOW_FILE_STORE`` is true.

    Note that MONAI's ``MLFlowHandler`` lets ``MLFLOW_TRACKING_URI`` override its ``tracking_uri``
    argument, so in a bundle pass ``resolve_tracking_uri()`` (no ``uri``) to get the same answer.

    Parameters
    ----------
    uri
        A tracking URI given by the user (``http://…`` server, ``postgresql://…``, ``sqlite:///…``).
    root
        Project folder that holds the embedded store.
    create
        Whether to create the embedded store's folder; commands that only read a store pass ``False``.

    Examples
    --------
    >>> resolve_tracking_uri(root="/data/project")  # with MLFLOW_TRACKING_URI unset
    'sqlite:////data/project/mlruns/mlflow.db'
    """
    if uri:
        return _refuse_file_store(uri, "the tracking URI")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return _refuse_file_store(os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI")
    folder = Path(root).absolute() / STORE_FOLDER
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return path_to_sqlite_uri(folder / "mlflow.db")


def _refuse_file_store(uri: str, source: str) -> str:
    """``uri``, unless it names MLflow's file store, which MLflow ≥ 3 refuses deep inside its client.

    MLflow's own error comes only when a client is first made, i.e. after a whole evaluation or
    from the middle of a registry command; a bare path such as ``mlruns/mlflow.db`` is read as a
    file store too, which is rarely what was meant.
    """
    # MLflow picks the store by this scheme ("" for a bare path); "databricks" is special-cased there
    if uri in {"databricks", "databricks-uc", "uc"} or get_uri_scheme(uri) not in {"", "file"} or MLFLOW_ALLOW_FILE_STORE.get():
        return uri
    raise ValueError(
        f"{source} {uri!r} names an MLflow file store (a folder of runs), which MLflow 3 no longer opens; use a "
        "SQLite file such as sqlite:///$PWD/mlruns/mlflow.db (`mlflow migrate-filestore` moves an existing folder "
        "into one), a database or a server URI, or unset it for the embedded store"
    )


def default_artifact_location(root: str | Path = ".", tracking_uri: str | None = None) -> str | None:
    """Return the artifact location for new experiments of a local SQLite store, else ``None``.

    For a SQLite store the artifacts go to the folder ``artifacts`` next to the database file
    (``<root>/mlruns/artifacts`` for the embedded default), as a ``file://`` URI. For any other store
    (a tracking server, PostgreSQL) ``None`` lets the server choose, so that runs on a shared server
    never point at one machine's disk. Pass the result to ``MLFlowHandler(artifact_location=...)``
    or ``MlflowClient.create_experiment``; it only matters when the experiment is created.

    Parameters
    ----------
    root
        Project folder of the embedded store, as in :func:`resolve_tracking_uri`.
    tracking_uri
        The tracking URI; resolved by :func:`resolve_tracking_uri` when not given.

    Examples
    --------
    >>> default_artifact_location("/data/project")  # with MLFLOW_TRACKING_URI unset
    'file:///data/project/mlruns/artifacts'
    """
    tracking_uri = resolve_tracking_uri(tracking_uri, root)
    if not tracking_uri.startswith("sqlite:"):
        return None
    database = make_url(tracking_uri).database
    if not database or database == ":memory:":
        return None
    return (Path(database).absolute().parent / "artifacts").as_uri()


def printable_uri(uri: str) -> str:
    """``uri`` with the password of its ``user:password@`` part (a PostgreSQL store's, a server's) as ``***``, for messages.

    Examples
    --------
    >>> printable_uri("postgresql://mlflow:secret@db.example.org:5432/mlflow")
    'postgresql://mlflow:***@db.example.org:5432/mlflow'
    """
    return printable_text(uri)


def printable_text(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it as ``***`` (MLflow's messages quote the URI).

    Examples
    --------
    >>> printable_text("API request to http://alice:S3cret@mlflow.example.org/api/2.0/mlflow/runs/get failed")
    'API request to http://alice:***@mlflow.example.org/api/2.0/mlflow/runs/get failed'
    """
    return _USER_PASSWORD.sub(r"\1:***@", text)


def keep_password_out_of_run_links(uri: str) -> None:
    """Stop MLflow printing each ended run's link when ``uri`` holds a password.

    MLflow's client prints ``View run … at: <tracking URI>/#/…`` to stdout, password included, and
    stdout ends up in a scheduler's log files.
    """
    if urlsplit(uri).password is not None:
        os.environ[MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.name] = "true"


class TrackingServerUnreachable(ConnectionError):
    """The MLflow tracking server of an ``http(s)://`` URI does not answer."""


def require_reachable(uri: str, timeout: float = 10.0) -> None:
    """Raise :class:`TrackingServerUnreachable` at once if the tracking server of ``uri`` does not answer.

    MLflow's client retries a server that cannot be reached for minutes (seven retries with
    exponential back-off) before it raises, and a benchmark or training would seem to hang. One
    request without retries finds out first. Any answer, even a refusal (401), counts as reachable:
    whether the credentials are right is MLflow's to say. Other stores (SQLite, PostgreSQL) are
    not checked.

    Parameters
    ----------
    uri
        The tracking URI, as returned by :func:`resolve_tracking_uri`.
    timeout
        Seconds to wait for the answer.
    """
    if not uri.startswith(("http://", "https://")):
        return
    # MLflow's own TLS settings (MLFLOW_TRACKING_SERVER_CERT_PATH, _INSECURE_TLS, _CLIENT_CERT_PATH), as its client uses them.
    credentials = get_default_host_creds(uri)
    try:
        requests.get(
            f"{uri.rstrip('/')}/health", timeout=timeout, verify=credentials.verify, cert=credentials.client_cert_path
        )
    except requests.exceptions.SSLError as error:
        raise TrackingServerUnreachable(
            f"the MLflow tracking server {printable_uri(uri)} answers, but its TLS certificate could not be verified "
            f"({error}); set MLFLOW_TRACKING_SERVER_CERT_PATH to the certificate of its issuing authority, or "
            "MLFLOW_TRACKING_INSECURE_TLS=true to skip the check"
        ) from error
    except requests.RequestException as error:
        raise TrackingServerUnreachable(
            f"the MLflow tracking server {printable_uri(uri)} does not answer ({type(error).__name__}); start it, or point "
            "--tracking-uri (a bundle's --tracking_uri) or MLFLOW_TRACKING_URI at a running one (unset both for the embedded SQLite store)"
        ) from error


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``mlflow.pytorch.log_model``, ``load_model``) at ``uri`` for a while.

    Those functions read a process-wide URI; restoring it keeps this module from changing where
    the rest of the process logs. ``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI``
    (and ``None`` deletes it), and a URI set explicitly outranks that variable, so the variable is
    what is restored: the URI in use before is found through it again, while a later change of the
    variable (another store in the same process) still takes effect.
    """
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        if previous is not None:
            os.environ["MLFLOW_TRACKING_URI"] = previous
