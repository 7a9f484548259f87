"""The contract every mutual-information estimator follows, and the pieces they share."""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mimm_med.checks import is_whole_number
from mimm_med.distributed import world_size

__all__ = ["ContrastPairs", "MutualInformationEstimator", "PairScoreEstimator", "gather_batch", "standardize"]


class ContrastPairs:
    """Which pairs (i, j) of a batch are contrasted against the positives (i, i), and with what weight.

    Negatives are the pairs i ≠ j within the same stratum (all of them when ``strata`` is None).
    Anchors are the samples of positive weight with a partner of positive weight in their stratum;
    the others are left out of both the positive and the negative term (and of the standardization
    of :class:`PairScoreEstimator`), so both expectations run over the same distribution of strata,
    and a weight of 0 leaves a sample out as if it were not in the batch. Anchor i counts with its
    sample weight w_i, and its negatives j with w_j / Σ_{j'} w_j' over its partners: the negative
    term is an expectation under q(s)·q(a|s)·q(b|s), the product of marginals that defines the
    conditional MI I(a; b | s) under the weighted distribution q (the empirical one when all
    weights are equal).

    Parameters
    ----------
    strata
        ``(B,)`` integer stratum per sample, or None for one stratum.
    batch_size
        B.
    device
        Where the masks live.
    weights
        ``(B,)`` non-negative sample weights, or None for equal weights. Importance weights
        1 / count(y, z) make q the cell-balanced distribution, in which y and z are independent.

    Examples
    --------
    >>> pairs = ContrastPairs(torch.tensor([0, 0, 1]), 3, torch.device("cpu"))
    >>> pairs.anchors.tolist()
    [True, True, False]
    """

    def __init__(
        self, strata: Tensor | None, batch_size: int, device: torch.device, weights: Tensor | None = None
    ) -> None:
        if strata is None:
            same = torch.ones(batch_size, batch_size, dtype=torch.bool, device=device)
        else:
            same = strata[:, None] == strata[None, :]
        weights = torch.ones(batch_size, device=device) if weights is None else weights.float()
        self.same_stratum = same
        self.negatives = same & ~torch.eye(batch_size, dtype=torch.bool, device=device)
        partner_weight = (self.negatives * weights[None, :]).sum(dim=1)
        # A zero-weight sample is outside the weighted distribution: no anchor, though it may have partners.
        self.anchors = (partner_weight > 0) & (weights > 0)
        self.anchor_weight = weights * self.anchors
        self.total_weight = self.anchor_weight.sum()
        log_pair = self.anchor_weight.log()[:, None] + weights.log()[None, :] - partner_weight.clamp_min(1e-30).log()[:, None]
        self.log_weight = torch.where(self.negatives & self.anchors[:, None], log_pair, -math.inf)
        self.log_column_weight = weights.log()[None, :].expand(batch_size, batch_size)

    def mean_positive(self, scores: Tensor) -> Tensor:
        """Weighted mean of the anchors' positive scores S_ii."""
        return (scores.diagonal() * self.anchor_weight).sum() / self.total_weight

    def mean_negative(self, scores: Tensor) -> Tensor:
        """Weighted mean of the negative scores S_ij."""
        return (scores * self.log_weight.exp()).sum() / self.total_weight

    def log_mean_exp_negative(self, scores: Tensor) -> Tensor:
        """log of the weighted mean of exp(S_ij) over the negatives, computed stably."""
        return torch.logsumexp((scores + self.log_weight).flatten(), dim=0) - self.total_weight.log()

    def log_mean_exp_stratum(self, scores: Tensor) -> Tensor:
        """``(B,)``: per row i, log of the w_j-weighted mean of exp(S_ij) over j in i's stratum, j = i included."""
        log_weights = self.log_column_weight.masked_fill(~self.same_stratum, -math.inf)
        return torch.logsumexp(scores + log_weights, dim=1) - torch.logsumexp(log_weights, dim=1)

    def mean_over_anchors(self, values: Tensor) -> Tensor:
        """Weighted mean of a per-sample ``(B,)`` tensor over the anchors."""
        return (values * self.anchor_weight).sum() / self.total_weight


