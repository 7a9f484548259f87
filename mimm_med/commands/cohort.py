"""``mimm-med cohort``: generate stand-in cohorts and Digits-Morpho; merge, split and describe manifests; locate the
raw files behind pseudonyms.

Heavy imports (pandas, MONAI, matplotlib, the generators) happen inside each sub-command so that
``mimm-med --help`` stays fast.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

from mimm_med.checks import check_shortcut_correlation
from mimm_med.cli import at_least, shortcut_correlation

COHORT_KINDS_HELP = "ukb, nako, chexpert or chexpert_plus"
#: How ``cohort describe`` shows a missing label value.
MISSING = "missing"


def _pairs(text: str, check: Callable[[float], float] | None = None) -> dict[str, float]:
    """Read ``"a=0.9,b=0.8"`` (or a single ``a=0.9``) into ``{"a": 0.9, "b": 0.8}``; a name given twice is refused.

    ``check`` returns a valid number or raises a ``ValueError`` saying why it is not one.
    """
    pairs = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        name = name.strip()
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected NAME=NUMBER[,NAME=NUMBER...], got {text!r}") from None
        if not name:
            raise argparse.ArgumentTypeError(f"expected NAME=NUMBER[,NAME=NUMBER...], got {text!r}")
        if name in pairs:
            raise argparse.ArgumentTypeError(f"{name!r} is given twice in {text!r}; give each name once")
        try:
            pairs[name] = check(number) if check else number
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{name}={value.strip()}: {error}") from None
    return pairs


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(f) for f in text.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 3:
        raise argparse.ArgumentTypeError(f"expected three fractions train,val,test such as 0.6,0.1,0.3; got {text!r}")
    return fractions


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cohort`` and its sub-commands."""
    parser = subparsers.add_parser(
        "cohort",
        help="generate stand-in cohorts and Digits-Morpho; merge, split and describe manifests; locate raw files",
        description="Cohort tools: generate stand-in cohorts and Digits-Morpho, merge manifests, build confounded splits, "
        "describe, locate the raw files behind pseudonyms (the key holder only).",
    )
    commands = parser.add_subparsers(dest="cohort_command", metavar="SUBCOMMAND", required=True)

    generate = commands.add_parser(
        "generate",
        help="write a stand-in cohort in a real cohort's layout",
        description="Write a stand-in cohort (images + metadata table) in the raw layout of a real cohort.",
    )
    generate.add_argument("kind", help=COHORT_KINDS_HELP)
    generate.add_argument("--n", type=int, required=True, help="number of subjects")
    generate.add_argument("--out", type=Path, required=True, help="output folder")
    generate.add_argument("--seed", type=at_least(0), default=0, help="random seed (default: 0)")
    generate.add_argument(
        "--effect",
        dest="effects",
        type=_pairs,
        action="append",
        default=[],
        metavar="NAME=SIZE",
        help="effect size, 0 removes the effect, 1 is the default (repeatable), e.g. --effect scanner=2",
    )
    generate.add_argument(
        "--resolution-mm",
        type=float,
        help="voxel or pixel size of the images in mm (brain: 0.5 to 10, default about 1; chest X-ray: default about 1.1, at least 16 pixels a side)",
    )
    generate.add_argument("--no-progress", action="store_true", help="no progress bar")
    generate.set_defaults(func=generate_command)

    merge = commands.add_parser(
        "merge",
        help="merge manifests (cohorts or shard parts) into one",
        description="Merge manifests into one, e.g. UK Biobank + NAKO (cohort becomes a factor) or the "
        "shard parts of one preprocess run. Image paths are rewritten relative to the new manifest; "
        "label columns must agree, and so must the preprocessing settings their folders' pipeline.json record.",
    )
    merge.add_argument("manifests", nargs="+", type=Path, help="manifests to merge")
    merge.add_argument("--out", type=Path, required=True, help="merged manifest to write")
    merge.set_defaults(func=merge_command)

    split = commands.add_parser(
        "split",
        help="build confounded train/val/test splits by subject",
        description="Split a manifest by subject into train, val, test-iid, test-balanced and test-inverted, "
        "each spurious factor agreeing with the primary label at the requested rate r in train, val and test-iid, "
        "0.5 in test-balanced and 1 - r in test-inverted.",
    )
    split.add_argument("--manifest", type=Path, required=True, help="manifest to split")
    split.add_argument("--primary", required=True, help="primary label column, e.g. age_group")
    split.add_argument(
        "--spurious",
        type=functools.partial(_pairs, check=check_shortcut_correlation),
        required=True,
        metavar="NAME=R,...",
        help="training correlations, e.g. sex=0.9,cohort=0.9",
    )
    split.add_argument("--out", type=Path, required=True, help="folder for the split manifests and cells.csv")
    split.add_argument("--seed", type=at_least(0), default=0, help="random seed (default: 0)")
    split.add_argument(
        "--fractions", type=_fractions, default=(0.6, 0.1, 0.3), metavar="TRAIN,VAL,TEST", help="default: 0.6,0.1,0.3"
    )
    split.set_defaults(func=split_command)

    digits = commands.add_parser(
        "digits",
        help="write Digits-Morpho as PNG images and confounded splits",
        description="Write Digits-Morpho (scikit-learn's handwritten digits; digit >= 5 as the label, thick and "
        "rotated versions as spurious factors) as 8-bit PNGs and the split manifests of `cohort split`: the "
        "input of bundles/mimm_digits.",
    )
    digits.add_argument("--out", type=Path, required=True, help="folder for the images, split manifests and cells.csv")
    digits.add_argument(
        "--correlation", type=shortcut_correlation, default=0.9, metavar="R", help="training correlation of each factor (default: 0.9)"
    )
    digits.add_argument(
        "--confounders",
        type=lambda text: tuple(name.strip() for name in text.split(",")),
        default=("thickness", "rotation"),
        metavar="NAME,...",
        help="factors correlated with the label; the others stay thin and upright (default: thickness,rotation)",
    )
    digits.add_argument("--seed", type=at_least(0), default=0, help="random seed (default: 0)")
    digits.add_argument(
        "--oracle", action="store_true", help="balanced train and val sets (r = 0.5), the oracle's data; test sets at R"
    )
    digits.set_defaults(func=digits_command)

    describe = commands.add_parser(
        "describe",
        help="label counts and primary × factor cross-tabs of a manifest",
        description="Print counts per label and plot the cross-tab of the primary label with each other factor.",
    )
    describe.add_argument("manifest", type=Path, help="manifest to describe")
    describe.add_argument("--primary", help="primary label (default: the first label column)")
    describe.add_argument("--plot", type=Path, help="cross-tab figure, its format by its suffix: .png, .pdf, .svg, ... (default: <manifest>-crosstab.png)")
    describe.set_defaults(func=describe_command)

    locate = commands.add_parser(
        "locate",
        help="print the raw ids and files behind pseudonymous subject ids (the key holder only)",
        description="Recompute the pseudonyms of a raw cohort with its key and print, to the terminal only, the "
        "source id and raw files of the given subjects, of every row of an errors.csv, or the image files that no "
        "metadata row names. The output re-identifies subjects: never store it beside the processed data.",
        epilog="examples:\n"
        "  mimm-med cohort locate --cohort cohorts/ukb.yaml --raw raw/ukb --key-file pseudonym.key "
        "--errors processed/ukb/errors.csv\n"
        "  mimm-med cohort locate --cohort cohorts/ukb.yaml --raw raw/ukb --key-file pseudonym.key "
        "sub-d6721fe505c6f534",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    locate.add_argument("subjects", nargs="*", metavar="SUBJECT_ID", help="pseudonymous subject ids (sub-...)")
    locate.add_argument("--cohort", type=Path, required=True, help="cohort card the outputs were made with")
    locate.add_argument("--raw", type=Path, required=True, help="raw cohort folder the outputs were made from")
    key = locate.add_mutually_exclusive_group()
    key.add_argument("--key-file", type=Path, help="file holding the pseudonymisation key the outputs were made with")
    key.add_argument("--key", help="pseudonymisation key (default: $MIMM_MED_PSEUDONYM_KEY)")
    locate.add_argument("--errors", type=Path, help="locate every row of this errors.csv of `mimm-med preprocess`")
    locate.add_argument("--unlisted", action="store_true", help="list the image files that no metadata row names")
    locate.set_defaults(func=locate_command)


def _fail(command: str, error: Exception | str) -> int:
    print(f"mimm-med cohort {command}: {error}", file=sys.stderr)
    return 2


def generate_command(args: argparse.Namespace) -> int:
    """Run ``mimm-med cohort generate``."""
    from mimm_med.data.manifest import cannot_write
    from mimm_med.data.standins import generate_cohort

    effects = {name: size for pairs in args.effects for name, size in pairs.items()}
    try:
        out = generate_cohort(
            args.kind,
            args.n,
            args.out,
            seed=args.seed,
            effects=effects or None,
            resolution_mm=args.resolution_mm,
            progress=not args.no_progress,
        )
    except ValueError as error:
        return _fail("generate", error)
    except OSError as error:
        return _fail("generate", cannot_write(f"--out {args.out}", error))
    print(f"cohort generate: {args.n} {args.kind} subjects in {out}")
    return 0


def merge_command(args: argparse.Namespace) -> int:
    """Run ``mimm-med cohort merge``."""
    from mimm_med.data.manifest import STATUS, STATUS_OK, ManifestError, cannot_write, merge_manifests, write_manifest

    overwritten = [manifest for manifest in args.manifests if manifest.resolve() == args.out.resolve()]
    if overwritten:  # e.g. a preprocess run's own manifest.csv, which its resume and errors.csv go by
        return _fail(
            "merge", f"--out {args.out} would overwrite the manifest {overwritten[0]} it merges; choose another file"
        )
    try:
        merged = merge_manifests(args.manifests)
    except ManifestError as error:
        return _fail("merge", error)
    try:
        write_manifest(merged, args.out)
    except OSError as error:
        return _fail("merge", cannot_write(f"--out {args.out}", error))
    ok = int((merged[STATUS] == STATUS_OK).sum())
    print(f"cohort merge: {len(args.manifests)} manifests, {len(merged)} images ({ok} ok) → {args.out}")
    return 0


def split_command(args: argparse.Namespace) -> int:
    """Run ``mimm-med cohort split``."""
    from mimm_med.data.confounding import CELL_COUNTS, SPLIT_NAMES, confounded_splits, missed_correlations, write_splits
    from mimm_med.data.manifest import IMAGE, SUBJECT, cannot_write, load_manifest, validate_splits

    if args.primary in args.spurious:
        return _fail("split", f"--primary {args.primary!r} is also in --spurious; a label cannot confound itself")
    outputs = [args.out / f"{name}.csv" for name in SPLIT_NAMES] + [args.out / CELL_COUNTS]
    if any(output.resolve() == args.manifest.resolve() for output in outputs):
        return _fail(
            "split",
            f"--out {args.out} would overwrite --manifest {args.manifest} (it writes {', '.join(o.name for o in outputs)}); "
            "choose another folder",
        )
    try:
        # The sampler draws rows in table order: sorted, a fixed seed gives the same splits of a manifest
        # whose rows were merged or written in another order.
        table = load_manifest(args.manifest).sort_values([SUBJECT, IMAGE], key=lambda column: column.astype(str))
    except ValueError as error:  # ManifestError names the file
        return _fail("split", error)
    if table.empty:
        return _fail(
            "split",
            f"{args.manifest} has no image to split: no row has status 'ok' (the images whose preprocessing failed are "
            "left out; errors.csv beside the manifest gives their reasons)",
        )
    named = [("--primary", args.primary)] + [("--spurious", name) for name in args.spurious]
    missing = [f"{name!r} (given to {flag})" for flag, name in named if name not in table.columns]
    if missing:
        return _fail("split", f"{args.manifest} has no column {', '.join(missing)}; its columns: {list(table.columns)}")
    try:
        splits = confounded_splits(table, args.primary, args.spurious, fractions=args.fractions, seed=args.seed)
        validate_splits(splits)
    except ValueError as error:  # the sampler's errors about labels and fractions
        return _fail("split", f"{args.manifest}: {error}")
    try:
        cells = write_splits(splits, args.out, args.primary, list(args.spurious))
    except OSError as error:
        return _fail("split", cannot_write(f"--out {args.out}", error))
    for name in (name for name, frame in splits.items() if frame.empty):
        pool = name if name in ("train", "val") else "test"  # the test sets share one pool of subjects
        print(
            f"mimm-med cohort split: warning: split {name!r} is empty; use more subjects, a larger {pool} "
            "fraction in --fractions, or --spurious correlations nearer 0.5",
            file=sys.stderr,
        )
    for miss in missed_correlations(cells).itertuples():
        pool = miss.split if miss.split in ("train", "val") else "test"
        print(
            f"mimm-med cohort split: warning: in split {miss.split!r} {miss.factor} agrees with {args.primary} in "
            f"{miss.agreement:.1%} of {miss.images} images, not the requested {miss.requested:.1%}: its {pool} pool "
            "has too few images in the rarest cells (count 0 or near it in the table below); use more subjects, a "
            f"larger {pool} fraction in --fractions, or --spurious correlations nearer 0.5",
            file=sys.stderr,
        )
    print(cells.to_string(index=False))
    sizes = ", ".join(f"{name} {len(frame)}" for name, frame in splits.items())
    unused = len(table) - len(set().union(*(frame[IMAGE] for frame in splits.values())))
    # The sampler keeps only as many images of a common cell as the rare cells allow: say how many it left.
    left = f"; {unused} of the manifest's {len(table)} images are in no split, left out to reach the correlations"
    print(f"cohort split: {sizes} images → {args.out}" + (left if unused else ""))
    return 0


def digits_command(args: argparse.Namespace) -> int:
    """Run ``mimm-med cohort digits``."""
    import pandas as pd

    from mimm_med.data.digits_morpho import write_digits_splits
    from mimm_med.data.manifest import cannot_write

    try:
        out = write_digits_splits(
            args.out, args.correlation, args.confounders, args.seed, train_correlation=0.5 if args.oracle else None
        )
    except ValueError as error:  # unknown confounders, a correlation outside [0, 1]
        return _fail("digits", error)
    except OSError as error:
        return _fail("digits", cannot_write(f"--out {args.out}", error))
    cells = pd.read_csv(out / "cells.csv")
    print(cells.to_string(index=False))
    sizes = cells[cells["factor"] == args.confounders[0]].groupby("split", sort=False)["count"].sum()
    print("cohort digits: " + ", ".join(f"{split} {count}" for split, count in sizes.items()) + f" images → {out}")
    return 0


def _as_factor(values):
    """Quartile bins for a many-valued numeric label (age), the values themselves otherwise; ``missing`` for NaN.

    Missing values are a category of their own: pandas' counts and cross-tabs would drop them, and
    images of no known cohort are what a description should show.
    """
    import pandas as pd

    from mimm_med.data.manifest import MAX_CATEGORIES

    if pd.api.types.is_numeric_dtype(values) and values.nunique() > MAX_CATEGORIES:
        # fewer bins where a value fills more than a quarter (ages top-coded at 90): their edges coincide
        return pd.qcut(values, 4, duplicates="drop")
    if values.isna().any():  # labels are refused with missing values, but ``cohort`` may have them
        return values.astype(str).where(values.notna(), MISSING)
    return values


def describe_command(args: argparse.Namespace) -> int:
    """Run ``mimm-med cohort describe``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd
    from matplotlib.backend_bases import FigureCanvasBase

    from mimm_med.data.manifest import COHORT, ManifestError, cannot_write, label_columns, load_manifest
    from mimm_med.data.writers import atomic_output

    try:
        table = load_manifest(args.manifest)
    except ManifestError as error:
        return _fail("describe", error)
    if table.empty:
        return _fail("describe", ValueError(f"{args.manifest} lists no image with status ok; see errors.csv beside it"))
    factors = [*label_columns(table), COHORT]
    primary = args.primary or factors[0]
    if primary not in factors:
        return _fail("describe", ValueError(f"--primary {primary!r} is not a label of {args.manifest}: {factors}"))
    plot = args.plot or args.manifest.with_name(f"{args.manifest.stem}-crosstab.png")
    kind = plot.suffix[1:].lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if kind not in formats:  # savefig would write a PNG under any name
        return _fail("describe", f"--plot {plot}: name a file ending in one of {', '.join(f'.{f}' for f in formats)}")
    print(f"{args.manifest}: {len(table)} images of {table['subject_id'].nunique()} subjects")
    for name in factors:
        counts = _as_factor(table[name]).value_counts().sort_index()
        print(f"{name}: " + ", ".join(f"{value} {count}" for value, count in counts.items()))

    others = [name for name in factors if name != primary]
    if not others:
        print(f"cohort describe: {args.manifest} has no label columns besides {primary}; no cross-tab to draw")
        return 0
    figure, axes = plt.subplots(1, len(others), figsize=(4 * len(others), 3.5), squeeze=False)
    for axis, name in zip(axes[0], others):
        crosstab = pd.crosstab(_as_factor(table[primary]), _as_factor(table[name]))
        counts = crosstab.to_numpy()
        axis.imshow(counts, cmap="Blues", vmin=0)
        for (i, j), count in np.ndenumerate(counts):
            colour = "white" if count > counts.max() / 2 else "black"
            axis.text(j, i, str(count), ha="center", va="center", color=colour)
        axis.set(xticks=range(crosstab.shape[1]), yticks=range(crosstab.shape[0]), xlabel=name, ylabel=primary)
        axis.set_xticklabels(crosstab.columns, rotation=30, ha="right")
        axis.set_yticklabels(crosstab.index)
    figure.tight_layout()
    try:
        with atomic_output(plot) as tmp:
            figure.savefig(tmp, format=kind, dpi=100)
    except OSError as error:
        return _fail("describe", cannot_write(f"--plot {plot}", error))
    finally:
        plt.close(figure)
    print(f"cohort describe: cross-tabs of {primary} × {', '.join(others)} → {plot}")
    return 0


def _read_errors(path: Path, key_fingerprint: str):
    """The rows of a preprocess ``errors.csv``, checked to be made with the key of ``key_fingerprint``."""
    import pandas as pd

    from mimm_med.data.manifest import recorded_key_fingerprint

    try:
        errors = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise ValueError(f"--errors {path} cannot be read ({error}); pass the errors.csv of a preprocess run") from None
    missing = [c for c in ("subject_id", "file", "reason") if c not in errors.columns]
    if missing:
        raise ValueError(f"--errors {path} lacks column(s) {missing}; pass the errors.csv of a preprocess run")
    record, recorded = recorded_key_fingerprint(path)
    if recorded is not None and recorded != key_fingerprint:
        raise ValueError(
            f"{path} was made with another pseudonymisation key (see the fingerprint in {record}); "
            "pass the key its preprocess run was given"
        )
    return errors


def locate_command(args: argparse.Namespace) -> int:
    """Run ``mimm-med cohort locate``: print what is identifying to stdout, never to a file."""
    from mimm_med.data.cohort_card import CardError, CohortCard
    from mimm_med.data.preprocess import subject_sources, unmask_file
    from mimm_med.data.pseudonym import Pseudonymiser, PseudonymKeyError, resolve_key

    if sum((bool(args.subjects), args.errors is not None, args.unlisted)) != 1:
        return _fail("locate", "give one of: SUBJECT_ID ..., --errors errors.csv, or --unlisted")
    try:
        pseudonymiser = Pseudonymiser(resolve_key(args.key, args.key_file))
        scan = CohortCard.from_yaml(args.cohort).scan(args.raw)
        errors = _read_errors(args.errors, pseudonymiser.key_fingerprint) if args.errors else None
    except (PseudonymKeyError, CardError, ValueError) as error:
        return _fail("locate", error)
    if not sys.stdout.isatty():
        print("mimm-med cohort locate: this output names subjects by their source ids; "
              "keep it apart from the processed data", file=sys.stderr)
    raw_dir = args.raw.resolve()
    sources = subject_sources((scan.records, scan.problems, scan.unlisted), pseudonymiser)
    unknown = []
    if args.unlisted:
        for row in scan.unlisted.to_dict("records"):
            subject = pseudonymiser.subject(row["cohort"], row["source_id"]) if row["source_id"] else "-"
            print(f"{subject}\t{row['source_id'] or '-'}\t{row['image']}")
    for subject in args.subjects:
        if subject not in sources:
            unknown.append(subject)
            continue
        source_id, images = sources[subject]
        for image in images or ["-"]:
            print(f"{subject}\t{source_id}\t{image}")
    for row in [] if errors is None else errors.to_dict("records"):
        subject, shown = row["subject_id"], row["file"]
        if not subject:  # a metadata row without an id: its reason names the table and line
            print(f"-\t-\t{raw_dir / shown if shown else '-'}\t{row['reason']}")
        elif subject not in sources:
            unknown.append(subject)
        else:
            source_id, images = sources[subject]
            print(f"{subject}\t{source_id}\t{unmask_file(shown, subject, source_id, raw_dir, images) if shown else '-'}"
                  f"\t{row['reason']}")
    if unknown:
        return _fail(
            "locate",
            f"{len(unknown)} subject id(s) match no subject of {args.cohort} in --raw {args.raw} under this key: "
            f"{', '.join(dict.fromkeys(unknown))}; pass the key, card and raw folder the outputs were made with",
        )
    return 0
