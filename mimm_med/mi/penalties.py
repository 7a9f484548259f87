"""Dependence penalties of the baselines: distance correlation, MMD between groups, gradient reversal."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mimm_med.mi.critics import mlp

__all__ = [
    "DistanceCorrelation",
    "MMDPenalty",
    "GradientReversalFunction",
    "GradientReversal",
    "AdversarialHead",
]


def _check_finite_2d(name: str, x: Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (B, features), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} {tuple(x.shape)} contains NaN or Inf")


def _u_centred_distances(x: Tensor) -> Tensor:
    """Distance matrix U-centred as in Székely & Rizzo (2014): zero row and column sums, zero diagonal."""
    n = x.shape[0]
    distances = torch.cdist(x, x)
    rows = distances.sum(dim=1, keepdim=True) / (n - 2)
    cols = distances.sum(dim=0, keepdim=True) / (n - 2)
    centred = distances - rows - cols + distances.sum() / ((n - 1) * (n - 2))
    return centred.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), 0.0)


class DistanceCorrelation(nn.Module):
    """Distance correlation (Székely et al., 2007) between the rows of ``a`` and ``b``, differentiable.

    0 when a and b are independent, 1 when b is a linear function of a up to rotation, scale and
    shift; any dependence, not only linear, raises it. The batch statistic is the bias-corrected
    one of Székely & Rizzo (2014), built from U-centred distance matrices: unbiased for dCov², so
    an independent batch gives ≈ 0 (dCor² may then be slightly negative; dCor clips it at 0)
    instead of the plain estimate's positive floor. Needs at least 4 samples.

    Parameters
    ----------
    squared
        Return the bias-corrected dCor² instead of dCor. dCor² has a finite gradient at
        independence, dCor does not.
    eps
        Guards the divisions and the square root.

    Examples
    --------
    >>> a = torch.randn(64, 8)
    >>> round(float(DistanceCorrelation()(a, 2 * a + 1)), 4)
    1.0
    """

    def __init__(self, squared: bool = False, eps: float = 1e-9) -> None:
        super().__init__()
        self.squared = squared
        self.eps = eps

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """dCor (or dCor²) of ``a`` (B, d) and ``b`` (B, k) or (B,), e.g. features and labels."""
        b = b[:, None] if b.ndim == 1 else b
        _check_finite_2d("a", a)
        _check_finite_2d("b", b)
        if a.shape[0] != b.shape[0]:
            raise ValueError(f"a and b need the same number of rows, got a {tuple(a.shape)} and b {tuple(b.shape)}")
        if a.shape[0] < 4:
            # the U-centred estimate divides by n - 3
            raise ValueError(
                f"distance correlation needs at least 4 samples, got a batch of {a.shape[0]}: use a batch size of 4 "
                "or more, and drop_last=True in the DataLoader so that the last batch is not shorter"
            )
        with torch.autocast(device_type=a.device.type, enabled=False):
            centred_a = _u_centred_distances(a.float())
            centred_b = _u_centred_distances(b.float())
            # The common factor 1 / (n (n - 3)) of the three U-statistics cancels in the ratio.
            covariance = (centred_a * centred_b).sum()
            variances = (centred_a * centred_a).sum() * (centred_b * centred_b).sum()
            # clamp before the square root: its gradient at a zero variance (a constant batch) is NaN
            dcor_squared = covariance / variances.clamp_min(self.eps**2).sqrt()
            return dcor_squared if self.squared else dcor_squared.clamp_min(self.eps).sqrt()


class MMDPenalty(nn.Module):
    """Squared maximum mean discrepancy between the groups of a batch, averaged over pairs of groups.

    Gaussian kernel averaged over several bandwidths, each a multiple of the batch's median pairwise
    distance (detached), so the penalty does not depend on the scale of the features. Within-group
    terms leave out i = j (the unbiased estimate): ≈ 0 when the groups share a distribution. Groups
    with fewer than two rows are dropped before anything is computed; with fewer than two groups
    left the penalty is 0.

    Parameters
    ----------
    bandwidths
        Kernel widths as multiples of the median pairwise distance.

    Examples
    --------
    >>> a = torch.cat([torch.randn(32, 4), torch.randn(32, 4) + 3])
    >>> groups = torch.tensor([0] * 32 + [1] * 32)
    >>> bool(MMDPenalty()(a, groups) > 0.1)
    True
    """

    def __init__(self, bandwidths: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0)) -> None:
        super().__init__()
        if not bandwidths or not all(0 < width < math.inf for width in bandwidths):
            raise ValueError(f"bandwidths must be positive multiples of the median distance, got {bandwidths}")
        self.bandwidths = tuple(float(width) for width in bandwidths)

    def forward(self, a: Tensor, groups: Tensor) -> Tensor:
        """MMD² of ``a`` (B, d) between the groups given by integer labels ``groups`` (B,)."""
        _check_finite_2d("a", a)
        if groups.shape != (a.shape[0],) or groups.is_floating_point():
            raise ValueError(
                f"groups must be an integer tensor of shape ({a.shape[0]},) for a {tuple(a.shape)}, "
                f"got {groups.dtype} {tuple(groups.shape)}"
            )
        _, group_index = torch.unique(groups, return_inverse=True)
        members = nn.functional.one_hot(group_index).float()
        members = members[:, members.sum(dim=0) >= 2]
        if members.shape[1] < 2:
            return a.sum() * 0.0
        kept = members.sum(dim=1) > 0
        a, members = a[kept], members[kept]
        with torch.autocast(device_type=a.device.type, enabled=False):
            kernel = self._kernel(a.float())
            counts = members.sum(dim=0)
            block_sums = members.T @ kernel @ members
            self_similarity = members.T @ kernel.diagonal()
            within = (block_sums.diagonal() - self_similarity) / (counts * (counts - 1))
            between = block_sums / (counts[:, None] * counts[None, :])
            mmd = within[:, None] + within[None, :] - 2.0 * between
            rows, cols = torch.triu_indices(len(counts), len(counts), offset=1, device=a.device)
            return mmd[rows, cols].mean()

    def _kernel(self, x: Tensor) -> Tensor:
        squared = torch.cdist(x, x).square()
        off_diagonal = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
        median_squared = squared.detach()[off_diagonal].median().clamp_min(1e-12)
        kernels = [torch.exp(-squared / (2.0 * width**2 * median_squared)) for width in self.bandwidths]
        return torch.stack(kernels).mean(dim=0)


class GradientReversalFunction(torch.autograd.Function):
    """Identity forward, gradient multiplied by −coefficient backward (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, coefficient: float) -> Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.coefficient * grad, None


