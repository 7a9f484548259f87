"""``mimm-med registry``: list the versions of a registered model and move its aliases.

MLflow is imported inside each sub-command so that ``mimm-med --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from mimm_med.cli import at_least


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``registry`` and its sub-commands."""
    parser = subparsers.add_parser(
        "registry",
        help="list registered model versions and move aliases (champion, candidate)",
        description="MLflow model registry: list the versions of a model, promote one to an alias.",
    )
    commands = parser.add_subparsers(dest="registry_command", metavar="SUBCOMMAND", required=True)
    uri_help = "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///./mlruns/mlflow.db)"

    promote = commands.add_parser(
        "promote",
        help="point an alias at a version",
        description="Point an alias (default: champion) of a registered model at one of its versions.",
    )
    promote.add_argument("name", help="registered model name, e.g. the bundle's name")
    promote.add_argument("--version", type=at_least(1), required=True, help="version to promote (a number)")
    promote.add_argument("--alias", default="champion", help="alias to set (default: champion)")
    promote.add_argument("--tracking-uri", help=uri_help)
    promote.set_defaults(func=promote_command)

    listing = commands.add_parser(
        "list",
        help="versions of a model with their aliases and runs",
        description="List the versions of a registered model, newest first, with their aliases, run ids and run names.",
    )
    listing.add_argument("name", help="registered model name")
    listing.add_argument("--tracking-uri", help=uri_help)
    listing.set_defaults(func=list_command)


def promote_command(args: argparse.Namespace) -> int:
    """Run ``mimm-med registry promote``."""
    from mlflow.exceptions import MlflowException

    from mimm_med.tracking import TrackingServerUnreachable, promote

    try:
        version = promote(args.name, args.version, args.alias, args.tracking_uri)
    except (LookupError, FileNotFoundError, TrackingServerUnreachable, ValueError) as error:
        return _fail("promote", error)
    except MlflowException as error:
        # Name and version are checked before the alias is set, so an invalid parameter is the alias
        # (a reserved one such as "latest" or "v1", or one with a slash); other errors (a store that
        # cannot be opened, a refused permission) are not about the alias.
        if error.error_code == "INVALID_PARAMETER_VALUE":
            return _fail("promote", f"{error.message}; choose an alias of letters, digits, '_' and '-', such as champion")
        return _fail("promote", error.message)
    print(f"models:/{args.name}@{args.alias} -> version {version.version} (run {version.run_id})")
    return 0


def list_command(args: argparse.Namespace) -> int:
    """Run ``mimm-med registry list``."""
    from mlflow.exceptions import MlflowException

    from mimm_med.tracking import TrackingServerUnreachable, version_runs

    try:
        versions = version_runs(args.name, args.tracking_uri)
    except (LookupError, FileNotFoundError, TrackingServerUnreachable, ValueError) as error:
        return _fail("list", error)
    except MlflowException as error:  # e.g. a store of an older schema, or a URI with no registry
        return _fail("list", error.message)
    if not versions:
        print(
            f"registered model {args.name!r} has no versions yet: a bundle's training registers one when it "
            "finishes (python -m monai.bundle run training --config_file bundles/<bundle>/configs/train.json)"
        )
        return 0
    rows = [("version", "aliases", "run_id", "run_name")]
    rows += [
        (str(version.version), ",".join(sorted(version.aliases)) or "-", version.run_id or "-", run_name)
        for version, run_name in versions
    ]
    # The name goes last: it is the one column that may hold spaces, and the only one not padded.
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for version, aliases, run_id, run_name in rows:
        print(f"{version:<{widths[0]}}  {aliases:<{widths[1]}}  {run_id:<{widths[2]}}  {run_name}")
    return 0


def _fail(command: str, error: Exception | str) -> int:
    from mimm_med.tracking.uri import printable_text

    # one line: MLflow's messages (an out-of-date schema, say) span several; they quote the URI, password included
    print(f"mimm-med registry {command}: {printable_text(' '.join(str(error).split()))}", file=sys.stderr)
    return 2
