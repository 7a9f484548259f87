"""Correlated Gaussians: data whose mutual information is known exactly, to check estimators."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["correlated_gaussians"]


def correlated_gaussians(
    n: int, dim: int, mi_nats: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Draw ``n`` samples of a, b ∈ R^dim with I(a; b) = ``mi_nats`` exactly.

    The coordinates form ``dim`` independent standard-normal pairs (a_k, b_k) of correlation ρ,
    and I = −(dim/2)·log(1 − ρ²), so ρ = sqrt(1 − exp(−2·I/dim)).

    Parameters
    ----------
    n
        Number of samples.
    dim
        Size of a and of b.
    mi_nats
        The mutual information I(a; b) in nats (>= 0).
    generator
        Random source; its device is the device of the samples.

    Examples
    --------
    >>> a, b = correlated_gaussians(1000, 8, 2.0, torch.Generator().manual_seed(0))
    >>> a.shape, b.shape
    (torch.Size([1000, 8]), torch.Size([1000, 8]))
    """
    if not mi_nats >= 0:
        raise ValueError(f"mutual information must be >= 0 nats, got mi_nats={mi_nats}")
    if dim < 1:
        raise ValueError(f"dim must be at least 1, got {dim}")
    rho = math.sqrt(1.0 - math.exp(-2.0 * mi_nats / dim))
    device = generator.device if generator is not None else None
    a = torch.randn(n, dim, generator=generator, device=device)
    noise = torch.randn(n, dim, generator=generator, device=device)
    return a, rho * a + math.sqrt(1.0 - rho * rho) * noise
