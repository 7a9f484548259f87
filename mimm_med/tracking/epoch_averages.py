"""Epoch means of a trainer's per-iteration output dict, for MLflow and for plots."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from mimm_med.distributed import world_size

__all__ = ["EpochAverages"]


class EpochAverages:
    """Average ``engine.state.output`` (a flat dict of floats) over each epoch.

    The running means are written to ``engine.state.metrics`` as ``f"{prefix}{key}"`` after every
    iteration, so by ``EPOCH_COMPLETED`` they hold the epoch's means whatever the order of the
    handlers: MONAI's ``MLFlowHandler`` (``epoch_log``) and ``StatsHandler`` then log every loss, MI
    estimate and confounder weight per epoch. :attr:`history` keeps one dict per epoch for plots.
    NaN values (e.g. ``critic_loss`` of a method without critics) are left out of the means.

    Put it in the checkpoint dict (``state_dict`` / ``load_state_dict``) so a resumed run keeps its
    history, also when resumed in the middle of an epoch. Under ``torch.distributed`` the means are
    over every rank's iterations (each rank's loss is of its part of the global batch), the same on
    every rank, so rank 0's checkpoint resumes them all; attach it on every rank.

    Parameters
    ----------
    prefix
        Prepended to every key in ``engine.state.metrics``.

    Examples
    --------
    An engine whose iterations output a loss, and a critic loss that is NaN (no critics):

    >>> from ignite.engine import Engine
    >>> trainer = Engine(lambda engine, batch: {"loss": batch / engine.state.epoch, "critic_loss": float("nan")})
    >>> averages = EpochAverages()
    >>> averages.attach(trainer)
    >>> _ = trainer.run([1.0, 3.0], max_epochs=2)
    >>> averages.history
    [{'epoch': 1, 'loss': 2.0}, {'epoch': 2, 'loss': 1.0}]
    >>> trainer.state.metrics
    {'train/loss': 1.0}
    """

    def __init__(self, prefix: str = "train/") -> None:
        self.prefix = prefix
        self.history: list[dict[str, float]] = []
        self._epoch = 0
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def attach(self, engine: Engine) -> None:
        """Update the means after every iteration of ``engine``."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        if not isinstance(output, Mapping):
            raise TypeError(
                f"EpochAverages needs engine.state.output to be a dict of floats, got {type(output).__name__}; "
                "attach it to a MIMMXTrainer (or an engine whose iteration returns such a dict)."
            )
        # Epochs are told apart by number rather than by EPOCH_STARTED, which a resumed run may skip.
        if engine.state.epoch != self._epoch:
            self._epoch = engine.state.epoch
            self._sums, self._counts = {}, {}
        for key, (total, count) in _summed_over_ranks({key: _as_float(key, value) for key, value in output.items()}).items():
            if count > 0:
                self._sums[key] = self._sums.get(key, 0.0) + total
                self._counts[key] = self._counts.get(key, 0) + count
        means = {key: total / self._counts[key] for key, total in self._sums.items()}
        engine.state.metrics.update({self.prefix + key: mean for key, mean in means.items()})
        if self.history and self.history[-1]["epoch"] == self._epoch:
            self.history[-1] = {"epoch": self._epoch, **means}
        else:
            self.history.append({"epoch": self._epoch, **means})

    def state_dict(self) -> dict[str, Any]:
        """History and the running sums of the current epoch."""
        return {
            "history": [dict(entry) for entry in self.history],
            "epoch": self._epoch,
            "sums": dict(self._sums),
            "counts": dict(self._counts),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.history = [dict(entry) for entry in state_dict["history"]]
        self._epoch = int(state_dict["epoch"])
        self._sums = dict(state_dict["sums"])
        self._counts = dict(state_dict["counts"])


def _summed_over_ranks(values: Mapping[str, float]) -> dict[str, tuple[float, int]]:
    """``{key: (sum, count)}`` of the non-NaN ``values`` over every rank (this process's alone without a process group)."""
    sums = torch.tensor([[0.0, 0.0] if math.isnan(value) else [value, 1.0] for value in values.values()], dtype=torch.float64)
    if world_size() > 1:
        # every rank outputs the same keys (one method, one objective); ignite moves the tensor to NCCL's device
        sums = idist.all_reduce(sums)
    return {key: (float(total), int(count)) for key, (total, count) in zip(values, sums.tolist())}


def _as_float(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"engine.state.output[{key!r}] is {type(value).__name__}, not a number") from None
