"""The ``mimm-med`` command: one entry point, one module per sub-command under :mod:`mimm_med.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Sequence

# Each module defines ``add_parser(subparsers)`` which registers its sub-command and sets ``func``.
COMMAND_MODULES: tuple[str, ...] = ("cohort", "preprocess", "registry", "demo", "benchmark")


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


def quiet_gpu_decoder_notices() -> None:
    """Silence MONAI's notices that the GPU DICOM decoder (nvImageCodec) is missing.

    Every ``LoadImage`` registers all of MONAI's readers, whatever reader it is given, so each run
    on a machine without nvImageCodec prints them although pydicom's own decoders do the work.
    """
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mimm-med`` with ``argv`` and return its exit status."""
    quiet_gpu_decoder_notices()
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def run_subcommand(argv: Sequence[str], allowed: tuple[int, ...] = (0,)) -> int:
    """Run a ``mimm-med`` sub-command in this process and return its status.

    Raises
    ------
    SystemExit
        With a message naming the command when its exit status is not in ``allowed``.
    """
    status = main(argv)
    if status not in allowed:
        raise SystemExit(f"mimm-med {' '.join(argv)} exited with {status}")
    return status


if __name__ == "__main__":
    sys.exit(main())
