"""mimm-med: mutual-information minimization (MIMM, MIMM-X) for shortcut-free medical imaging on MONAI."""

__version__ = "0.1.0"
