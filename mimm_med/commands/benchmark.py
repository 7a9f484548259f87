"""``mimm-med benchmark``: the shortcut benchmark matrix, methods × data sets × correlations × seeds.

Every cell trains one method on one data set at training correlation r and one seed, and scores it
on the iid / balanced / inverted test sets. Finished cells are stored under ``--out`` and
skipped by a re-run, so an interrupted benchmark resumes. Outputs in ``--out``: ``results.csv``
(long format: dataset, method, correlation, seed, test, metric, value), ``results.md`` (mean ± sd
tables and the drop from the lowest to the highest r), ``inverted_vs_correlation_<dataset>.png`` and
``leakage_vs_correlation_<dataset>.png``; everything is logged to MLflow (a parent run with the table
and plots, a child run per cell).

Examples
--------
    mimm-med benchmark --quick --docs docs/results.md          # minutes: tiny cohorts, r = 0.9 and 0.98
    mimm-med benchmark --datasets digits --seeds 3 --with-rebalance
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mimm_med.cli import at_least, shortcut_correlation, torch_device

DATASETS = ("digits", "brain", "cxr")
DEFAULT_EXPERIMENT = "mimm-med-benchmark"
DEFAULT_CACHE = "data/benchmark"


@dataclass(frozen=True)
class Defaults:
    """Settings that ``--quick`` changes; an option given explicitly wins."""

    correlations: tuple[float, ...]
    seeds: int
    epochs: int
    out: str


# Correlations: the prevalence ablation of Mueller & Berens (2026), P(z agrees with y) in training.
FULL = Defaults(correlations=(0.7, 0.8, 0.9, 0.95, 0.98), seeds=3, epochs=20, out="out/benchmark")
# Quick: after 3 epochs most cells still put every image in one class; 10 epochs take about 4 minutes here.
QUICK = Defaults(correlations=(0.9, 0.98), seeds=1, epochs=10, out="out/benchmark-quick")


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    _refuse_repeats(names, text)
    return names


def _refuse_repeats(values: list, text: str) -> None:
    # a repeated entry would count its cells twice in the mean ± sd, as if there were more seeds
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        shown = ", ".join(f"{value:g}" if isinstance(value, float) else value for value in repeated)
        raise argparse.ArgumentTypeError(f"{shown} given more than once in {text!r}")


def _weight(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _markdown_page(text: str) -> Path:
    # checked before training, so that hours of cells are not followed by an IsADirectoryError
    page = Path(text)
    if page.suffix != ".md" or page.is_dir():
        raise argparse.ArgumentTypeError(f"expected a Markdown file such as docs/results.md, got {text!r}")
    return page


def _listed(values: tuple[float, ...]) -> str:
    return ",".join(f"{value:g}" for value in values)


def _correlations(text: str) -> tuple[float, ...]:
    values = tuple(shortcut_correlation(value) for value in text.split(","))
    # cells are stored under r written with :g, so r must survive that spelling (0.9000001 would reuse r = 0.9's cells)
    unspellable = [value for value in values if float(f"{value:g}") != value]
    if unspellable:
        raise argparse.ArgumentTypeError(f"give r with at most 6 significant digits, got {unspellable}")
    _refuse_repeats(list(values), text)
    return values


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``benchmark``."""
    parser = subparsers.add_parser(
        "benchmark",
        help="run the shortcut benchmark matrix (methods x data sets x correlations x seeds)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    matrix = parser.add_argument_group("matrix")
    matrix.add_argument(
        "--datasets", type=_names, default=list(DATASETS), help=f"comma-separated (default: {','.join(DATASETS)})"
    )
    matrix.add_argument(
        "--methods", type=_names, help="comma-separated (default: erm,rebalance,adversarial,dcor,mmd,mimm,mimmx,oracle)"
    )
    matrix.add_argument(
        "--with-rebalance", action="store_true", help="also each penalty with group rebalancing (mimmx+rebalance, ...)"
    )
    matrix.add_argument(
        "--correlations",
        type=_correlations,
        help=f"training correlations r (default: {_listed(FULL.correlations)}; quick: {_listed(QUICK.correlations)})",
    )
    matrix.add_argument(
        "--seeds",
        type=at_least(1),
        help=f"seeds 0..N-1 per cell (default: {FULL.seeds}; quick: {QUICK.seeds})",
    )
    matrix.add_argument(
        "--quick", action="store_true", help="tiny stand-ins, fewer correlations, seeds and epochs: minutes on a CPU"
    )
    training = parser.add_argument_group("training (ExperimentConfig)")
    training.add_argument("--epochs", type=at_least(1), help=f"default: {FULL.epochs}; quick: {QUICK.epochs}")
    training.add_argument("--mi-weight", type=_weight, default=1.0, help="λ of the dependence term (default: 1.0)")
    training.add_argument(
        "--estimator",
        default="mine",
        help="MI estimator of mimm and mimmx: mine, nwj, infonce, club or gaussian (default: mine)",
    )
    training.add_argument("--conditional", action="store_true", help="estimate I(f_y; f_z | y) instead of I(f_y; f_z)")
    training.add_argument(
        "--reference",
        choices=("features", "labels"),
        default="features",
        help="what stands for z_k in the MI term: its features f_zk or its labels (default: features)",
    )
    training.add_argument("--balanced", action="store_true", help="estimate the MI under cell-balanced sample weights")
    training.add_argument(
        "--invariant-head",
        action="store_true",
        help="after training, refit the y head on f_y with the factors' linear traces erased (InvariantHeadRefit)",
    )
    training.add_argument(
        "--no-augment", action="store_true", help="do not shift, scale and tilt the training digits (Digits-Morpho)"
    )
    training.add_argument("--n-critic", type=at_least(1), default=3, help="critic steps per encoder step (default: 3)")
    training.add_argument(
        "--residual-mi",
        action="store_true",
        help="also estimate residual MI of f_y with each factor (fresh MINE critics for I(f_y; f_z), I(f_y; f_z | y), "
        "I(f_y; z) on the balanced set; slow); NaN with a warning below 24 rows per fold (120 rows)",
    )
    training.add_argument("--device", type=torch_device, default="cpu", help="torch device (default: cpu)")
    training.add_argument(
        "--threads",
        type=at_least(1),
        help="torch CPU threads (default: torch's; 1 is faster on a busy machine)",
    )
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument(
        "--out",
        type=Path,
        help=f"results folder, reused to resume (default: {FULL.out}; quick: {QUICK.out})",
    )
    outputs.add_argument(
        "--cache", type=Path, default=Path(DEFAULT_CACHE), help="stand-in cohorts, made once (default: %(default)s)"
    )
    outputs.add_argument(
        "--docs",
        type=_markdown_page,
        help="also publish the page here, e.g. docs/results.md (plots: docs/results/)",
    )
    outputs.add_argument(
        "--experiment",
        default=DEFAULT_EXPERIMENT,
        help=f"MLflow experiment (default: {DEFAULT_EXPERIMENT})",
    )
    outputs.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db)",
    )
    outputs.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_benchmark)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left out with the full or ``--quick`` defaults, and the method list."""
    from mimm_med.benchmark import DEFAULT_METHODS, REBALANCED_METHODS

    defaults = QUICK if args.quick else FULL
    methods = list(args.methods or DEFAULT_METHODS) + (list(REBALANCED_METHODS) if args.with_rebalance else [])
    return argparse.Namespace(
        **{
            **vars(args),
            "methods": list(dict.fromkeys(methods)),
            "correlations": args.correlations or defaults.correlations,
            "seeds": defaults.seeds if args.seeds is None else args.seeds,
            "epochs": defaults.epochs if args.epochs is None else args.epochs,
            "out": args.out or Path(defaults.out),
        }
    )


def command_line(args: argparse.Namespace) -> str:
    """The command that reruns the resolved ``args`` (every matrix and training setting spelled out)."""
    words = ["mimm-med", "benchmark", *(["--quick"] if args.quick else [])]
    words += ["--datasets", ",".join(args.datasets), "--methods", ",".join(args.methods)]
    words += ["--correlations", _listed(args.correlations), "--seeds", str(args.seeds)]
    words += ["--epochs", str(args.epochs), "--mi-weight", f"{args.mi_weight:g}", "--estimator", args.estimator]
    words += ["--n-critic", str(args.n_critic), *(["--conditional"] if args.conditional else [])]
    words += ["--reference", args.reference] if args.reference != "features" else []
    words += ["--balanced"] if args.balanced else []
    words += ["--invariant-head"] if args.invariant_head else []
    words += ["--no-augment"] if args.no_augment else []
    words += ["--residual-mi"] if args.residual_mi else []
    words += ["--threads", str(args.threads)] if args.threads else []
    # the device is stored with every cell (cell_options): a rerun on another one would be refused
    words += ["--device", args.device] if args.device != "cpu" else []
    words += ["--out", str(args.out)]
    words += ["--cache", str(args.cache)] if args.cache != Path(DEFAULT_CACHE) else []  # else made again there
    return shlex.join(words + (["--docs", str(args.docs)] if args.docs else []))


def cell_options(args: argparse.Namespace) -> dict[str, Any]:
    """The settings a finished cell is stored with; a cell stored with others is not reused (:class:`StaleCellError`)."""
    return {
        "epochs": args.epochs,
        "mi_weight": args.mi_weight,
        "estimator": args.estimator,
        "conditional": args.conditional,
        "n_critic": args.n_critic,
        "device": args.device,
        # Only when set: cells finished before these options existed stay valid for a resumed run.
        **({"invariant_head": True} if args.invariant_head else {}),
        **({"reference": args.reference} if args.reference != "features" else {}),
        **({"balanced": True} if args.balanced else {}),
        **({"residual_mi": True} if args.residual_mi else {}),
        # the quick stand-ins are smaller cohorts than the full ones under the same cell names
        **({"scale": "quick"} if args.quick else {}),
    }


def run_benchmark(args: argparse.Namespace) -> int:
    """Run ``mimm-med benchmark``; return the exit status."""
    from mimm_med.benchmark import (
        BenchmarkTracker,
        StaleCellError,
        make_datasets,
        plan_cells,
        run_matrix,
        stored_cells,
        write_results,
    )
    from filelock import FileLock, Timeout
    from mlflow.exceptions import MlflowException

    from mimm_med.benchmark.matrix import cell_path
    from mimm_med.data.manifest import cannot_write
    from mimm_med.engines import METHODS
    from mimm_med.mi import ESTIMATORS
    from mimm_med.tracking import TrackingServerUnreachable, printable_uri
    from mimm_med.tracking.uri import printable_text

    args = resolve(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    unknown = [method for method in args.methods if method not in (*METHODS, "oracle")]
    if unknown:
        print(f"mimm-med benchmark: unknown methods {unknown}; choose from {[*METHODS, 'oracle']}", file=sys.stderr)
        return 2
    if args.estimator not in ESTIMATORS:
        print(f"mimm-med benchmark: unknown estimator {args.estimator!r}; choose from {list(ESTIMATORS)}", file=sys.stderr)
        return 2
    try:
        datasets = make_datasets(args.datasets, args.cache, "quick" if args.quick else "full", augment=not args.no_augment)
    except ValueError as error:
        print(f"mimm-med benchmark: {error}", file=sys.stderr)
        return 2
    options = cell_options(args)
    cells = plan_cells(args.datasets, args.methods, args.correlations, range(args.seeds))
    command = command_line(args)
    start = time.perf_counter()
    try:  # before the MLflow run: a refused benchmark leaves none
        stored = len(stored_cells(cells, datasets, args.out, options))
    except StaleCellError as error:
        print(f"mimm-med benchmark: {error}", file=sys.stderr)
        return 2
    for dataset in datasets.values():
        cache = getattr(dataset, "cache", None)
        try:
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            print(f"mimm-med benchmark: {cannot_write(f'--cache {args.cache}', error)}", file=sys.stderr)
            return 2
    print(f"{len(cells)} cells ({stored} stored, {len(cells) - stored} to run) -> {args.out}\n{command}", flush=True)
    params = {**options, "datasets": args.datasets, "methods": args.methods, "correlations": args.correlations}
    params["seeds"] = args.seeds
    params["augment_digits"] = not args.no_augment
    if args.docs is not None:
        try:  # here, not after the matrix: where the page's plots go
            args.docs.with_suffix("").mkdir(parents=True, exist_ok=True)
        except OSError as error:
            print(f"mimm-med benchmark: {cannot_write(f'--docs {args.docs}', error)}", file=sys.stderr)
            return 2
    # One benchmark per --out: two would train the same cells and end each other's MLflow run.
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(args.out / "benchmark.lock")
        lock.acquire(timeout=0)
    except Timeout:  # before OSError, of which it is one
        print(f"mimm-med benchmark: another benchmark is running in {args.out}; wait for it to finish, or give "
              "another --out", file=sys.stderr)  # fmt: skip
        return 2
    except OSError as error:
        print(f"mimm-med benchmark: {cannot_write(args.out, error)}", file=sys.stderr)
        return 2
    try:
        try:
            tracker = BenchmarkTracker(args.out, args.experiment, params, args.tracking_uri)
        except (TrackingServerUnreachable, ValueError) as error:  # messages that name their fix
            print(f"mimm-med benchmark: {printable_text(' '.join(str(error).split()))}", file=sys.stderr)
            return 2
        except MlflowException as error:  # a tracking URI MLflow cannot open, in MLflow's words
            print(f"mimm-med benchmark: {printable_text(' '.join(str(error).split()))}; give --tracking-uri (or "
                  "MLFLOW_TRACKING_URI) as sqlite:///path/to/mlflow.db or the http(s):// address of a server", file=sys.stderr)  # fmt: skip
            return 2
        except OSError as error:
            print(f"mimm-med benchmark: {cannot_write(args.out, error)}", file=sys.stderr)
            return 2
        with tracker, warnings.catch_warnings():
            # Per-epoch means of terms a method does not have (ERM's critic loss) are NaN by design.
            warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
            try:
                results = run_matrix(
                    cells,
                    datasets,
                    args.out,
                    options,
                    residual_mi={"device": args.device} if args.residual_mi else None,
                    on_result=tracker.log_cell,
                    progress=not args.no_progress,
                )
            except StaleCellError as error:
                print(f"mimm-med benchmark: {error}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                print(f"mimm-med benchmark: finished cells are kept in {cell_path(args.out, cells[0]).parent}; "
                      "run the same command to resume", file=sys.stderr)
                raise
            paths = write_results(results, args.out, command, args.docs)
            tracker.log_artifacts(paths.values())
        print(paths["markdown"].read_text(encoding="utf-8"))
        print(f"benchmark finished in {time.perf_counter() - start:.0f} s; results in {args.out}")
        print(f"MLflow: {printable_uri(tracker.uri)}, parent run {tracker.run_id}")
        return 0
    finally:
        lock.release()
