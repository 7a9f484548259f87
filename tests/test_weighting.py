"""Tests for mimm_med.weighting: confounder attention, adaptive MI scale, GradNorm."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mimm_med.weighting import ConfounderAttention, GradNorm, adaptive_mi_scale

NAMES = ["sex", "age", "scanner"]


# ---------------------------------------------------------------- ConfounderAttention


def test_attention_weights_sum_to_one_and_follow_mi_order():
    attention = ConfounderAttention(NAMES, temperature=0.5)
    estimates = torch.tensor([0.2, 1.3, 0.05])
    weights = attention(estimates)
    assert weights.shape == (3,)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert weights.argsort().tolist() == estimates.argsort().tolist()
    assert weights.argmax().item() == 1


def test_attention_lower_temperature_concentrates_on_leakiest_factor():
    estimates = torch.tensor([0.2, 1.3, 0.05])
    sharp = ConfounderAttention(NAMES, temperature=0.01)(estimates)
    soft = ConfounderAttention(NAMES, temperature=10.0)(estimates)
    assert sharp[1].item() > 0.999
    assert soft[1].item() < 0.5


def test_attention_infinite_temperature_is_exact_mean():
    attention = ConfounderAttention(NAMES, temperature=float("inf"))
    estimates = torch.tensor([0.0, 50.0, -20.0], requires_grad=True)
    weights = attention(estimates)
    assert torch.equal(weights, torch.full((3,), 1.0 / 3))
    combined = (weights * estimates).sum()
    assert combined.item() == pytest.approx(estimates.mean().item())


def test_attention_weights_carry_no_gradient():
    attention = ConfounderAttention(NAMES)
    estimates = torch.tensor([0.2, 1.3, 0.05], requires_grad=True)
    weights = attention(estimates)
    assert not weights.requires_grad
    (weights * estimates).sum().backward()
    torch.testing.assert_close(estimates.grad, weights)


def test_attention_ema_follows_momentum():
    attention = ConfounderAttention(NAMES, momentum=0.8)
    sequence = [torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 3.0, 1.0]), torch.tensor([2.0, 1.0, 0.0])]
    expected = sequence[0].clone()
    attention(sequence[0])
    torch.testing.assert_close(attention.ema, expected)
    for estimates in sequence[1:]:
        attention(estimates)
        expected = 0.8 * expected + 0.2 * estimates
    torch.testing.assert_close(attention.ema, expected)
    torch.testing.assert_close(attention(torch.zeros(3)), torch.softmax(0.8 * expected, dim=0))


def test_attention_eval_mode_does_not_update():
    attention = ConfounderAttention(NAMES).eval()
    uniform = attention(torch.tensor([5.0, 0.0, 0.0]))
    torch.testing.assert_close(uniform, torch.full((3,), 1.0 / 3))
    assert not attention.initialized
    attention.train()(torch.tensor([1.0, 2.0, 3.0]))
    before = attention.ema.clone()
    attention.eval()
    weights = attention(torch.tensor([9.0, -4.0, 0.0]))
    torch.testing.assert_close(attention.ema, before)
    torch.testing.assert_close(weights, torch.softmax(before, dim=0))


def test_attention_state_round_trips_into_fresh_module():
    attention = ConfounderAttention(NAMES, temperature=0.7)
    for estimates in torch.rand(5, 3):
        attention(estimates)
    fresh = ConfounderAttention(NAMES, temperature=0.7)
    fresh.load_state_dict(attention.state_dict())
    assert set(attention.state_dict()) == {"ema", "initialized"}
    assert bool(fresh.initialized)
    assert fresh.weights_by_name() == attention.weights_by_name()
    following = torch.tensor([0.3, 0.1, 0.9])
    torch.testing.assert_close(fresh(following), attention(following))


def test_attention_weights_by_name():
    attention = ConfounderAttention(NAMES, temperature=1.0)
    weights = attention(torch.tensor([0.0, math.log(2.0), 0.0]))
    by_name = attention.weights_by_name()
    assert list(by_name) == NAMES
    assert by_name["age"] == pytest.approx(0.5)
    assert by_name["sex"] == pytest.approx(weights[0].item())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"names": []}, "at least one"),
        ({"names": ["age", "age"]}, r"repeated: \['age'\]"),
        ({"names": NAMES, "temperature": 0.0}, "temperature must be > 0"),
        ({"names": NAMES, "temperature": -1.0}, "temperature must be > 0"),
        ({"names": NAMES, "temperature": float("nan")}, "temperature must be > 0"),
        ({"names": NAMES, "momentum": 1.0}, "momentum"),
    ],
)
def test_attention_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConfounderAttention(**kwargs)


def test_attention_rejects_wrong_number_of_estimates():
    with pytest.raises(ValueError, match=r"shape \(3,\); got shape \(2,\)"):
        ConfounderAttention(NAMES)(torch.zeros(2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_attention_names_factor_with_non_finite_estimate(bad):
    attention = ConfounderAttention(NAMES)
    with pytest.raises(ValueError, match=r"\['age'\]"):
        attention(torch.tensor([0.1, bad, 0.2]))
    assert not attention.initialized


# ---------------------------------------------------------------- adaptive_mi_scale


def _norm(tensors):
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in tensors if t is not None))


def _random_grads(generator: torch.Generator) -> list[torch.Tensor | None]:
    shapes = [(4, 3), (3,), (2, 2, 2)]
    scale = 10.0 ** (torch.rand((), generator=generator).item() * 8 - 4)
    return [
        None if torch.rand((), generator=generator).item() < 0.2 else scale * torch.randn(shape, generator=generator)
        for shape in shapes
    ]


def test_adaptive_scale_never_lets_mi_gradient_dominate():
    generator = torch.Generator().manual_seed(0)
    clipped = 0
    for _ in range(500):
        task, mi = _random_grads(generator), _random_grads(generator)
        alpha = adaptive_mi_scale(task, mi)
        assert alpha.shape == () and not alpha.requires_grad
        assert 0.0 <= alpha.item() <= 1.0
        task_norm, mi_norm = _norm(task), _norm(mi)
        assert alpha.item() * mi_norm <= task_norm * (1 + 1e-5)
        if mi_norm <= task_norm:
            assert alpha.item() == 1.0
        else:
            clipped += 1
            assert alpha.item() * mi_norm == pytest.approx(task_norm, rel=1e-5)
    assert 100 < clipped < 400


def test_adaptive_scale_is_one_without_mi_gradient():
    task = [torch.randn(3, 3)]
    assert adaptive_mi_scale(task, [torch.zeros(3, 3)]).item() == 1.0
    assert adaptive_mi_scale(task, [None]).item() == 1.0
    assert adaptive_mi_scale([None], [None]).item() == 1.0


def test_adaptive_scale_on_shared_layer_gradients():
    torch.manual_seed(0)
    shared, head = nn.Linear(6, 4), nn.Linear(4, 1)
    features = shared(torch.randn(16, 6))
    task_loss = head(features).pow(2).mean()
    mi_loss = 1e3 * features[:, :2].pow(2).mean()
    parameters = list(shared.parameters())
    g_task = torch.autograd.grad(task_loss, parameters, retain_graph=True)
    g_mi = torch.autograd.grad(mi_loss, parameters, retain_graph=True)
    alpha = adaptive_mi_scale(g_task, g_mi)
    assert alpha.item() < 1.0
    scaled = torch.autograd.grad(alpha * mi_loss, parameters, retain_graph=True)
    assert _norm(scaled) == pytest.approx(_norm(g_task), rel=1e-4)


# ---------------------------------------------------------------- GradNorm


def _two_task_problem(seed: int = 0):
    """Shared layer, two logistic heads on noisy labels (losses cannot vanish), second loss x100."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 8, generator=generator)
    labels = [
        (x @ torch.randn(8, 1, generator=generator) + torch.randn(128, 1, generator=generator) > 0).float()
        for _ in range(2)
    ]
    torch.manual_seed(seed)
    shared, heads = nn.Linear(8, 16), nn.ModuleList([nn.Linear(16, 1), nn.Linear(16, 1)])

    def losses() -> dict[str, torch.Tensor]:
        features = torch.relu(shared(x))
        bce = nn.functional.binary_cross_entropy_with_logits
        return {"small": bce(heads[0](features), labels[0]), "large": 100 * bce(heads[1](features), labels[1])}

    return shared, heads, losses