class GradientReversal(nn.Module):
    """Layer form of :class:`GradientReversalFunction`; ``coefficient`` may be changed during training.

    Examples
    --------
    >>> x = torch.ones(3, requires_grad=True)
    >>> GradientReversal(0.5)(x).sum().backward()
    >>> x.grad.tolist()
    [-0.5, -0.5, -0.5]
    """

    def __init__(self, coefficient: float = 1.0) -> None:
        super().__init__()
        self.coefficient = coefficient

    def forward(self, x: Tensor) -> Tensor:
        return GradientReversalFunction.apply(x, self.coefficient)

    def extra_repr(self) -> str:
        return f"coefficient={self.coefficient}"


class AdversarialHead(nn.Module):
    """DANN-style adversary: gradient reversal, then an MLP that returns class logits.

    Trained with cross-entropy on the spurious label, the head learns to predict it while the
    reversed gradient pushes the features feeding it to hide it.

    Parameters
    ----------
    in_dim
        Size of the input features.
    num_classes
        Number of logits.
    hidden
        Width of the hidden layers.
    num_layers
        Number of hidden layers.
    coefficient
        Scale of the reversed gradient (``head.reversal.coefficient`` to schedule it).

    Examples
    --------
    >>> AdversarialHead(16, 3)(torch.randn(4, 16)).shape
    torch.Size([4, 3])
    """

    def __init__(
        self, in_dim: int, num_classes: int, hidden: int = 128, num_layers: int = 1, coefficient: float = 1.0
    ) -> None:
        super().__init__()
        if num_classes < 2:
            # one logit makes the cross-entropy 0 whatever the features: the adversary would learn nothing
            raise ValueError(f"AdversarialHead needs num_classes >= 2 (class logits), got {num_classes}")
        self.in_dim = in_dim
        self.reversal = GradientReversal(coefficient)
        self.classifier = mlp(in_dim, hidden, num_classes, num_layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            # a matmul error would name neither the head nor the feature part that does not fit it
            raise ValueError(
                f"AdversarialHead expects features of shape (B, {self.in_dim}) (its in_dim, the size of the part it "
                f"reads), got {tuple(x.shape)}"
            )
        return self.classifier(self.reversal(x))
