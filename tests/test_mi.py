"""MI estimators and dependence penalties of mimm_med.mi."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch import Tensor

from mimm_med.mi.base import standardize
from mimm_med.mi import (
    CLUB,
    MINE,
    NWJ,
    AdversarialHead,
    DistanceCorrelation,
    GaussianMI,
    GradientReversal,
    InfoNCE,
    MMDPenalty,
    correlated_gaussians,
    mlp,
)

CRITIC_ESTIMATORS = [MINE, NWJ, InfoNCE, CLUB]
ESTIMATORS = [*CRITIC_ESTIMATORS, GaussianMI]
SMALL = {"hidden_dim": 64}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small critics train ~20x faster on one thread than on two oversubscribed ones of a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_estimator(cls, dim_a: int, dim_b: int, **options):
    torch.manual_seed(0)
    return cls(dim_a, dim_b, **options) if cls is GaussianMI else cls(dim_a, dim_b, **SMALL, **options)


def train(estimator, sample, steps: int, strata_of=None, lr: float = 3e-3) -> None:
    """Train the critic on fresh batches from ``sample()`` -> (a, b, strata); nothing to do without one."""
    if not list(estimator.parameters()):
        return
    optimizer = torch.optim.Adam(estimator.parameters(), lr=lr)
    for _ in range(steps):
        a, b, strata = sample()
        optimizer.zero_grad()
        estimator.critic_loss(a, b, strata).backward()
        optimizer.step()


def gaussian_sampler(mi: float, dim: int = 4, batch: int = 128, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return lambda: (*correlated_gaussians(batch, dim, mi, generator), None)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_trained_estimate_orders_dependent_above_independent(cls):
    estimates = {}
    for mi in (0.0, 2.0):
        estimator = small_estimator(cls, 4, 4)
        sample = gaussian_sampler(mi)
        train(estimator, sample, steps=150)
        with torch.no_grad():
            estimates[mi] = torch.stack([estimator(*sample()[:2]) for _ in range(5)]).mean()
    assert estimates[2.0] > 0.8
    assert estimates[2.0] > estimates[0.0] + 0.8
    assert abs(estimates[0.0]) < 0.1


def test_mine_approaches_the_true_mutual_information():
    estimator = small_estimator(MINE, 2, 2)
    sample = gaussian_sampler(1.0, dim=2, batch=256)
    train(estimator, sample, steps=300)
    with torch.no_grad():
        estimate = torch.stack([estimator(*sample()[:2]) for _ in range(10)]).mean()
    assert estimate == pytest.approx(1.0, abs=0.2)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_estimate_is_differentiable_in_both_inputs(cls):
    a, b = correlated_gaussians(32, 4, 1.0, torch.Generator().manual_seed(0))
    a.requires_grad_(True)
    b.requires_grad_(True)
    small_estimator(cls, 4, 4)(a, b).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert b.grad is not None and b.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", CRITIC_ESTIMATORS)
def test_critic_loss_trains_only_the_estimator_and_raises_the_estimate(cls):
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 4)
    estimator = small_estimator(cls, 4, 4)
    a, b = correlated_gaussians(128, 4, 1.5, torch.Generator().manual_seed(0))
    features = encoder(a)
    with torch.no_grad():
        before = estimator(features, b)
    initial = [p.detach().clone() for p in estimator.parameters()]
    optimizer = torch.optim.Adam(estimator.parameters(), lr=3e-3)
    for _ in range(40):
        optimizer.zero_grad()
        estimator.critic_loss(features.detach(), b).backward()
        optimizer.step()
    assert encoder.weight.grad is None
    assert all(p.grad is not None for p in estimator.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(estimator.parameters(), initial))
    with torch.no_grad():
        assert estimator(features, b) > before + 0.3


def strata_sampler(batch: int = 128, classes: int = 4, seed: int = 2):
    """a and b both reveal the stratum, their noises are independent: I(a; b) = log 4, I(a; b | s) = 0."""
    generator = torch.Generator().manual_seed(seed)

    def sample():
        strata = torch.randint(classes, (batch,), generator=generator)
        one_hot = torch.nn.functional.one_hot(strata, classes).float()
        a = one_hot + 0.1 * torch.randn(batch, classes, generator=generator)
        b = one_hot + 0.1 * torch.randn(batch, classes, generator=generator)
        return a, b, strata

    return sample


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_strata_give_conditional_mutual_information(cls):
    sample = strata_sampler()
    unconditional = small_estimator(cls, 4, 4)
    train(unconditional, lambda: (*sample()[:2], None), steps=150)
    conditional = small_estimator(cls, 4, 4)
    train(conditional, sample, steps=150)
    a, b, strata = sample()
    with torch.no_grad():
        assert unconditional(a, b) > 0.8
        assert abs(conditional(a, b, strata)) < 0.15


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_samples_without_a_partner_in_their_stratum_are_ignored(cls):
    estimator = small_estimator(cls, 3, 2)
    a, b = torch.randn(9, 3), torch.randn(9, 2)
    strata = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 7])
    alone = estimator(a[:8], b[:8], strata[:8]).item()
    assert estimator(a, b, strata).item() == pytest.approx(alone, abs=1e-6)
    assert estimator(a[:8], b[:8]).item() != pytest.approx(alone, abs=1e-4)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_batch_without_partners_gives_differentiable_zero(cls):
    a = torch.randn(3, 3, requires_grad=True)
    value = small_estimator(cls, 3, 2)(a, torch.randn(3, 2), torch.tensor([0, 1, 2]))
    value.backward()
    assert value == 0.0


@pytest.mark.parametrize("true_mi", [0.0, 1.0, 2.0])
def test_gaussian_mi_is_unbiased_on_correlated_gaussians(true_mi):
    generator = torch.Generator().manual_seed(0)
    estimator = GaussianMI(8, 8)
    estimates = torch.stack([estimator(*correlated_gaussians(256, 8, true_mi, generator)) for _ in range(20)])
    assert estimates.mean().item() == pytest.approx(true_mi, abs=0.03 + 0.03 * true_mi)


@pytest.mark.parametrize("dim_b, one_hot", [(2, True), (3, True), (16, False)])
def test_gaussian_mi_of_independent_inputs_is_zero_on_average_at_small_batches(dim_b, one_hot):
    """The bias is exact at any batch size: a first-order correction left +0.75 nats at B = 64 with
    16 + 16 dimensions, and counting both one-hot columns of a binary factor gave −0.11."""
    generator = torch.Generator().manual_seed(0)
    estimator = GaussianMI(16, dim_b)

    def side_b() -> torch.Tensor:
        if one_hot:
            return torch.nn.functional.one_hot(torch.randint(0, dim_b, (64,), generator=generator), dim_b).float()
        return torch.randn(64, dim_b, generator=generator)

    estimates = torch.stack([estimator(torch.randn(64, 16, generator=generator), side_b()) for _ in range(200)])
    assert abs(estimates.mean().item()) < 3 * estimates.std().item() / math.sqrt(200) + 0.01


def test_gaussian_mi_warns_when_the_batch_is_too_small_to_measure_anything():
    estimator = GaussianMI(16, 2)
    with pytest.warns(RuntimeWarning, match=r"fewer effective samples \(here 15: .* ranks, 15 \+ 1: .*capped by ridge"):
        estimator(torch.randn(16, 16), torch.nn.functional.one_hot(torch.arange(16) % 2, 2).float())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in (16, 15, 14):  # once per estimator, not at every step (a benchmark cell printed it 15 times)
            estimator(torch.randn(batch, 16), torch.nn.functional.one_hot(torch.arange(batch) % 2, 2).float())
    assert caught == []


def test_gaussian_mi_of_a_binary_factor_is_the_class_mean_separation():
    """a | z ~ N(±δ/2, 1) with balanced z: I_Gauss = ½·log(1 + δ²/4); equal class means give 0."""
    generator = torch.Generator().manual_seed(0)
    z = torch.arange(20000) % 2
    one_hot = torch.nn.functional.one_hot(z, 2).float()
    noise = torch.randn(20000, 1, generator=generator)
    estimator = GaussianMI(1, 2)
    shifted = noise + 1.5 * (z[:, None] - 0.5)
    assert estimator(shifted, one_hot).item() == pytest.approx(0.5 * math.log(1 + 1.5**2 / 4), abs=0.01)
    assert abs(estimator(noise, one_hot).item()) < 0.005


def test_gaussian_mi_weights_define_the_distribution_and_it_has_nothing_to_train():
    a, b = correlated_gaussians(64, 3, 1.0, torch.Generator().manual_seed(0))
    weights = torch.cat([torch.ones(40), torch.zeros(24)])
    estimator = GaussianMI(3, 3)
    assert estimator(a, b, weights=weights).item() == pytest.approx(estimator(a[:40], b[:40]).item(), abs=1e-5)
    assert estimator(a, b, weights=3 * weights).item() == pytest.approx(estimator(a[:40], b[:40]).item(), abs=1e-5)
    assert list(estimator.parameters()) == []
    assert estimator.critic_loss(a, b).item() == 0.0


@pytest.mark.parametrize("cls", CRITIC_ESTIMATORS)
def test_a_zero_weight_leaves_a_sample_out_of_the_pair_estimators(cls):
    a, b = correlated_gaussians(64, 3, 1.0, torch.Generator().manual_seed(0))
    a[40:] *= 10.0  # rows the weights leave out, on another scale: they shifted the standardization
    weights = torch.cat([torch.ones(40), torch.zeros(24)])
    estimator = small_estimator(cls, 3, 3)
    assert estimator(a, b, weights=weights).item() == pytest.approx(estimator(a[:40], b[:40]).item(), abs=1e-5)
    # One weighted sample per stratum has no weighted partner: no anchor, an estimate of 0 (was NaN).
    strata = torch.arange(8).repeat_interleave(8)
    single = (torch.arange(64) % 8 == 0).float()
    only_first = (torch.arange(64) == 0).float()
    values = [estimator(a, b, strata, single), estimator.critic_loss(a, b, strata, single), estimator(a, b, weights=only_first)]
    assert [value.item() for value in values] == [0.0, 0.0, 0.0]


def test_mine_matches_the_donsker_varadhan_formula_with_per_anchor_weights():
    estimator = small_estimator(MINE, 3, 2)
    a, b = torch.randn(7, 3), torch.randn(7, 2)
    strata = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    scores = estimator.critic(standardize(a), standardize(b)).detach()
    anchor_means = [
        sum(math.exp(scores[i, j]) for j in range(7) if j != i and strata[j] == strata[i])
        / (int((strata == strata[i]).sum()) - 1)
        for i in range(7)
    ]
    expected = float(scores.diagonal().mean()) - math.log(sum(anchor_means) / 7)
    assert estimator(a, b, strata).item() == pytest.approx(expected, abs=1e-6)
    unconditional = float(scores.diagonal().mean()) - math.log(
        float(scores.exp().sum() - scores.diagonal().exp().sum()) / (7 * 6)
    )
    assert estimator(a, b).item() == pytest.approx(unconditional, abs=1e-6)


def test_mine_critic_loss_uses_the_moving_average_in_its_gradient():
    estimator = small_estimator(MINE, 3, 2)
    a, b = torch.randn(16, 3), torch.randn(16, 2)
    assert "running_log_mean_exp" in estimator.state_dict()
    assert torch.isnan(estimator.running_log_mean_exp)
    loss = estimator.critic_loss(a, b)
    assert loss.item() == pytest.approx(-estimator(a, b).item(), rel=1e-5)
    first = estimator.running_log_mean_exp.clone()
    assert torch.isfinite(first)

    # With the average at twice the batch's mean of e^T, the log term's gradient halves.
    estimator.eval()
    estimator.running_log_mean_exp.copy_(first + math.log(2.0))
    estimator.zero_grad()
    estimator.critic_loss(a, b).backward()
    corrected = [p.grad.clone() for p in estimator.parameters()]
    scores = estimator.critic(standardize(a), standardize(b))
    off_diagonal = ~torch.eye(16, dtype=torch.bool)
    log_mean_exp = torch.logsumexp(scores[off_diagonal], 0) - math.log(16 * 15)
    expected = torch.autograd.grad(-scores.diagonal().mean() + 0.5 * log_mean_exp, list(estimator.parameters()))
    for got, want in zip(corrected, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert torch.equal(estimator.running_log_mean_exp, first + math.log(2.0))  # eval mode: no update

    estimator.train()
    estimator.critic_loss(a, b)
    assert not torch.equal(estimator.running_log_mean_exp, first + math.log(2.0))


AUTOCAST_SETTINGS = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    pytest.param(
        "cuda",
        torch.float16,
        id="cuda-float16",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


@pytest.mark.parametrize("device, dtype", AUTOCAST_SETTINGS)
@pytest.mark.parametrize("cls", ESTIMATORS)
def test_critic_math_stays_float32_under_autocast(cls, device, dtype):
    estimator = small_estimator(cls, 4, 4).to(device)
    a, b = (x.to(device, dtype) for x in correlated_gaussians(32, 4, 1.0, torch.Generator().manual_seed(0)))
    expected = estimator(a.float(), b.float())
    a.requires_grad_(True)
    with torch.autocast(device, dtype=dtype):
        value = estimator(a, b)
        loss = estimator.critic_loss(a, b)
    assert value.dtype == torch.float32 and loss.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), abs=1e-5)
    if loss.requires_grad:  # GaussianMI has no critic to train
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in estimator.parameters() if p.grad is not None)
    (grad,) = torch.autograd.grad(estimator(a, b), a)
    assert grad.dtype == dtype and torch.isfinite(grad).all()


@pytest.mark.parametrize(
    "a_shape, b_shape, strata",
    [
        ((8, 3), (7, 2), None),  # batch sizes differ
        ((8, 4), (8, 2), None),  # wrong feature size of a
        ((8, 3), (8, 5), None),  # wrong feature size of b
        ((8, 3, 1), (8, 2), None),  # not 2-D
        ((8, 3), (8, 2), torch.zeros(7, dtype=torch.long)),  # strata of the wrong length
        ((8, 3), (8, 2), torch.zeros(8)),  # float strata
    ],
)
@pytest.mark.parametrize("cls", [MINE, CLUB])
def test_bad_shapes_raise_value_error_naming_both_shapes(cls, a_shape, b_shape, strata):
    estimator = cls(3, 2)
    with pytest.raises(ValueError) as error:
        estimator(torch.randn(a_shape), torch.randn(b_shape), strata)
    assert str(a_shape) in str(error.value)
    if strata is None:
        assert str(b_shape) in str(error.value)
    else:
        assert str(tuple(strata.shape)) in str(error.value)
    with pytest.raises(ValueError):
        estimator.critic_loss(torch.randn(a_shape), torch.randn(b_shape), strata)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_inputs_raise_value_error(bad):
    a, b = torch.randn(8, 3), torch.randn(8, 2)
    b[3, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        MINE(3, 2)(a, b)


def test_concat_critic_and_unknown_critic():
    estimator = small_estimator(MINE, 3, 2, critic="concat")
    a = torch.randn(16, 3, requires_grad=True)
    estimator(a, torch.randn(16, 2)).backward()
    assert a.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="separable"):
        MINE(3, 2, critic="resnet")


def test_correlated_gaussians_have_the_requested_correlation():
    a, b = correlated_gaussians(20000, 4, 2.0, torch.Generator().manual_seed(0))
    rho = math.sqrt(1 - math.exp(-2 * 2.0 / 4))
    correlation = torch.corrcoef(torch.cat([a, b], dim=1).T)
    torch.testing.assert_close(correlation[:4, 4:].diagonal(), torch.full((4,), rho), atol=0.02, rtol=0)
    assert correlation[0, 5].abs() < 0.03
    assert -2 * math.log(1 - rho**2) == pytest.approx(2.0)


def test_distance_correlation_is_zero_for_independent_and_one_for_linear():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(512, 4, generator=generator)
    independent = torch.randn(512, 3, generator=generator)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=generator))
    dcor = DistanceCorrelation()
    assert abs(DistanceCorrelation(squared=True)(a, independent)) < 0.005
    assert dcor(a, independent) < 0.07
    assert dcor(a, 3.0 * a @ rotation + 1.0) == pytest.approx(1.0, abs=1e-4)
    labels = (a[:, 0] > 0).long()
    assert dcor(a, torch.nn.functional.one_hot(labels).float()) > 0.3
    assert DistanceCorrelation(squared=True)(a, labels).item() == pytest.approx(dcor(a, labels).item() ** 2, rel=1e-4)


def test_distance_correlation_is_differentiable_and_checks_shapes():
    a = torch.randn(64, 4, requires_grad=True)
    DistanceCorrelation()(a, a.detach()[:, :2] ** 2 + 0.1 * torch.randn(64, 2)).backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(64, 4\).*\(63, 2\)"):
        DistanceCorrelation()(a, torch.randn(63, 2))
    with pytest.raises(ValueError, match=r"at least 4 samples, got a batch of 3.*drop_last=True"):
        DistanceCorrelation()(a[:3], torch.randn(3, 2))


def test_mmd_is_zero_for_one_distribution_and_positive_for_shifted_groups():
    generator = torch.Generator().manual_seed(0)
    groups = torch.arange(600) % 3
    same = torch.randn(600, 4, generator=generator)
    shifted = same + groups[:, None].float()
    mmd = MMDPenalty()
    assert abs(mmd(same, groups)) < 0.01
    assert mmd(shifted, groups) > 0.1
    assert mmd(shifted, torch.zeros(600, dtype=torch.long)) == 0.0
    # a group of one sample cannot be compared: only groups 0 and 1 remain
    lonely = torch.cat([groups[:400] % 2, torch.tensor([5])])
    assert mmd(shifted[:401], lonely) == pytest.approx(mmd(shifted[:400], groups[:400] % 2).item(), rel=1e-5)


def test_mmd_is_differentiable_and_checks_shapes():
    a = torch.randn(40, 3, requires_grad=True)
    MMDPenalty()(a, torch.arange(40) % 2).backward()
    assert a.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(40, 3\).*\(39,\)"):
        MMDPenalty()(a, torch.arange(39) % 2)


@pytest.mark.parametrize("device, dtype", AUTOCAST_SETTINGS)
def test_penalties_stay_float32_under_autocast(device, dtype):
    a = torch.randn(32, 4).to(device, dtype)
    labels = torch.arange(32, device=device) % 2
    with torch.autocast(device, dtype=dtype):
        assert DistanceCorrelation()(a, labels).dtype == torch.float32
        assert MMDPenalty()(a, labels).dtype == torch.float32


def test_gradient_reversal_flips_and_scales_the_gradient():
    x = torch.randn(5, 3, requires_grad=True)
    reversal = GradientReversal(coefficient=0.7)
    out = reversal(x)
    torch.testing.assert_close(out, x)
    (out * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(x.grad, -0.7 * torch.arange(3.0).expand(5, 3))


def test_adversarial_head_reverses_the_gradient_of_its_classifier():
    torch.manual_seed(0)
    head = AdversarialHead(6, 3, hidden=16, coefficient=2.0)
    plain = mlp(6, 16, 3, num_layers=1)
    plain.load_state_dict(head.classifier.state_dict())
    x = torch.randn(4, 6, requires_grad=True)
    logits = head(x)
    assert logits.shape == (4, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    reversed_grad = x.grad.clone()
    x.grad = None
    torch.nn.functional.cross_entropy(plain(x), torch.tensor([0, 1, 2, 0])).backward()
    torch.testing.assert_close(reversed_grad, -2.0 * x.grad)
    assert all(p.grad is not None for p in head.classifier.parameters())


@pytest.mark.parametrize("shape", [(4, 5), (4, 6, 1), (6,)])
def test_adversarial_head_names_features_that_do_not_fit_it(shape):
    with pytest.raises(ValueError, match=rf"expects features of shape \(B, 6\).*got {re.escape(str(shape))}"):
        AdversarialHead(6, 3)(torch.randn(*shape))


def _labelled_features(n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """a knows y only, b knows z only, and z agrees with y 90 % of the time; plus cell weights."""
    y = torch.randint(0, 2, (n,), generator=generator)
    z = torch.where(torch.rand(n, generator=generator) < 0.9, y, 1 - y)
    a = y[:, None].float() + 0.3 * torch.randn(n, 2, generator=generator)
    b = z[:, None].float() + 0.3 * torch.randn(n, 2, generator=generator)
    cells = y * 2 + z
    return a, b, 1.0 / torch.bincount(cells, minlength=4).float()[cells]


def _held_out_estimate(balanced: bool) -> float:
    generator = torch.Generator().manual_seed(0)
    estimator = MINE(2, 2, hidden_dim=32, embed_dim=8)
    optimizer = torch.optim.Adam(estimator.parameters(), lr=3e-3)
    for _ in range(300):
        a, b, weights = _labelled_features(256, generator)
        optimizer.zero_grad()
        estimator.critic_loss(a, b, weights=weights if balanced else None).backward()
        optimizer.step()
    a, b, weights = _labelled_features(4096, generator)
    with torch.no_grad():
        return float(estimator(a, b, weights=weights if balanced else None))


def test_cell_balancing_weights_remove_dependence_that_only_comes_from_label_correlation():
    assert _held_out_estimate(balanced=False) > 0.2  # I(y; z) ≈ 0.37 nats leaks into a and b
    assert abs(_held_out_estimate(balanced=True)) < 0.05  # y and z are independent under the balanced weights


def test_equal_weights_change_nothing_and_bad_weights_are_refused():
    torch.manual_seed(1)
    a, b = torch.randn(32, 3), torch.randn(32, 4)
    estimator = MINE(3, 4)
    assert torch.allclose(estimator(a, b), estimator(a, b, weights=torch.full((32,), 2.0)), atol=1e-6)
    with pytest.raises(ValueError, match="weights must be finite and non-negative"):
        estimator(a, b, weights=-torch.ones(32))


def test_club_fits_q_under_the_weights_its_bound_is_taken_over():
    torch.manual_seed(0)
    a, b, weights = _labelled_features(64, torch.Generator().manual_seed(0))
    estimator = CLUB(2, 2, hidden_dim=16)
    scores = estimator.pair_scores(standardize(a), standardize(b))
    weighted_nll = -(scores.diagonal() * weights).sum() / weights.sum()
    assert estimator.critic_loss(a, b, weights=weights).item() == pytest.approx(weighted_nll.item(), rel=1e-5)
    assert estimator.critic_loss(a, b).item() == pytest.approx(-scores.diagonal().mean().item(), rel=1e-5)


def test_distance_correlation_gradient_is_finite_for_a_constant_batch():
    a = torch.randn(8, 3, requires_grad=True)
    value = DistanceCorrelation()(a, torch.zeros(8, 2))  # one label value in the whole batch
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(a.grad).all()


def planted_leak(n: int, agreement: float, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Features h with y in one column and z in two; z agrees with y at rate ``agreement``."""
    y = torch.randint(2, (n,), generator=generator)
    z = torch.where(torch.rand(n, generator=generator) < agreement, y, 1 - y)
    h = torch.randn(n, 8, generator=generator)
    h[:, 0] += 2.0 * y
    h[:, 1] += 2.0 * z
    h[:, 2] += 1.0 * z - 0.5 * y
    return h, y, z