def _weighted_norm_ratio(gradnorm: GradNorm, losses: dict[str, torch.Tensor], shared: nn.Module) -> float:
    norms = [
        _norm(torch.autograd.grad(weight * losses[name], list(shared.parameters()), retain_graph=True))
        for name, weight in gradnorm.weights_by_name().items()
    ]
    return max(norms) / min(norms)


def _train(use_gradnorm: bool, steps: int = 120) -> tuple[float, GradNorm]:
    """Geometric mean over the second half of training of the ratio of per-task gradient norms."""
    shared, heads, compute_losses = _two_task_problem()
    gradnorm = GradNorm(["small", "large"], alpha=1.5)
    model_optimizer = torch.optim.SGD([*shared.parameters(), *heads.parameters()], lr=1e-3)
    weight_optimizer = torch.optim.Adam(gradnorm.parameters(), lr=0.05)
    log_ratios = []
    for step in range(steps):
        losses = compute_losses()
        if step >= steps // 2:
            log_ratios.append(math.log(_weighted_norm_ratio(gradnorm, losses, shared)))
        model_optimizer.zero_grad()
        weight_optimizer.zero_grad()
        if use_gradnorm:
            gradnorm.gradnorm_loss(losses, list(shared.parameters())).backward()
        gradnorm.weighted_loss(losses).backward()
        model_optimizer.step()
        if use_gradnorm:
            weight_optimizer.step()
            gradnorm.renormalize()
            weights = gradnorm.weights.detach()
            assert (weights > 0).all()
            assert weights.sum().item() == pytest.approx(2.0, abs=1e-5)
    return math.exp(sum(log_ratios) / len(log_ratios)), gradnorm


