"""``mimm-med demo``: the whole workflow on a generated stand-in cohort, in minutes on a laptop CPU.

Stand-in UK Biobank + NAKO brain MRI → ``mimm-med preprocess`` → ``cohort merge`` → ``cohort split`` at
r = 0.9 (sex and cohort agree with the age group) → ERM and MIMM-X trained, evaluated and registered
through the ``mimmx_brain`` bundle, each also with the invariant head refit → a results table and the
paths of the plots.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from mimm_med.cli import at_least, run_subcommand, shortcut_correlation, subcommand_folder

BUNDLE = Path("bundles/mimmx_brain")


def _step(message: str) -> None:
    print(f"\n== {message}", flush=True)


def prepare(workdir: Path, subjects: int, resolution_mm: float, size: int, correlation: float, seed: int) -> Path:
    """Generate, preprocess, merge and split the stand-in cohort; return the splits folder.

    Every step is skipped when its output exists, so a second ``mimm-med demo`` reuses the data; a
    step stopped midway is done again (preprocessing resumes), its output never used half-made
    (:func:`~mimm_med.cli.subcommand_folder`).
    """
    # here, not at the top: every ``mimm-med`` command, ``--help`` too, imports this module, and these import MONAI (seconds)
    from mimm_med.data.cohort_card import SHIPPED_CARDS
    from mimm_med.data.datalist import check_split_folder
    from mimm_med.data.manifest import ManifestError
    from mimm_med.data.pseudonym import write_synthetic_cohort_key

    key_file = workdir / "pseudonym.key"
    if not key_file.exists():
        write_synthetic_cohort_key(key_file, f"mimm-med demo, seed {seed}")
    spacing = json.dumps([resolution_mm] * 3)
    shape = json.dumps([size] * 3)
    manifests = []
    for offset, cohort in enumerate(("ukb", "nako")):
        raw, processed = workdir / "raw" / cohort, workdir / "processed" / cohort
        if not raw.exists():
            _step(f"generating {subjects} stand-in {cohort.upper()} subjects")
            subcommand_folder(raw, ["cohort", "generate", cohort, "--n", str(subjects), "--seed", str(seed + offset),
                                    "--resolution-mm", str(resolution_mm)])  # fmt: skip
        if not processed.exists():
            _step(f"preprocessing {cohort.upper()}")
            subcommand_folder(processed, ["preprocess", "--cohort", str(SHIPPED_CARDS / f"{cohort}.yaml"), "--raw", str(raw),
                                          "--key-file", str(key_file), "--set", f"spacing={spacing}", "--set", f"spatial_size={shape}"],
                              resume=True)  # fmt: skip
        manifests.append(str(processed / "manifest.csv"))
    merged, splits = workdir / "processed" / "brain.csv", workdir / "splits"
    if not merged.exists():  # one file, written atomically
        _step("merging UKB and NAKO")
        run_subcommand(["cohort", "merge", *manifests, "--out", str(merged)])
    if not splits.exists():
        _step(f"splitting at r = {correlation} (sex and cohort agree with the age group)")
        subcommand_folder(splits, ["cohort", "split", "--manifest", str(merged), "--primary", "age_group",
                                   "--spurious", f"sex={correlation},cohort={correlation}", "--seed", str(seed)])  # fmt: skip
    try:
        check_split_folder(splits)
    except ManifestError as error:  # too few subjects: the bundle would refuse the splits after the set-up
        raise SystemExit(f"mimm-med demo: {error}; here, give --subjects more than {subjects}") from None
    return splits


def run_label(method: str, invariant_head: bool) -> str:
    """What the demo calls a run in its messages and its results table, e.g. ``mimmx + invariant head``."""
    return f"{method} + invariant head" if invariant_head else method


def train_and_evaluate(
    method: str, splits: Path, size: int, epochs: int, seed: int, cohort: str, invariant_head: bool = False
) -> dict:
    """Train ``method`` with the brain bundle, evaluate it, and return the evaluation metrics.

    ``invariant_head`` refits the primary head for each validation (the bundle's ``invariant_head``).

    ``cohort`` names the demo cohort's settings in the run name: the bundle resumes a run from its
    checkpoints and refuses those of other settings, so a demo on another cohort must not share a run
    name with an earlier one. A run that an earlier demo finished is evaluated again, not retrained.
    """
    from monai.bundle import run

    from mimm_med.engines import RunFinished

    overrides = {
        "method": method,
        "dataset_dir": str(splits),
        "spatial_size": [size] * 3,
        "epochs": epochs,
        "seed": seed,
        "invariant_head": invariant_head,
        "run_name": f"demo-{method}{'-invariant-head' if invariant_head else ''}-seed{seed}-{cohort}-e{epochs}",
        "backbone": "small_cnn",
        # The demo's figures were measured with three blocks; SmallCNN's default has four, for 28×28 digits
        # (on the stand-in brain a fourth block changed MIMM-X's inverted accuracy by under a point, one seed).
        "network_def#backbone_kwargs": {"channels": [32, 64, 128]},
    }
    label = run_label(method, invariant_head)
    _step(f"training {label} ({epochs} epochs) with {BUNDLE / 'configs/train.json'}")
    try:
        run("training", config_file=str(BUNDLE / "configs/train.json"), **overrides)
    except RuntimeError as error:  # monai.bundle wraps what a config expression raises
        if not isinstance(error.__cause__, RunFinished):
            raise
        _step(f"{label} was trained by an earlier demo: {error.__cause__}")
    _step(f"evaluating {label} on the iid / balanced / inverted test sets")
    # A balanced test set of a few dozen subjects gives residual-MI critics nothing to learn from, and
    # their fits would double the demo's time.
    evaluate_configs = [str(BUNDLE / "configs/train.json"), str(BUNDLE / "configs/evaluate.json")]
    run("evaluating", config_file=evaluate_configs, estimate_residual_mi=False, **overrides)
    output_dir = BUNDLE / "eval" / overrides["run_name"]
    metrics = json.loads((output_dir / "results.json").read_text(encoding="utf-8"))["metrics"]
    # results.json writes an undefined metric as null
    return {"metrics": {key: math.nan if value is None else value for key, value in metrics.items()}, "output_dir": output_dir}


def results_table(results: dict[str, dict]) -> str:
    """Markdown table of the headline figures per method."""
    columns = [
        ("inverted bacc", "inverted/y_bacc"), ("inverted AUROC", "inverted/y_auroc"), ("balanced bacc", "balanced/y_bacc"),
        ("iid bacc", "iid/y_bacc"),
        ("inverted worst group", "inverted/worst_group_acc"), ("leakage sex", "leakage/sex"),
        ("leakage cohort", "leakage/cohort"),
    ]
    lines = ["| method | " + " | ".join(name for name, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for method, result in results.items():
        cells = [f"{100 * result['metrics'][key]:.1f}" for _, key in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    from mimm_med.tracking import list_versions, printable_uri, resolve_tracking_uri

    start = time.perf_counter()
    if not args.prepare_only and not (BUNDLE / "configs" / "train.json").is_file():
        # MONAI bundle configs name the files they merge relative to the working folder
        print(f"mimm-med demo: no {BUNDLE} here; run it from the repository root, where bundles/ is", file=sys.stderr)
        return 2
    workdir = Path(args.workdir)
    splits = prepare(workdir, args.subjects, args.resolution_mm, args.size, args.correlation, args.seed)
    if args.prepare_only:
        print(f"\nsplits ready in {splits}")
        return 0
    cohort = f"n{args.subjects}-{args.resolution_mm:g}mm-{args.size}vox-r{args.correlation:g}"
    heads = (False, True) if args.invariant_head else (False,)
    results = {
        run_label(method, invariant_head): train_and_evaluate(
            method, splits, args.size, args.epochs, args.seed, cohort, invariant_head
        )
        for invariant_head in heads
        for method in args.methods.split(",")
    }
    _step(f"results (r = {args.correlation}, %, age group balanced accuracy; leakage: linear probe on f_y, 50 ideal)")
    print(results_table(results))
    print("\nplots and reports:")
    for method, result in results.items():
        for path in sorted(result["output_dir"].rglob("*.png")) + [result["output_dir"] / "results.md"]:
            print(f"  {method}: {path}")
    uri = resolve_tracking_uri()
    shown = printable_uri(uri)
    print(f"\nMLflow: {shown}  (mlflow ui --backend-store-uri {shown})")
    for version in list_versions("mimmx_brain", uri)[:len(results)]:
        print(f"  registered mimmx_brain version {version.version} aliases {list(version.aliases)} run {version.run_id}")
    print("promote one with: mimm-med registry promote mimmx_brain --version V --alias champion")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s")
    return 0


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="end-to-end run on a generated stand-in brain cohort",
        description=__doc__,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--workdir", default="data/brain", help="where the cohort, processed images and splits go")
    parser.add_argument("--subjects", type=at_least(1), default=160, help="stand-in subjects per cohort (UKB and NAKO)")
    parser.add_argument("--resolution-mm", type=float, default=4.0, help="voxel size of the stand-in volumes")
    parser.add_argument(
        "--size",
        type=at_least(1),
        default=32,
        # 0 would mean "keep each volume's own size" to MONAI's ResizeWithPadOrCrop: volumes of many shapes
        help="preprocessed volume size (cube edge, voxels)",
    )
    parser.add_argument("--correlation", type=shortcut_correlation, default=0.9, help="r of sex and cohort with the age group")
    parser.add_argument("--methods", default="erm,mimmx", help="comma-separated methods to train")
    parser.add_argument("--epochs", type=at_least(1), default=10, help="training epochs of every run")
    parser.add_argument(
        "--invariant-head",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train each method with the primary head refitted on f_y without the factors' linear traces",
    )
    parser.add_argument("--seed", type=at_least(0), default=0, help="seed of the cohort, the split, the key and training")
    parser.add_argument("--prepare-only", action="store_true", help="stop after writing the splits")
    parser.set_defaults(func=run_demo)
