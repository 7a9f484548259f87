"""Mutual-information estimators: MINE (Donsker–Varadhan), NWJ, InfoNCE, CLUB and the closed-form Gaussian MI."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from mimm_med.mi.base import ContrastPairs, MutualInformationEstimator, PairScoreEstimator
from mimm_med.mi.critics import make_critic, mlp

__all__ = ["CriticEstimator", "MINE", "NWJ", "InfoNCE", "CLUB", "GaussianMI", "ESTIMATORS"]


class CriticEstimator(PairScoreEstimator):
    """An estimator whose pair scores come from a learned critic T(a, b).

    Parameters
    ----------
    dim_a, dim_b
        Feature sizes of ``a`` and ``b``.
    critic
        ``"separable"`` (default): T(a, b) = g(a)ᵀh(b), 2B MLP rows and one B×B product per batch;
        on Gaussian data it meets the accuracy targets of ``benchmarks/mi_estimators.py`` and is
        about two orders of magnitude faster than the reference B²-row critic. ``"concat"``: the
        joint MLP of MINE/MIMM with a decomposed first layer, for dependences an inner product of
        embeddings fits poorly, at a cost that grows with B². See :mod:`mimm_med.mi.critics`.
    hidden_dim
        Width of the critic's hidden layers.
    embed_dim
        Embedding size of the separable critic.
    num_layers
        Hidden layers of the critic.
    """

    def __init__(
        self,
        dim_a: int,
        dim_b: int,
        critic: str = "separable",
        hidden_dim: int = 256,
        embed_dim: int = 32,
        num_layers: int = 2,
    ) -> None:
        super().__init__(dim_a, dim_b)
        self.critic = make_critic(
            critic, self.dim_a, self.dim_b, hidden_dim=hidden_dim, embed_dim=embed_dim, num_layers=num_layers
        )

    def pair_scores(self, a: Tensor, b: Tensor) -> Tensor:
        return self.critic(a, b)


class MINE(CriticEstimator):
    """Donsker–Varadhan bound with all in-batch negatives (Belghazi et al., 2018).

    Î = mean_i T(a_i, b_i) − log mean_{i≠j} exp T(a_i, b_j). :meth:`critic_loss` has the value −Î
    but the bias-corrected gradient of the MINE paper: the gradient of the log term,
    E[∇T·e^T] / E[e^T], takes its denominator from an exponential moving average over batches
    (the buffer ``running_log_mean_exp``, NaN until the first training step, saved in
    ``state_dict``). The average only moves in training mode; until it exists the batch's own
    E[e^T] is used (the plain gradient).

    Parameters
    ----------
    dim_a, dim_b
        Feature sizes of ``a`` and ``b``.
    ema_rate
        Weight of the current batch in the moving average.
    critic_options
        ``critic``, ``hidden_dim``, ``embed_dim``, ``num_layers`` of :class:`CriticEstimator`.

    Examples
    --------
    >>> est = MINE(8, 4)
    >>> a, b = torch.randn(32, 8), torch.randn(32, 4)
    >>> est(a, b).shape
    torch.Size([])
    >>> est.critic_loss(a, b).backward()
    """

    def __init__(self, dim_a: int, dim_b: int, ema_rate: float = 0.01, **critic_options: Any) -> None:
        super().__init__(dim_a, dim_b, **critic_options)
        if not 0.0 < ema_rate < 1.0:
            raise ValueError(f"ema_rate must lie in (0, 1), got {ema_rate}")
        self.ema_rate = ema_rate
        self.register_buffer("running_log_mean_exp", torch.tensor(math.nan))

    def bound_from_scores(self, scores: Tensor, pairs: ContrastPairs) -> Tensor:
        return pairs.mean_positive(scores) - pairs.log_mean_exp_negative(scores)

    def loss_from_scores(self, scores: Tensor, pairs: ContrastPairs) -> Tensor:
        log_mean_exp = pairs.log_mean_exp_negative(scores)
        if self.training:
            self._update_running_log_mean_exp(log_mean_exp.detach())
        # Before the first training step (a fresh critic in eval mode) the batch is its own average.
        running = torch.where(
            torch.isnan(self.running_log_mean_exp), log_mean_exp.detach(), self.running_log_mean_exp
        )
        # Same value as log_mean_exp, gradient ∇E[e^T] / EMA(E[e^T]) instead of ∇E[e^T] / E[e^T].
        ratio = torch.exp(log_mean_exp - running)
        corrected = log_mean_exp.detach() + ratio - ratio.detach()
        return corrected - pairs.mean_positive(scores)

    def _update_running_log_mean_exp(self, log_mean_exp: Tensor) -> None:
        running = self.running_log_mean_exp
        if torch.isnan(running):
            running.copy_(log_mean_exp)
        else:
            running.copy_(
                torch.logaddexp(running + math.log1p(-self.ema_rate), log_mean_exp + math.log(self.ema_rate))
            )


class NWJ(CriticEstimator):
    """Nguyen–Wainwright–Jordan bound (f-divergence form): Î = mean_i T_ii − mean_{i≠j} exp(T_ij − 1).

    Unbiased in the batch (no log of a mean), at the price of a higher variance than MINE.
    Options as :class:`CriticEstimator`.

    Examples
    --------
    >>> NWJ(8, 4)(torch.randn(32, 8), torch.randn(32, 4)).shape
    torch.Size([])
    """

    def bound_from_scores(self, scores: Tensor, pairs: ContrastPairs) -> Tensor:
        return pairs.mean_positive(scores) - torch.exp(pairs.log_mean_exp_negative(scores) - 1.0)


class InfoNCE(CriticEstimator):
    """InfoNCE bound (van den Oord et al., 2018): Î = mean_i [T_ii − log mean_{j ∈ s(i)} exp T_ij].

    The contrast set of anchor i is its stratum, i itself included, so Î ≤ log(stratum size):
    low variance, but it saturates at high MI. Options as :class:`CriticEstimator`.

    Examples
    --------
    >>> InfoNCE(8, 4)(torch.randn(32, 8), torch.randn(32, 4)).shape
    torch.Size([])
    """

    def bound_from_scores(self, scores: Tensor, pairs: ContrastPairs) -> Tensor:
        return pairs.mean_over_anchors(scores.diagonal() - pairs.log_mean_exp_stratum(scores))


class CLUB(PairScoreEstimator):
    """Contrastive log-ratio upper bound (Cheng et al., 2020) with a Gaussian q(b | a).

    Î = mean_i log q(b_i | a_i) − mean_{i≠j} log q(b_j | a_i), an upper bound on I(a; b) while q
    approximates p(b | a) — the natural objective to *minimize*. :meth:`critic_loss` is the
    negative log-likelihood of q on the observed pairs, weighted as the bound's positives. q's mean
    and log-variance come from one MLP; the log-variance is squashed smoothly into
    (−``max_log_var``, ``max_log_var``) so a nearly deterministic b cannot drive the estimate to
    infinity. All B² log-likelihoods come from two (B, d)·(d, B) products, not B² MLP rows. With
    ``strata``, q stays unconditional on s.

    Parameters
    ----------
    dim_a, dim_b
        Feature sizes of ``a`` and ``b``.
    hidden_dim
        Width of q's hidden layers.
    num_layers
        Hidden layers of q.
    max_log_var
        Bound on q's log-variance.

    Examples
    --------
    >>> est = CLUB(8, 4)
    >>> a, b = torch.randn(32, 8), torch.randn(32, 4)
    >>> est(a, b).shape
    torch.Size([])
    >>> est.critic_loss(a, b).backward()
    """

    def __init__(
        self, dim_a: int, dim_b: int, hidden_dim: int = 256, num_layers: int = 2, max_log_var: float = 10.0
    ) -> None:
        super().__init__(dim_a, dim_b)
        if not 0.0 < max_log_var < math.inf:
            raise ValueError(f"max_log_var must be a positive finite bound on q's log-variance, got {max_log_var}")
        self.conditional = mlp(self.dim_a, hidden_dim, 2 * self.dim_b, num_layers)
        self.max_log_var = max_log_var

    def pair_scores(self, a: Tensor, b: Tensor) -> Tensor:
        """``(B, B)``: log q(b_j | a_i) up to a constant."""
        mean, raw_log_var = self.conditional(a).chunk(2, dim=1)
        log_var = self.max_log_var * torch.tanh(raw_log_var / self.max_log_var)
        precision = torch.exp(-log_var)
        # Centring both b and the means leaves every difference b_j − μ_i unchanged but keeps the
        # expanded square below from cancelling catastrophically when features sit far from 0.
        centre = b.mean(dim=0).detach()
        b, mean = b - centre, mean - centre
        squared_error = (
            precision @ (b * b).T - 2.0 * (mean * precision) @ b.T + (mean * mean * precision).sum(dim=1, keepdim=True)
        )
        return -0.5 * (squared_error + log_var.sum(dim=1, keepdim=True))

    def bound_from_scores(self, scores: Tensor, pairs: ContrastPairs) -> Tensor:
        return pairs.mean_positive(scores) - pairs.mean_negative(scores)

    def loss_from_scores(self, scores: Tensor, pairs: ContrastPairs) -> Tensor:
        # q is fitted under the distribution the bound is taken over (the weighted anchors): fitted to
        # the confounded batch, it would not bound the MI of the cell-balanced one.
        return -pairs.mean_positive(scores)


class GaussianMI(MutualInformationEstimator):
    """Closed-form MI of a Gaussian fitted to the batch: ``Î = ½·(log|R_aa| + log|R_bb| − log|R|)``.

    ``R`` is the (weighted) correlation matrix of ``[a; b]``, so Î = −½·Σ log(1 − ρ_i²) over the
    canonical correlations ρ_i of a and b: exact for jointly Gaussian inputs, and for any inputs the
    MI of their best Gaussian fit, which is zero exactly when no linear function of ``a`` correlates
    with ``b``. For a one-hot factor ``b`` that means equal class means of ``a``, the condition under
    which no linear probe reads the factor from ``a``. There is no critic: nothing lags behind the
    encoder and nothing can be fooled, at the price of seeing only linear dependence.

    With ``strata`` each stratum is centred on its own (weighted) mean before the pooled correlation
    is taken: the conditional MI I(a; b | s) of a Gaussian whose mean depends on s. ``weights`` make
    it the estimate under the weighted distribution of the batch (as in :class:`ContrastPairs`).
    Strata with fewer than two samples are left out.

    The plug-in estimate of independent inputs is biased upwards; its exact expectation,
    −½·E[log Λ] of Wilks' Λ(p, ν − q, q), is subtracted (a constant, so the gradient is unchanged),
    and estimates of independent inputs scatter around 0 at any batch size. ``ν`` is the effective
    sample size less one per stratum, ``p`` and ``q`` the ranks of the two sides: a one-hot factor of
    K classes counts K − 1 (its columns sum to 1), a dead feature counts nothing. The first-order
    ``p·q / (2ν)`` is far too small below a few hundred samples, and counting all K one-hot
    columns made independent inputs come out negative. ``ridge`` (added to the correlation
    matrix's diagonal) keeps such collinear columns well defined, and caps each canonical pair at
    about ``½·log(1 / ridge)`` nats. With ``ν < p + q`` some linear function of ``a`` matches ``b``
    in any batch: the estimate is then capped by ``ridge``, not measured, and a warning says so.

    Parameters
    ----------
    dim_a, dim_b
        Feature sizes of ``a`` and ``b``.
    ridge
        Added to the diagonal of the correlation matrices.

    Examples
    --------
    >>> a = torch.randn(256, 4)
    >>> GaussianMI(4, 4)(a, a + torch.randn(256, 4)) > GaussianMI(4, 4)(a, torch.randn(256, 4))
    tensor(True)
    """

    def __init__(self, dim_a: int, dim_b: int, ridge: float = 1e-3) -> None:
        super().__init__(dim_a, dim_b)
        if not 0.0 < ridge < math.inf:
            raise ValueError(f"ridge must be positive and finite, got {ridge}")
        self.ridge = ridge
        self._warned_of_small_batches = False

    def estimate(self, a: Tensor, b: Tensor, strata: Tensor | None, weights: Tensor | None) -> Tensor:
        joint = torch.cat([a, b], dim=1)
        weights = torch.ones(joint.shape[0], device=joint.device) if weights is None else weights.float()
        strata = torch.zeros(joint.shape[0], dtype=torch.long, device=joint.device) if strata is None else strata
        _, stratum_index, stratum_size = torch.unique(strata, return_inverse=True, return_counts=True)
        weights = weights * (stratum_size[stratum_index] >= 2)
        if weights.sum() <= 0:
            return joint.sum() * 0.0
        stratum_weight = torch.zeros(len(stratum_size), device=joint.device).index_add(0, stratum_index, weights)
        stratum_sum = torch.zeros(len(stratum_size), joint.shape[1], device=joint.device).index_add(
            0, stratum_index, joint * weights[:, None]
        )
        stratum_mean = stratum_sum / stratum_weight.clamp_min(1e-30)[:, None]
        centred = joint - stratum_mean[stratum_index]
        covariance = (centred * (weights / weights.sum())[:, None]).T @ centred
        scale = covariance.diagonal().clamp_min(1e-12).rsqrt()
        sample_correlation = covariance * scale[:, None] * scale[None, :]
        correlation = sample_correlation + self.ridge * torch.eye(joint.shape[1], device=joint.device)
        split = a.shape[1]
        plug_in = 0.5 * (
            torch.logdet(correlation[:split, :split])
            + torch.logdet(correlation[split:, split:])
            - torch.logdet(correlation)
        )
        with torch.no_grad():
            dof = float(weights.sum() ** 2 / (weights**2).sum()) - int((stratum_weight > 0).sum())
            ranks = [self._rank(sample_correlation[:split, :split]), self._rank(sample_correlation[split:, split:])]
        if dof < sum(ranks) and not self._warned_of_small_batches:
            self._warned_of_small_batches = True  # once per estimator: a training meets it at every step
            warnings.warn(
                f"GaussianMI: batches with fewer effective samples (here {dof:g}: the batch less one per stratum) "
                f"than the sides' ranks, {ranks[0]} + {ranks[1]}: some linear function of one side matches the other "
                "in any such batch, so the estimate is capped by ridge, not measured; use larger batches or smaller "
                "feature parts",
                RuntimeWarning,
                stacklevel=4,
            )
        return plug_in - independence_bias(dof, *ranks)

    def _rank(self, correlation: Tensor) -> int:
        # Directions of variance below the ridge are the ones it suppresses: they add no estimate.
        return int((torch.linalg.eigvalsh(correlation.double()) > self.ridge).sum())

    def estimator_loss(self, a: Tensor, b: Tensor, strata: Tensor | None, weights: Tensor | None) -> Tensor:
        """Zero: the estimate is in closed form, there is nothing to train."""
        return a.new_zeros(())


#: Estimator names accepted by configs and command lines → class.
def independence_bias(dof: float, rank_a: int, rank_b: int) -> float:
    """Expected Gaussian plug-in MI of independent Gaussian sides of ranks ``rank_a`` and ``rank_b``, in nats.

    −½·E[log Λ] for Wilks' Λ(p, ν − q, q) with p ≤ q the two ranks and ``dof`` ν the samples less
    one per centred mean: ½·Σᵢ₌₁ᵖ [ψ((ν + 1 − i)/2) − ψ((ν − q + 1 − i)/2)], which tends to p·q/(2ν).
    Below ν = p + q it is undefined (some canonical correlation is 1 in every sample); the
    first-order term is returned (:class:`GaussianMI` warns of such batches).

    Examples
    --------
    >>> round(independence_bias(31.0, 16, 1), 3), round(16 * 1 / (2 * 31), 3)
    (0.381, 0.258)
    """
    p, q = sorted((rank_a, rank_b))
    if p == 0:
        return 0.0
    if dof < p + q:
        return p * q / (2.0 * max(dof, 1.0))
    i = torch.arange(1, p + 1, dtype=torch.float64)
    return 0.5 * float((torch.special.digamma((dof + 1 - i) / 2) - torch.special.digamma((dof - q + 1 - i) / 2)).sum())


ESTIMATORS: dict[str, type[MutualInformationEstimator]] = {
    "mine": MINE,
    "nwj": NWJ,
    "infonce": InfoNCE,
    "club": CLUB,
    "gaussian": GaussianMI,
}