def test_gradnorm_balances_gradient_norms_of_differently_scaled_tasks():
    plain_ratio, _ = _train(use_gradnorm=False)
    balanced_ratio, gradnorm = _train(use_gradnorm=True)
    assert plain_ratio > 10.0
    assert balanced_ratio < 3.0
    weights = gradnorm.weights_by_name()
    assert weights["small"] > 10 * weights["large"]


def test_gradnorm_loss_reaches_only_its_weights_and_matches_double_backward():
    shared, heads, compute_losses = _two_task_problem()
    gradnorm = GradNorm(["small", "large"], alpha=0.5)
    with torch.no_grad():
        gradnorm.weights.copy_(torch.tensor([1.4, 0.6]))
    gradnorm.gradnorm_loss(compute_losses(), list(shared.parameters()))  # records L(0)
    # Tasks that trained at different rates, so the inverse training rates r_i differ from 1.
    losses = {name: factor * loss for (name, loss), factor in zip(compute_losses().items(), [0.5, 0.9])}
    loss = gradnorm.gradnorm_loss(losses, list(shared.parameters()))
    loss.backward()
    assert all(p.grad is None for p in [*shared.parameters(), *heads.parameters()])
    assert gradnorm.weights.grad is not None

    # Reference: G_i through a create_graph double backward, as Chen et al. write it.
    weights = gradnorm.weights.detach().clone().requires_grad_(True)
    parameters = list(shared.parameters())
    norms = []
    for name, weight in zip(gradnorm.task_names, weights):
        grads = torch.autograd.grad(weight * losses[name], parameters, retain_graph=True, create_graph=True)
        norms.append(torch.cat([g.flatten() for g in grads]).norm())
    norms = torch.stack(norms)
    ratios = torch.stack([losses[name].detach() for name in gradnorm.task_names]) / gradnorm.initial_losses
    target = (norms.mean() * (ratios / ratios.mean()) ** 0.5).detach()
    (reference_grad,) = torch.autograd.grad((norms - target).abs().sum(), weights)
    torch.testing.assert_close(gradnorm.weights.grad, reference_grad)
    torch.testing.assert_close(loss, (norms - target).abs().sum())


