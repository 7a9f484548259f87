"""Argument checks shared by modules whose settings may come from a JSON or YAML config."""

from __future__ import annotations

import math
import numbers
from typing import Any


def is_whole_number(value: Any, minimum: int | None = None) -> bool:
    """True for a whole number of at least ``minimum``: an integer (NumPy's too) or an integral float.

    Integral floats pass because configs written by hand or by YAML give ``16.0`` for ``16``; bools,
    strings, NaN, infinities and ``2.5`` do not.

    Examples
    --------
    >>> is_whole_number(16.0), is_whole_number(True), is_whole_number(0, minimum=1)
    (True, False, False)
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return False
    return float(value).is_integer() and (minimum is None or bool(value >= minimum))