def standardize(x: Tensor, rows: Tensor | None = None) -> Tensor:
    """Zero mean, unit variance per column, with statistics over ``rows`` (a boolean mask; all by default).

    Columns with a standard deviation below 1e-3 are divided by 1e-3, so a collapsed feature is not
    blown up into noise.
    """
    reference = x if rows is None else x[rows]
    if reference.shape[0] < 2:
        return x - reference.mean(dim=0, keepdim=True) if reference.shape[0] else x
    mean = reference.mean(dim=0, keepdim=True)
    return (x - mean) / reference.std(dim=0, keepdim=True).clamp_min(1e-3)


def gather_batch(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Concatenate each tensor's rows over all ranks, in rank order, keeping gradients.

    Without an initialized process group of more than one rank the tensors come back unchanged.
    Local batch sizes may differ: rows are padded to the longest batch for the collective and cut
    back afterwards. Every rank must pass the same number of tensors.

    The backward of the gather sums, over ranks, the gradients each rank's (identical) loss sends
    to a rank's rows. DDP then averages parameter gradients over ranks, so the encoder receives
    exactly the gradient of the global-batch estimate.

    Examples
    --------
    >>> a, = gather_batch(torch.ones(4, 2))  # no process group: unchanged
    >>> a.shape
    torch.Size([4, 2])
    """
    if world_size() == 1:
        return tensors
    device = tensors[0].device
    local = tensors[0].shape[0]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local], dtype=torch.long, device=device))
    sizes_list = [int(size) for size in sizes]
    longest = max(sizes_list)
    gathered = []
    for tensor in tensors:
        padding = tensor.new_zeros((longest - local, *tensor.shape[1:]))
        with warnings.catch_warnings():
            # Deprecated in favour of a private module without gloo support; this one works on every backend.
            warnings.simplefilter("ignore", FutureWarning)
            chunks = torch.distributed.nn.functional.all_gather(torch.cat([tensor, padding]))
        gathered.append(torch.cat([chunk[:size] for chunk, size in zip(chunks, sizes_list)]))
    return tuple(gathered)


class MutualInformationEstimator(nn.Module, ABC):
    """Estimate I(a; b) (or I(a; b | s)) of a batch, in nats.

    ``est(a, b, strata=None, weights=None)`` returns the estimate as a scalar, differentiable w.r.t.
    ``a`` and ``b`` (an encoder minimizes it); ``est.critic_loss(a, b, strata=None, weights=None)``
    returns the loss that trains the estimator's own parameters only (``a`` and ``b`` are detached). With
    ``strata`` the estimate is the conditional MI given the stratum; ``weights`` make it the MI under
    the weighted distribution of the batch (see :class:`ContrastPairs`).

    The maths runs in float32 with autocast disabled, because logsumexp, exp and log-determinants
    lose their precision in float16. Under ``torch.distributed`` with several ranks the estimate is
    that of the global batch (:func:`gather_batch`), so every rank gets the same value.

    Subclasses implement :meth:`estimate` and :meth:`estimator_loss` on the gathered float32 batch.
    """

    def __init__(self, dim_a: int, dim_b: int) -> None:
        super().__init__()
        if not (is_whole_number(dim_a, minimum=1) and is_whole_number(dim_b, minimum=1)):
            raise ValueError(f"feature sizes must be positive integers, got dim_a={dim_a!r}, dim_b={dim_b!r}")
        self.dim_a = int(dim_a)
        self.dim_b = int(dim_b)

    @abstractmethod
    def estimate(self, a: Tensor, b: Tensor, strata: Tensor | None, weights: Tensor | None) -> Tensor:
        """The MI estimate of a checked, gathered float32 batch."""

    @abstractmethod
    def estimator_loss(self, a: Tensor, b: Tensor, strata: Tensor | None, weights: Tensor | None) -> Tensor:
        """The estimator's training loss on a checked, gathered float32 batch."""

    def forward(
        self, a: Tensor, b: Tensor, strata: Tensor | None = None, weights: Tensor | None = None
    ) -> Tensor:
        """MI estimate in nats of the batch (a, b), conditional on ``strata`` and under ``weights`` when given."""
        return self._evaluate(self.estimate, a, b, strata, weights)

    def critic_loss(
        self, a: Tensor, b: Tensor, strata: Tensor | None = None, weights: Tensor | None = None
    ) -> Tensor:
        """Loss to minimize over the estimator's parameters; no gradient reaches ``a`` or ``b``."""
        # Detached here: a backward through undetached features would push the encoder to *raise* the MI.
        return self._evaluate(self.estimator_loss, a.detach(), b.detach(), strata, weights)

    def _evaluate(
        self,
        reduce: Callable[[Tensor, Tensor, Tensor | None, Tensor | None], Tensor],
        a: Tensor,
        b: Tensor,
        strata: Tensor | None,
        weights: Tensor | None,
    ) -> Tensor:
        self._check_inputs(a, b, strata, weights)
        optional = [t for t in (strata, weights) if t is not None]
        a, b, *rest = gather_batch(a, b, *optional)
        strata = rest.pop(0) if strata is not None else None
        weights = rest.pop(0) if weights is not None else None
        with torch.autocast(device_type=a.device.type, enabled=False):
            return reduce(a.float(), b.float(), strata, weights)

    def _check_inputs(self, a: Tensor, b: Tensor, strata: Tensor | None, weights: Tensor | None = None) -> None:
        expected = f"expected a of shape (B, {self.dim_a}) and b of shape (B, {self.dim_b})"
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != self.dim_a or b.shape[1] != self.dim_b:
            raise ValueError(f"{expected}, got a {tuple(a.shape)} and b {tuple(b.shape)}")
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"a and b must hold the same samples, got a {tuple(a.shape)} and b {tuple(b.shape)}")
        if strata is not None and (strata.shape != (a.shape[0],) or strata.is_floating_point()):
            raise ValueError(
                f"strata must be an integer tensor of shape ({a.shape[0]},) for a {tuple(a.shape)}, "
                f"got {strata.dtype} {tuple(strata.shape)}"
            )
        if weights is not None and (
            weights.shape != (a.shape[0],) or not torch.isfinite(weights).all() or (weights < 0).any()
        ):
            raise ValueError(
                f"weights must be finite and non-negative with shape ({a.shape[0]},) for a {tuple(a.shape)}, "
                f"got {tuple(weights.shape)}"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(
                f"a {tuple(a.shape)} or b {tuple(b.shape)} contains NaN or Inf; "
                "check the features feeding the estimator"
            )


class PairScoreEstimator(MutualInformationEstimator):
    """An estimator computed from the scores of all pairs (a_i, b_j) of the batch.

    Both inputs are standardized over the batch (per dimension, gradients flowing through) before
    they are scored. MI is invariant to such affine maps, but an encoder minimizing the estimate is
    not: without it, it shrinks its features until the critic's scores flatten and the estimate drops
    while the dependence stays (seen on Digits-Morpho: a lagging critic read 0.6 nats where a fresh
    one found 2.4, with features shrunk to a tenth of their scale). A batch in which no sample has a
    partner in its stratum gives 0.

    Subclasses implement :meth:`pair_scores` and :meth:`bound_from_scores`, and may override
    :meth:`loss_from_scores`.
    """

    @abstractmethod
    def pair_scores(self, a: Tensor, b: Tensor) -> Tensor:
        """``(B, B)`` scores whose entry (i, j) belongs to the pair (a_i, b_j); positives on the diagonal."""

    @abstractmethod
    def bound_from_scores(self, scores: Tensor, pairs: ContrastPairs) -> Tensor:
        """The MI estimate of the batch from its pair scores."""

    def loss_from_scores(self, scores: Tensor, pairs: ContrastPairs) -> Tensor:
        """The estimator's training loss; by default the negated estimate (a lower bound to maximize)."""
        return -self.bound_from_scores(scores, pairs)

    def estimate(self, a: Tensor, b: Tensor, strata: Tensor | None, weights: Tensor | None) -> Tensor:
        return self._from_scores(self.bound_from_scores, a, b, strata, weights)

    def estimator_loss(self, a: Tensor, b: Tensor, strata: Tensor | None, weights: Tensor | None) -> Tensor:
        return self._from_scores(self.loss_from_scores, a, b, strata, weights)

    def _from_scores(
        self,
        reduce: Callable[[Tensor, ContrastPairs], Tensor],
        a: Tensor,
        b: Tensor,
        strata: Tensor | None,
        weights: Tensor | None,
    ) -> Tensor:
        pairs = ContrastPairs(strata, a.shape[0], a.device, weights)
        scores = self.pair_scores(standardize(a, pairs.anchors), standardize(b, pairs.anchors))
        if not pairs.anchors.any():
            return scores.sum() * 0.0
        return reduce(scores, pairs)