def test_gradnorm_weighted_loss_uses_constant_weights():
    gradnorm = GradNorm(["a", "b"])
    with torch.no_grad():
        gradnorm.weights.copy_(torch.tensor([1.5, 0.5]))
    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(4.0, requires_grad=True)
    loss = gradnorm.weighted_loss({"b": b, "a": a})
    assert loss.item() == pytest.approx(1.5 * 2.0 + 0.5 * 4.0)
    loss.backward()
    assert gradnorm.weights.grad is None
    assert a.grad.item() == pytest.approx(1.5) and b.grad.item() == pytest.approx(0.5)


def test_gradnorm_renormalize_keeps_weights_positive_and_summing_to_task_count():
    gradnorm = GradNorm(["a", "b", "c"])
    with torch.no_grad():
        gradnorm.weights.copy_(torch.tensor([2.0, -0.5, 4.0]))
    gradnorm.renormalize()
    assert (gradnorm.weights > 0).all()
    assert gradnorm.weights.sum().item() == pytest.approx(3.0)
    assert gradnorm.weights[2].item() == pytest.approx(2 * gradnorm.weights[0].item())


def test_gradnorm_initial_losses_survive_checkpoint():
    shared, _, compute_losses = _two_task_problem()
    gradnorm = GradNorm(["small", "large"])
    first = compute_losses()
    gradnorm.gradnorm_loss(first, list(shared.parameters()))
    fresh = GradNorm(["small", "large"])
    fresh.load_state_dict(gradnorm.state_dict())
    assert set(gradnorm.state_dict()) == {"weights", "initial_losses", "initialized"}
    expected = torch.stack([first["small"], first["large"]]).detach()
    torch.testing.assert_close(fresh.initial_losses, expected)
    halved = {name: loss / 2 for name, loss in compute_losses().items()}
    fresh.gradnorm_loss(halved, list(shared.parameters()))
    torch.testing.assert_close(fresh.initial_losses, expected)


@pytest.mark.parametrize(
    ("losses", "message"),
    [
        ({"small": 1.0}, r"missing: \['large'\], unknown: \[\]"),
        ({"small": 1.0, "large": 1.0, "sex": 1.0}, r"missing: \[\], unknown: \['sex'\]"),
        ({"small": 1.0, "lage": 1.0}, r"missing: \['large'\], unknown: \['lage'\]"),
    ],
)
def test_gradnorm_names_missing_and_unknown_tasks(losses, message):
    gradnorm = GradNorm(["small", "large"])
    losses = {name: torch.tensor(value) for name, value in losses.items()}
    with pytest.raises(ValueError, match=message):
        gradnorm.weighted_loss(losses)
    with pytest.raises(ValueError, match=message):
        gradnorm.gradnorm_loss(losses, [nn.Parameter(torch.ones(1))])


