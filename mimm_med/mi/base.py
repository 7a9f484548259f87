"""The contract every mutual-information estimator follows, and the pieces they share."""

from __future__ import annotations

import math
import warnings
from abc import ABC, abstractmethod
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["ContrastPairs", "MutualInformationEstimator", "gather_batch"]


class ContrastPairs:
    """Which pairs (i, j) of a batch are contrasted against the positives (i, i).

    Negatives are the pairs i ≠ j within the same stratum (all of them when ``strata`` is None).
    Anchors without a partner in their stratum are left out of both the positive and the negative
    term, so both expectations run over the same distribution of strata. Each anchor's negatives
    are weighted by one over their count: every anchor counts once, every stratum in proportion to
    its size, which makes the negative term an expectation under p(s)·p(a|s)·p(b|s) — the product
    of marginals that defines the conditional MI I(a; b | s).

    Parameters
    ----------
    strata
        ``(B,)`` integer stratum per sample, or None for one stratum.
    batch_size
        B.
    device
        Where the masks live.

    Examples
    --------
    >>> pairs = ContrastPairs(torch.tensor([0, 0, 1]), 3, torch.device("cpu"))
    >>> pairs.anchors.tolist()
    [True, True, False]
    """

    def __init__(self, strata: Tensor | None, batch_size: int, device: torch.device) -> None:
        if strata is None:
            same = torch.ones(batch_size, batch_size, dtype=torch.bool, device=device)
        else:
            same = strata[:, None] == strata[None, :]
        self.same_stratum = same
        self.negatives = same & ~torch.eye(batch_size, dtype=torch.bool, device=device)
        partners = self.negatives.sum(dim=1)
        self.anchors = partners > 0
        self.num_anchors = self.anchors.sum().float()
        self.log_weight = torch.where(
            self.negatives, -partners.clamp_min(1).float().log()[:, None], -math.inf
        )

    def mean_positive(self, scores: Tensor) -> Tensor:
        """Mean of the anchors' positive scores S_ii."""
        return (scores.diagonal() * self.anchors).sum() / self.num_anchors

    def mean_negative(self, scores: Tensor) -> Tensor:
        """Weighted mean of the negative scores S_ij."""
        return (scores * self.log_weight.exp()).sum() / self.num_anchors

    def log_mean_exp_negative(self, scores: Tensor) -> Tensor:
        """log of the weighted mean of exp(S_ij) over the negatives, computed stably."""
        return torch.logsumexp((scores + self.log_weight).flatten(), dim=0) - self.num_anchors.log()

    def log_mean_exp_stratum(self, scores: Tensor) -> Tensor:
        """``(B,)``: per row i, log of the mean of exp(S_ij) over j in i's stratum, j = i included."""
        masked = scores.masked_fill(~self.same_stratum, -math.inf)
        return torch.logsumexp(masked, dim=1) - self.same_stratum.sum(dim=1).float().log()

    def mean_over_anchors(self, values: Tensor) -> Tensor:
        """Mean of a per-sample ``(B,)`` tensor over the anchors."""
        return (values * self.anchors).sum() / self.num_anchors


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
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
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
    """Estimate I(a; b) (or I(a; b | s)) of a batch from the scores of all pairs (a_i, b_j).

    ``est(a, b, strata=None)`` returns the estimate in nats as a scalar, differentiable w.r.t. ``a``
    and ``b`` (an encoder minimizes it); ``est.critic_loss(a, b, strata=None)`` returns the loss that
    trains the estimator's own parameters (pass detached features). With ``strata`` negatives are
    only taken within a stratum, giving the conditional MI; see :class:`ContrastPairs`. A batch in
    which no sample has a partner gives 0.

    The maths runs in float32 with autocast disabled, because logsumexp and exp overflow in float16.
    Under ``torch.distributed`` with several ranks the negatives come from the global batch
    (:func:`gather_batch`), so every rank gets the estimate of the whole batch.

    Subclasses implement :meth:`pair_scores` and :meth:`bound_from_scores`, and may override
    :meth:`loss_from_scores`.
    """

    def __init__(self, dim_a: int, dim_b: int) -> None:
        super().__init__()
        if dim_a < 1 or dim_b < 1:
            raise ValueError(f"feature sizes must be positive, got dim_a={dim_a}, dim_b={dim_b}")
        self.dim_a = dim_a
        self.dim_b = dim_b

    @abstractmethod
    def pair_scores(self, a: Tensor, b: Tensor) -> Tensor:
        """``(B, B)`` scores whose entry (i, j) belongs to the pair (a_i, b_j); positives on the diagonal."""

    @abstractmethod
    def bound_from_scores(self, scores: Tensor, pairs: ContrastPairs) -> Tensor:
        """The MI estimate of the batch from its pair scores."""

    def loss_from_scores(self, scores: Tensor, pairs: ContrastPairs) -> Tensor:
        """The estimator's training loss; by default the negated estimate (a lower bound to maximize)."""
        return -self.bound_from_scores(scores, pairs)

    def forward(self, a: Tensor, b: Tensor, strata: Tensor | None = None) -> Tensor:
        """MI estimate in nats of the batch (a, b), conditional on ``strata`` when given."""
        return self._evaluate(self.bound_from_scores, a, b, strata)

    def critic_loss(self, a: Tensor, b: Tensor, strata: Tensor | None = None) -> Tensor:
        """Loss to minimize over the estimator's parameters; detach ``a`` and ``b`` before calling."""
        return self._evaluate(self.loss_from_scores, a, b, strata)

    def _evaluate(
        self,
        reduce: Callable[[Tensor, ContrastPairs], Tensor],
        a: Tensor,
        b: Tensor,
        strata: Tensor | None,
    ) -> Tensor:
        self._check_inputs(a, b, strata)
        a, b, *rest = gather_batch(a, b) if strata is None else gather_batch(a, b, strata)
        strata = rest[0] if rest else None
        with torch.autocast(device_type=a.device.type, enabled=False):
            scores = self.pair_scores(a.float(), b.float())
            pairs = ContrastPairs(strata, a.shape[0], a.device)
            if not pairs.anchors.any():
                return scores.sum() * 0.0
            return reduce(scores, pairs)

    def _check_inputs(self, a: Tensor, b: Tensor, strata: Tensor | None) -> None:
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
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(
                f"a {tuple(a.shape)} or b {tuple(b.shape)} contains NaN or Inf; "
                "check the features feeding the estimator"
            )
