"""The training methods one trainer covers, parsed from one string such as ``"dcor+rebalance"``."""

from __future__ import annotations

from dataclasses import dataclass

PENALTY_METHODS: tuple[str, ...] = ("adversarial", "dcor", "mmd", "mimm", "mimmx")
METHODS: tuple[str, ...] = (
    "erm",
    "rebalance",
    *PENALTY_METHODS,
    *(f"{name}+rebalance" for name in PENALTY_METHODS),
)


@dataclass(frozen=True)
class MethodSpec:
    """What a method switches on.

    Attributes
    ----------
    name
        The method string, e.g. ``"mimmx"`` or ``"dcor+rebalance"``.
    penalty
        ``None`` (ERM) or one of :data:`PENALTY_METHODS`.
    rebalance
        Resample training data to equal (y, z) cells.
    factor_heads
        Train the spurious heads on their labels (MIMM, MIMM-X); other methods train only the primary head.
    attention, adaptive_scaling, gradnorm
        MIMM-X's confounder attention, MI gradient clipping and GradNorm task balancing.
    """

    name: str
    penalty: str | None
    rebalance: bool
    factor_heads: bool
    attention: bool
    adaptive_scaling: bool
    gradnorm: bool


def parse_method(name: str) -> MethodSpec:
    """Parse a method string; see :data:`METHODS`.

    Examples
    --------
    >>> parse_method("mmd+rebalance").rebalance
    True
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {list(METHODS)}")
    base, _, suffix = name.partition("+")
    rebalance = base == "rebalance" or suffix == "rebalance"
    penalty = base if base in PENALTY_METHODS else None
    mimmx = penalty == "mimmx"
    return MethodSpec(
        name=name,
        penalty=penalty,
        rebalance=rebalance,
        factor_heads=penalty in ("mimm", "mimmx"),
        attention=mimmx,
        adaptive_scaling=mimmx,
        gradnorm=mimmx,
    )
