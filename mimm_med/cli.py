"""The ``mimm-med`` command: one entry point, one module per sub-command under :mod:`mimm_med.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mimm_med.checks import check_device, check_shortcut_correlation
from mimm_med.data.notices import quiet_gpu_decoder_notices
from mimm_med.interruption import terminate_as_interrupt

# Each module defines ``add_parser(subparsers)`` which registers its sub-command and sets ``func``.
COMMAND_MODULES: tuple[str, ...] = ("cohort", "preprocess", "registry", "demo", "benchmark")


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for whole numbers of at least ``minimum``, e.g. ``--workers`` or ``--seed``."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return whole_number


def shortcut_correlation(text: str) -> float:
    """An argparse ``type`` for a training correlation r, 0.5 < r < 1 (:func:`mimm_med.checks.check_shortcut_correlation`)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.9, got {text!r}") from None
    try:
        return check_shortcut_correlation(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def torch_device(text: str) -> str:
    """An argparse ``type`` for a torch device this process can use (:func:`mimm_med.checks.check_device`).

    Returned as torch spells it, ``cpu:0`` as ``cpu`` (torch has one CPU device), so that one device
    is recorded under one name: a benchmark cell stored for ``cpu`` is reused by ``--device cpu:0``.
    """
    try:
        checked = check_device(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return checked.type if checked.type == "cpu" else str(checked)


def output_file(text: str) -> Path:
    """An argparse ``type`` for a file to write at the end of a long run, e.g. ``--json out.json``.

    Refused at once when it names a folder, rather than after hours of training.
    """
    path = Path(text)
    if path.is_dir() or text.endswith(("/", "\\")):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; name a file in it, e.g. {str(path / 'results.json')!r}")
    return path


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="mimm-med",
        description="Train and evaluate shortcut-free medical-imaging models (MIMM / MIMM-X on MONAI).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"mimm_med.commands.{name}").add_parser(subparsers)
    return parser


#: Exit status of a command stopped by Ctrl-C or SIGTERM (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mimm-med`` with ``argv`` and return its exit status (:data:`EXIT_INTERRUPTED` if stopped)."""
    quiet_gpu_decoder_notices()
    args = build_parser().parse_args(argv)
    with terminate_as_interrupt():
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            print(f"mimm-med {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


def run_subcommand(argv: Sequence[str], allowed: tuple[int, ...] = (0,)) -> int:
    """Run a ``mimm-med`` sub-command in this process and return its status.

    Raises
    ------
    SystemExit
        With a message naming the command when its exit status is not in ``allowed``.
    KeyboardInterrupt
        When the sub-command was stopped by Ctrl-C or SIGTERM: the caller stops as its own would stop it.
    """
    status = main(argv)
    if status == EXIT_INTERRUPTED:
        raise KeyboardInterrupt
    if status not in allowed:
        raise SystemExit(f"mimm-med {' '.join(argv)} exited with {status}")
    return status


def subcommand_folder(folder: Path, argv: Sequence[str], resume: bool = False, allowed: tuple[int, ...] = (0,)) -> Path:
    """``folder``, written by the sub-command ``argv`` (given ``--out``) unless a completed one exists.

    The sub-command writes to a partial folder, renamed when it succeeds
    (:func:`~mimm_med.data.writers.completed_folder`): a run stopped midway never leaves ``folder``
    half-made for the next to take as whole. ``resume`` hands a stopped run's partial folder to the
    next one (``preprocess`` skips the images it finished).
    """
    from mimm_med.data.writers import completed_folder

    return completed_folder(folder, lambda partial: run_subcommand([*argv, "--out", str(partial)], allowed), resume)


if __name__ == "__main__":
    sys.exit(main())