def train_on_planted_leak(mi_weight: float) -> tuple[float, float]:
    """Fit a linear map on CE(y) + λ·I_Gauss(f; z | y) (cell-balanced) where z agrees with y 90 % of the time.

    Returns the leakage of z and the accuracy of y on held-out data where z is independent of y.
    """
    from mimm_med.evaluation.leakage import linear_probe_leakage

    generator = torch.Generator().manual_seed(0)
    h, y, z = planted_leak(1024, 0.9, generator)
    h_test, y_test, z_test = planted_leak(1024, 0.5, generator)
    torch.manual_seed(0)
    projection, head = torch.nn.Linear(8, 4), torch.nn.Linear(4, 2)
    estimator = GaussianMI(4, 2)
    cells = y * 2 + z
    balanced = 1.0 / torch.bincount(cells).float()[cells]
    z_one_hot = torch.nn.functional.one_hot(z, 2).float()
    optimizer = torch.optim.Adam([*projection.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(300):
        f = projection(h)
        loss = torch.nn.functional.cross_entropy(head(f), y) + mi_weight * estimator(f, z_one_hot, y, balanced)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    f_test = projection(h_test).detach()
    accuracy = float((head(f_test).argmax(1) == y_test).float().mean())
    return linear_probe_leakage(f_test.numpy(), z_test.numpy()), accuracy


def test_minimizing_gaussian_mi_removes_a_planted_linear_leak_and_the_shortcut():
    erm_leak, erm_accuracy = train_on_planted_leak(0.0)
    leak, accuracy = train_on_planted_leak(3.0)
    assert erm_leak > 0.7 and leak < 0.6, (erm_leak, leak)
    assert accuracy > erm_accuracy + 0.03, (erm_accuracy, accuracy)


@pytest.mark.parametrize("cls", CRITIC_ESTIMATORS)
def test_critic_loss_sends_no_gradient_to_undetached_features(cls):
    # Otherwise an encoder sharing the backward would be pushed to raise the MI it should remove.
    encoder = torch.nn.Linear(4, 4)
    a, b = correlated_gaussians(32, 4, 1.0, torch.Generator().manual_seed(0))
    features = encoder(a)
    small_estimator(cls, 4, 4).critic_loss(features, b).backward()
    assert encoder.weight.grad is None


def test_mine_critic_loss_before_any_training_step_is_finite_in_eval_mode():
    estimator = small_estimator(MINE, 3, 2).eval()
    a, b = torch.randn(16, 3), torch.randn(16, 2)
    loss = estimator.critic_loss(a, b)
    loss.backward()
    assert loss.item() == pytest.approx(-estimator(a, b).item(), rel=1e-5)
    assert all(torch.isfinite(p.grad).all() for p in estimator.parameters())
    assert torch.isnan(estimator.running_log_mean_exp)  # eval mode still leaves the average alone


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: MINE(3.5, 2), "positive integers"),
        (lambda: MINE(3, 2, hidden_dim=0), "widths must be whole numbers >= 1"),  # was a constant critic, estimate 0
        (lambda: MINE(3, 2, embed_dim=0), "widths must be whole numbers >= 1"),
        (lambda: MINE(3, 2, critic="concat", num_layers=1.5), r"num_layers, a whole number >= 1 .*got 1\.5"),  # said 0.5
        (lambda: CLUB(3, 2, max_log_var=-1.0), "max_log_var must be a positive finite"),
        (lambda: GaussianMI(3, 2, ridge=math.nan), "ridge must be positive and finite"),  # was a NaN estimate
        (lambda: MMDPenalty((math.nan,)), "bandwidths must be positive"),  # was a NaN penalty
        (lambda: AdversarialHead(3, 1), "num_classes >= 2"),  # one logit: its cross-entropy is always 0
        (lambda: correlated_gaussians(8, 0, 1.0), "dim must be at least 1"),
        (lambda: correlated_gaussians(8, 2, math.nan), "must be >= 0 nats"),
    ],
)
def test_options_that_would_give_a_meaningless_estimate_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()
