"""Argument checks shared by modules whose settings may come from a JSON or YAML config."""

from __future__ import annotations

import math
import numbers
from typing import Any


def _is_finite_number(value: Any) -> bool:
    """A finite real number, NumPy's too; bools are no numbers to a user."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def is_whole_number(value: Any, minimum: int | None = None) -> bool:
    """True for a whole number of at least ``minimum``: an integer (NumPy's too) or an integral float.

    Integral floats pass because configs written by hand or by YAML give ``16.0`` for ``16``; bools,
    strings, NaN, infinities and ``2.5`` do not.

    Examples
    --------
    >>> is_whole_number(16.0), is_whole_number(True), is_whole_number(0, minimum=1)
    (True, False, False)
    """
    if not _is_finite_number(value):
        return False
    return float(value).is_integer() and (minimum is None or bool(value >= minimum))


def check_positive(value: Any, name: str, whole: bool = False, axes: int | None = None) -> Any:
    """Return ``value``, one number or one per axis, if each is positive (and whole, if ``whole``); else raise.

    MONAI reads an edge or a spacing of 0 or below as "keep the image's own", which leaves every
    output at its own shape or resolution instead of the one grid that a network takes, and it
    refuses a list of another length than ``axes`` only image by image.

    Raises
    ------
    ValueError
        Naming the setting, the value and what it must be.

    Examples
    --------
    >>> check_positive([96, 96, 96], "spatial_size", whole=True, axes=3)
    [96, 96, 96]
    """
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if whole:
        fine = [is_whole_number(item, minimum=1) for item in items]
    else:
        fine = [_is_finite_number(item) and item > 0 for item in items]
    kind = "whole numbers of at least 1" if whole else "positive numbers"
    if not items or not all(fine):
        raise ValueError(
            f"{name} must be {kind}, got {value!r}: MONAI would read 0 or below as each image's own "
            f"{'size' if whole else 'spacing'}, so that the outputs would not share one grid"
        )
    if axes is not None and isinstance(value, (list, tuple)) and len(items) != axes:
        raise ValueError(f"{name} must be one number or {axes}, one per spatial axis, got {len(items)}: {value!r}")
    return value


def check_setting(
    value: Any,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    whole: bool = False,
    above: bool = False,
) -> Any:
    """Return the number ``value`` of the setting ``name`` if it is in range; else raise, naming ``--name``.

    For a bundle's ``initialize``: PyTorch, MONAI and the engines check these only once the datasets
    are loaded and cached (minutes of a brain cohort), and PyTorch's ``Invalid learning rate: -1``
    names none of ``lr``, ``critic_lr`` and ``gradnorm_lr``.

    Parameters
    ----------
    minimum, maximum
        The bounds, inclusive (``minimum`` exclusive if ``above``); ``None``: none.
    whole
        A whole number (:func:`is_whole_number`), e.g. a count of epochs.

    Raises
    ------
    ValueError
        Naming the setting, the value and what it must be.

    Examples
    --------
    >>> check_setting(20, "epochs", minimum=1, whole=True)
    20
    """
    fine = is_whole_number(value) if whole else _is_finite_number(value)
    if fine and minimum is not None:
        fine = bool(value > minimum) if above else bool(value >= minimum)
    if fine and maximum is not None:
        fine = bool(value <= maximum)
    if not fine:
        kind = "a whole number" if whole else "a finite number"
        bounds = [f"{'>' if above else '>='} {minimum}"] if minimum is not None else []
        bounds += [f"<= {maximum}"] if maximum is not None else []
        rule = f"{kind} {' and '.join(bounds)}" if bounds else kind
        raise ValueError(f"{name} must be {rule}, got {value!r}: give --{name} {rule}")
    return value


def as_flag(value: Any, name: str) -> bool:
    """``value`` of the on/off setting ``name`` as a bool, whether a config or the command line gave it.

    ``python -m monai.bundle run`` reads ``--invariant_head False`` as a bool but ``--invariant_head
    false`` as the string ``"false"``, which Python takes for true; both spellings count here.

    Raises
    ------
    ValueError
        For anything but a bool, 0 / 1, or ``true`` / ``false`` in any case.

    Examples
    --------
    >>> as_flag("false", "invariant_head"), as_flag(True, "invariant_head")
    (False, True)
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} is an on/off setting: give true or false (e.g. --{name} false), got {value!r}")


def check_shortcut_correlation(r: float) -> float:
    """Return ``r`` if it sets up a shortcut to test, 0.5 < r < 1; else raise a ``ValueError`` saying why.

    At 0.5 the inverted test set (1 - r) is the balanced one; at 1 no training subject disagrees, so
    no cell-balanced weight or rebalancing exists; below 0.5 the factor agrees with the other value
    of y, which is r' = 1 - r with the values swapped.
    """
    if not 0.5 < r < 1.0:  # also refuses NaN
        raise ValueError(
            f"a shortcut correlation lies strictly between 0.5 and 1, got {r}: at 0.5 the inverted test set is the "
            "balanced one, at 1 no training subject disagrees, and r below 0.5 is 1 - r with the factor's values swapped"
        )
    return r


def check_device(device: Any) -> Any:
    """Return ``torch.device(device)`` if this process can use it; else raise a ``ValueError`` saying what can.

    Torch's own errors arrive late (after data preparation, inside an engine) and as an
    ``AssertionError: Torch not compiled with CUDA enabled`` that names no setting.
    """
    import torch  # here, so that building the command-line parser stays fast

    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{device!r} is not a torch device; give one such as cpu, cuda or cuda:1") from None
    if checked.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(f"device {device!r}: this process sees no CUDA device (torch {torch.__version__}, {build}); use cpu")
        if checked.index is not None and checked.index >= count:
            raise ValueError(f"device {device!r}: this process sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return checked