def test_gradnorm_rejects_unusable_losses():
    shared, _, compute_losses = _two_task_problem()
    gradnorm = GradNorm(["small", "large"])
    with pytest.raises(ValueError, match=r"scalar.*'small': \(2,\)"):
        gradnorm.weighted_loss({"small": torch.ones(2), "large": torch.tensor(1.0)})
    losses = compute_losses()
    parameters = list(shared.parameters())
    with pytest.raises(ValueError, match="'large' does not require grad"):
        gradnorm.gradnorm_loss({"small": losses["small"], "large": losses["large"].detach()}, parameters)
    with pytest.raises(ValueError, match=r"finite and > 0.*\['small'\]"):
        GradNorm(["small", "large"]).gradnorm_loss({"small": 0 * losses["small"], "large": losses["large"]}, parameters)
    with pytest.raises(ValueError, match="shared layer"):
        gradnorm.gradnorm_loss(losses, [])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task_names": []}, "at least one"),
        ({"task_names": ["y", "y"]}, "repeated"),
        ({"task_names": ["y"], "alpha": -0.1}, "alpha must be >= 0"),
        ({"task_names": ["y"], "alpha": float("nan")}, "alpha must be >= 0"),
    ],
)
def test_gradnorm_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradNorm(**kwargs)


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("build", [lambda: ConfounderAttention("sex"), lambda: GradNorm("age")])
def test_a_single_name_given_as_a_string_is_refused(build):
    # tuple("sex") used to give the three factors 's', 'e', 'x'
    with pytest.raises(ValueError, match=r"got the string '\w+'; pass \['\w+'\]"):
        build()


def test_attention_weights_stay_finite_at_a_tiny_temperature_and_float_for_integer_estimates():
    attention = ConfounderAttention(["sex", "age"], temperature=1e-300)
    weights = attention(torch.tensor([1.0, 5.0]))  # 5 / 1e-300 overflowed the softmax into NaN
    assert weights.tolist() == [0.0, 1.0]
    weights = ConfounderAttention(["sex", "age"])(torch.tensor([1, 2]))
    assert weights.is_floating_point() and weights.sum().item() == pytest.approx(1.0)  # was int: [0, 0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_adaptive_scale_is_not_finite_for_a_non_finite_mi_gradient(bad):
    # As documented, so that GradScaler skips the step; NaN used to give 1 and inf 0.
    alpha = adaptive_mi_scale([torch.ones(3)], [torch.full((3,), bad)])
    assert not torch.isfinite(alpha)


def test_gradnorm_losses_at_zero_give_a_finite_loss_and_negative_losses_are_refused():
    shared, _, compute_losses = _two_task_problem()
    parameters = list(shared.parameters())
    gradnorm = GradNorm(["small", "large"])
    gradnorm.gradnorm_loss(compute_losses(), parameters)  # records the initial losses
    zero = {name: 0 * loss for name, loss in compute_losses().items()}
    assert torch.isfinite(gradnorm.gradnorm_loss(zero, parameters))  # was 0 / 0 = NaN
    losses = compute_losses()
    with pytest.raises(ValueError, match="non-negative task losses"):
        gradnorm.gradnorm_loss({"small": -losses["small"], "large": losses["large"]}, parameters)
    with pytest.raises(ValueError, match="alpha must be >= 0 and finite"):
        GradNorm(["y"], alpha=float("inf"))


def test_gradnorm_under_amp_takes_the_norms_from_scaled_losses_so_small_ones_do_not_underflow():
    # A task whose gradient per float16 activation is 1e-8 reads as a zero norm unscaled; with the
    # GradScaler's factor the GradNorm loss and its weight gradient are those of float32.
    torch.manual_seed(0)
    weight, x = nn.Parameter(torch.randn(8, 8)), torch.randn(16, 8)

    def weight_gradient(cast, loss_scale):
        activations = cast(x @ weight).float()
        losses = {"small": 1e-8 * activations.sum().abs(), "large": activations.pow(2).mean()}
        gradnorm = GradNorm(["small", "large"])
        loss = gradnorm.gradnorm_loss(losses, [weight], loss_scale)
        return torch.autograd.grad(loss, [gradnorm.weights])[0]

    exact = weight_gradient(lambda t: t, 1.0)
    assert not torch.allclose(weight_gradient(torch.Tensor.half, 1.0), exact, rtol=0.01)  # the underflow itself
    torch.testing.assert_close(weight_gradient(torch.Tensor.half, 2.0**16), exact, rtol=0.01, atol=0.0)
