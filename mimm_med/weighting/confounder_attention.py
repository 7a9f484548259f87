"""Confounder attention: weights for combining several per-factor MI terms (MIMM-X)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ConfounderAttention"]


class ConfounderAttention(nn.Module):
    """Softmax weights over spurious factors, favouring the factor that leaks most into ``f_y``.

    The MI terms of MIMM-X are combined as ``sum_k a_k * I_k`` with
    ``a = softmax(stopgrad(I_ema) / temperature)``, where ``I_ema`` is an exponential moving
    average of the per-pair MI estimates. The weights never carry gradient, so the encoder is
    pushed on each ``I_k`` with the constant factor ``a_k``. ``temperature=float("inf")`` gives
    the uniform weights ``1 / K`` of plain MIMM. mimm-med defines this mechanism itself: the
    MIMM-X paper names it without publishing its equations.

    The moving average and its "initialised" flag are buffers, so they are saved in
    ``state_dict`` and a resumed run continues from the same weights.

    Parameters
    ----------
    names
        Names of the spurious factors, in the order of the estimates passed to ``forward``.
    temperature
        Softmax temperature ``tau > 0``; ``float("inf")`` for uniform weights.
    momentum
        EMA momentum in ``[0, 1)``: ``I_ema <- momentum * I_ema + (1 - momentum) * I``.
        The first update sets ``I_ema`` to the first estimate.

    Examples
    --------
    The MI estimates of f_y with f_sex, f_age and f_scanner (from ``MINE`` critics in training):

    >>> attention = ConfounderAttention(["sex", "age", "scanner"], temperature=0.5)
    >>> estimates = torch.tensor([0.10, 0.80, 0.30])
    >>> mi_term = (attention(estimates) * estimates).sum()
    >>> {name: round(weight, 3) for name, weight in attention.weights_by_name().items()}
    {'sex': 0.153, 'age': 0.619, 'scanner': 0.228}
    """

    ema: torch.Tensor
    initialized: torch.Tensor

    def __init__(self, names: Sequence[str], temperature: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        if isinstance(names, str):
            # tuple("sex") would make three factors 's', 'e', 'x'
            raise ValueError(f"names must be a sequence of factor names, got the string {names!r}; pass [{names!r}]")
        names = tuple(names)
        if not names:
            raise ValueError("ConfounderAttention needs at least one factor name; got an empty list.")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"ConfounderAttention factor names must be unique; repeated: {duplicates}.")
        if math.isnan(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be > 0 (float('inf') for uniform weights); got {temperature}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1); got {momentum}.")
        self.names = names
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.register_buffer("ema", torch.zeros(len(names)))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, estimates: torch.Tensor) -> torch.Tensor:
        """Update the EMA with ``estimates`` (training mode only) and return the weights ``(K,)``.

        Parameters
        ----------
        estimates
            Per-factor MI estimates ``(K,)`` in the order of ``names``; may require grad.

        Returns
        -------
        torch.Tensor
            Weights ``(K,)`` summing to one, without gradient, in the dtype of ``estimates`` (float32
            for integer ones).
        """
        self._check(estimates)
        if self.training:
            self._update(estimates.detach().to(self.ema.dtype))
        # integer estimates would truncate the weights to 0
        dtype = estimates.dtype if estimates.is_floating_point() else self.ema.dtype
        return self._weights().to(dtype=dtype, device=estimates.device)

    def weights_by_name(self) -> dict[str, float]:
        """Current weights keyed by factor name, for logging; does not update the EMA."""
        return dict(zip(self.names, self._weights().tolist()))

    def _check(self, estimates: torch.Tensor) -> None:
        if estimates.shape != (len(self.names),):
            raise ValueError(
                f"ConfounderAttention expects one MI estimate per factor {list(self.names)}, "
                f"i.e. shape ({len(self.names)},); got shape {tuple(estimates.shape)}."
            )
        finite = torch.isfinite(estimates.detach())
        if not bool(finite.all()):
            bad = [name for name, ok in zip(self.names, finite.tolist()) if not ok]
            raise ValueError(
                f"Non-finite MI estimate for factor(s) {bad}: check that critic's learning rate "
                "and use float32 for the critic under AMP."
            )

    @torch.no_grad()
    def _update(self, estimates: torch.Tensor) -> None:
        if bool(self.initialized):
            self.ema.mul_(self.momentum).add_(estimates, alpha=1.0 - self.momentum)
        else:
            self.ema.copy_(estimates)
            self.initialized.fill_(True)

    def _weights(self) -> torch.Tensor:
        if math.isinf(self.temperature):
            return torch.full_like(self.ema, 1.0 / len(self.names))
        # Shifted by the maximum, whose logit stays 0 even where a tiny temperature rounds to 0 in
        # float32: the others go to -inf instead of the whole softmax turning NaN.
        shifted = self.ema - self.ema.max()
        return torch.softmax(torch.where(shifted == 0, shifted, shifted / self.temperature), dim=0)

    def extra_repr(self) -> str:
        return f"names={list(self.names)}, temperature={self.temperature}, momentum={self.momentum}"
