"""``mimm-med preprocess``: a raw cohort → processed images, ``manifest.csv`` and ``errors.csv``.

MONAI and torch are imported when the command runs, not when the parser is built, so that
``mimm-med --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from mimm_med.cli import EXIT_INTERRUPTED, at_least
from mimm_med.data.pseudonym import KEY_ENV_VAR, Pseudonymiser, PseudonymKeyError, readable_by_others, resolve_key

EXIT_FAILURES, EXIT_USAGE = 1, 2
UNLISTED_SHOWN = 3
#: The pipelines shipped with mimm-med (present in a source checkout, as the README installs it).
SHIPPED_PIPELINES = Path(__file__).resolve().parents[2] / "preprocessing"

EPILOG = f"""\
examples:
  mimm-med preprocess --cohort cohorts/ukb.yaml --raw /data/ukb --out processed/ukb --key-file ~/pseudonym.key
  mimm-med preprocess ... --workers 8 --set spatial_size=[128,128,128] --set spacing=[1.5,1.5,1.5]
  # a SLURM array of 4 tasks, then one merge:
  mimm-med preprocess ... --shard $SLURM_ARRAY_TASK_ID/4
  mimm-med cohort merge processed/ukb/manifest-shard-*.csv --out processed/ukb/manifest.csv

The key (--key-file, --key or ${KEY_ENV_VAR}) turns source ids into pseudonyms; keep it apart from the
outputs. A re-run with the same --out keeps finished images and redoes missing, empty or failed ones;
it must use the same settings once an image has been written.
To find the raw files behind errors.csv (the key holder only): mimm-med cohort locate --errors OUT/errors.csv ...
Exit status: 0 all done, {EXIT_FAILURES} some images or metadata rows failed (see errors.csv; an image
whose worker process died is one of them), {EXIT_USAGE} bad arguments or an --out that cannot be written,
{EXIT_INTERRUPTED} interrupted (re-run to resume).
"""


def _shard(text: str):
    from mimm_med.data.preprocess import PreprocessError, Shard

    try:
        return Shard.parse(text)
    except PreprocessError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def available_cpus() -> int:
    """CPUs this process may run on: a SLURM or container allocation, not the whole node."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _override(text: str):
    from mimm_med.data.preprocess import PreprocessError, parse_override

    try:
        return parse_override(text)
    except PreprocessError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``preprocess``."""
    parser = subparsers.add_parser(
        "preprocess",
        help="preprocess a raw cohort into normalised images and a manifest",
        description="Run a cohort card's preprocessing pipeline over a raw cohort: pseudonymous, resumable, shardable.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cohort", required=True, type=Path, help="cohort card, e.g. cohorts/ukb.yaml")
    parser.add_argument("--raw", required=True, type=Path, help="raw cohort folder, in the layout the card describes")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; reused to resume)")
    parser.add_argument(
        "--workers",
        type=at_least(0),
        default=1,
        help="worker processes, one per CPU at most (default: 1); 0 runs in this process, for a debugger, "
        "where an image that crashes its reader stops the run",
    )
    parser.add_argument(
        "--shard", type=_shard, default="0/1", metavar="I/N", help="process subset I (0-based) of N (default: 0/1)"
    )
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--key-file", type=Path, help="file holding the pseudonymisation key (recommended)")
    key.add_argument("--key", help=f"pseudonymisation key (default: ${KEY_ENV_VAR})")
    parser.add_argument(
        "--set",
        dest="overrides",
        type=_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a pipeline setting, VALUE as JSON of the form of its default, e.g. spatial_size=[64,64,64] "
        "for the brain pipeline, spatial_size=256 (the longest side) or clahe=true for the chest X-ray one",
    )
    parser.add_argument("--pipeline", type=Path, help="pipeline config to use instead of the card's")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _missing_pipeline(card_path: Path, pipeline: Path, given: bool) -> str | None:
    """Why the pipeline config ``pipeline`` cannot be read and what to pass instead; ``None`` if it is a file.

    ``given``: it came from ``--pipeline``, not from the card at ``card_path``.
    """
    if pipeline.is_file():
        return None
    if given:
        return f"--pipeline {pipeline}: no such file"
    shipped = SHIPPED_PIPELINES / pipeline.name
    example = f" (e.g. {shipped})" if shipped.is_file() else ""
    base = card_path.resolve().parent.parent
    if not pipeline.is_relative_to(base):  # the card gives an absolute path, and it is wrong
        return f"{card_path}: pipeline: {pipeline} not found: correct the path in the card{example}, or pass --pipeline"
    # A card written outside cohorts/ does not sit one folder below the pipelines it names.
    return (
        f"{card_path}: pipeline: {pipeline} not found; a relative path is read from the folder above the card's "
        f"folder ({base}): write an absolute path in the card{example}, or pass --pipeline"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``mimm-med preprocess``; return the exit status."""
    from mimm_med.data.cohort_card import CardError, CohortCard
    from mimm_med.data.manifest import ManifestError
    from mimm_med.data.preprocess import PreprocessError, load_pipeline_config, preprocess_records

    try:
        key = resolve_key(args.key, args.key_file)
        if args.key_file is not None and readable_by_others(args.key_file):
            print(
                f"mimm-med preprocess: warning: key file {args.key_file} can be read by other users, who could "
                f"re-identify subjects with it; make it yours alone: chmod 600 {args.key_file}",
                file=sys.stderr,
            )
        workers = min(args.workers, available_cpus())
        if workers < args.workers:
            # More processes than CPUs only adds memory (one pipeline and image each), not speed.
            print(
                f"mimm-med preprocess: warning: --workers {args.workers}, but {workers} CPUs are available "
                f"to this process; using {workers}",
                file=sys.stderr,
            )
        card = CohortCard.from_yaml(args.cohort)
        if card.pipeline is None and args.pipeline is None:
            raise PreprocessError(f"{args.cohort}: cohort {card.name!r} is generated in memory, not preprocessed")
        pipeline = args.pipeline or card.pipeline
        missing = _missing_pipeline(args.cohort, pipeline, given=args.pipeline is not None)
        if missing:
            raise PreprocessError(missing)
        config = load_pipeline_config(pipeline, dict(args.overrides))
        scan = card.scan(args.raw)
        summary = preprocess_records(
            scan.records,
            scan.problems,
            config,
            args.raw,
            args.out,
            Pseudonymiser(key),
            workers=workers,
            shard=args.shard,
            progress=not args.no_progress,
            unlisted=scan.unlisted,
        )
    except (PseudonymKeyError, CardError, PreprocessError, ManifestError, FileNotFoundError) as error:
        print(f"mimm-med preprocess: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(
            "mimm-med preprocess: interrupted; finished images are in the manifest, run the same command to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except BrokenProcessPool as error:
        # The pool only knows that a worker is gone; a worker that raised printed its traceback above.
        print(
            f"mimm-med preprocess: a worker process died ({error}); finished images are in the manifest. "
            f"Run the same command to resume: with fewer --workers if memory ran out, or with --workers 0, "
            f"which runs in this process and names the image and error of any failure",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if summary.unlisted:
        more = ", ..." if len(summary.unlisted) > UNLISTED_SHOWN else ""
        shown = ", ".join(summary.unlisted[:UNLISTED_SHOWN]) + more
        print(
            f"mimm-med preprocess: warning: {len(summary.unlisted)} image files under --raw match the card's "
            f"images.pattern but no metadata row, so they were not processed: {shown}; add their rows to the table, "
            "or list them all with `mimm-med cohort locate --unlisted` and the same --cohort, --raw and key",
            file=sys.stderr,
        )
    print(summary)
    return 0 if summary.ok else EXIT_FAILURES
