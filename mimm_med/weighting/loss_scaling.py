"""Dynamic loss scaling for MIMM-X: adaptive clipping of the MI gradient and GradNorm task weights."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from mimm_med.distributed import world_size

__all__ = ["adaptive_mi_scale", "GradNorm"]


def _global_norm(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """L2 norm of the concatenation of ``tensors``; ``None`` counts as zeros.

    Float32 because the sum of squares of fp16 gradients overflows.
    """
    norms = [torch.linalg.vector_norm(t, dtype=torch.float32) for t in tensors if t is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


def adaptive_mi_scale(
    task_grads: Sequence[torch.Tensor | None], mi_grads: Sequence[torch.Tensor | None]
) -> torch.Tensor:
    """Scale ``alpha`` for the MI term so its gradient is never larger than the task gradient.

    ``alpha = min(|g_task|, |g_MI|) / |g_MI|``, the adaptive gradient clipping of Belghazi et al.
    (MINE, 2018), and ``alpha = 1`` when ``g_MI = 0``. Norms are taken over the concatenation of
    all tensors; ``None`` entries (parameters a loss does not reach) count as zeros. Only the
    ratio of the norms matters, so gradients of losses scaled by the same ``GradScaler`` factor
    give the same ``alpha``. A non-finite norm gives a non-finite ``alpha``, which AMP's
    ``GradScaler`` then skips like any overflowing step.

    Parameters
    ----------
    task_grads
        Gradients of the task loss w.r.t. the last shared layer's parameters.
    mi_grads
        Gradients of the MI term w.r.t. the same parameters.

    Returns
    -------
    torch.Tensor
        Scalar ``alpha`` in ``[0, 1]`` (float32, no gradient).

    Examples
    --------
    >>> from mimm_med.networks import MIMMXNet
    >>> _ = torch.manual_seed(0)
    >>> net = MIMMXNet(torch.nn.Flatten(), {"digit": 4, "thickness": 4}, {"digit": 2, "thickness": 2}, backbone_dim=16)
    >>> out = net(torch.randn(8, 16))
    >>> task_loss = torch.nn.functional.cross_entropy(out["digit_output"], torch.randint(0, 2, (8,)))
    >>> mi_loss = 100 * out["digit_features"].pow(2).mean()  # stands in for an MI estimate
    >>> shared = list(net.shared_layer.parameters())
    >>> g_task = torch.autograd.grad(task_loss, shared, retain_graph=True, allow_unused=True)
    >>> g_mi = torch.autograd.grad(mi_loss, shared, retain_graph=True, allow_unused=True)
    >>> alpha = adaptive_mi_scale(g_task, g_mi)  # the MI gradient is the larger: alpha < 1
    >>> bool(alpha < 1)
    True
    >>> (task_loss + alpha * mi_loss).backward()
    """
    task_norm = _global_norm(task_grads)
    mi_norm = _global_norm(mi_grads).to(task_norm.device)
    alpha = torch.minimum(task_norm, mi_norm) / mi_norm.clamp_min(torch.finfo(torch.float32).tiny)
    alpha = torch.where(mi_norm == 0, torch.ones_like(alpha), alpha)
    # A NaN MI norm would otherwise read as "no MI gradient" (alpha 1) and an infinite one give alpha 0.
    finite = torch.isfinite(task_norm) & torch.isfinite(mi_norm)
    return torch.where(finite, alpha, torch.full_like(alpha, float("nan"))).detach()


class GradNorm(nn.Module):
    """GradNorm (Chen et al., ICML 2018): learned task-loss weights that balance gradient norms.

    Each task ``i`` has a positive weight ``w_i``; the weights sum to ``T``, the number of tasks.
    The model is trained on ``weighted_loss = sum_i w_i * L_i`` with the weights held constant,
    and the weights alone are trained on ``gradnorm_loss = sum_i |G_i - mean(G) * r_i**alpha|``,
    where ``G_i = |grad_W w_i * L_i|`` is task ``i``'s gradient norm at the shared parameters
    ``W``, ``r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0))`` its relative inverse training rate and
    the target ``mean(G) * r_i**alpha`` a constant. The initial losses ``L_i(0)`` are recorded on
    the first ``gradnorm_loss`` call and kept in a buffer, so a resumed run keeps them; under
    ``torch.distributed`` they are the mean over the ranks, the same on every rank (call
    ``gradnorm_loss`` on all ranks).

    Parameters
    ----------
    task_names
        Names of the tasks, e.g. the factor names of a ``MIMMXNet``.
    alpha
        Asymmetry ``alpha >= 0``: how strongly tasks that train slower get larger gradients
        (``0`` asks for equal gradient norms).

    Examples
    --------
    One training step of a network with a head per task:

    >>> from mimm_med.networks import MIMMXNet
    >>> _ = torch.manual_seed(0)
    >>> parts = {"digit": 4, "thickness": 2, "rotation": 2}
    >>> net = MIMMXNet(torch.nn.Flatten(), parts, dict.fromkeys(parts, 2), backbone_dim=16)
    >>> model_optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> gradnorm = GradNorm(list(parts))
    >>> weight_optimizer = torch.optim.Adam(gradnorm.parameters(), lr=0.025)
    >>> shared = list(net.shared_layer.parameters())
    >>> out, batch = net(torch.randn(8, 16)), {name: torch.randint(0, 2, (8,)) for name in parts}
    >>> losses = {name: torch.nn.functional.cross_entropy(out[f"{name}_output"], batch[name]) for name in parts}
    >>> model_optimizer.zero_grad()
    >>> weight_optimizer.zero_grad()
    >>> gradnorm.gradnorm_loss(losses, shared).backward()  # reaches only gradnorm.weights
    >>> gradnorm.weighted_loss(losses).backward()  # weights held constant: reaches only the model
    >>> model_optimizer.step()
    >>> weight_optimizer.step()
    >>> gradnorm.renormalize()
    >>> round(gradnorm.weights.sum().item(), 4)  # the weights sum to the number of tasks
    3.0
    """

    initial_losses: torch.Tensor
    initialized: torch.Tensor

    def __init__(self, task_names: Sequence[str], alpha: float = 1.5) -> None:
        super().__init__()
        if isinstance(task_names, str):
            # tuple("age") would make three tasks 'a', 'g', 'e'
            raise ValueError(
                f"task_names must be a sequence of names, got the string {task_names!r}; pass [{task_names!r}]"
            )
        task_names = tuple(task_names)
        if not task_names:
            raise ValueError("GradNorm needs at least one task name; got an empty list.")
        duplicates = sorted({name for name in task_names if task_names.count(name) > 1})
        if duplicates:
            raise ValueError(f"GradNorm task names must be unique; repeated: {duplicates}.")
        if not 0 <= alpha < float("inf"):
            raise ValueError(f"GradNorm alpha must be >= 0 and finite; got {alpha}.")
        self.task_names = task_names
        self.alpha = float(alpha)
        self.weights = nn.Parameter(torch.ones(len(task_names)))
        self.register_buffer("initial_losses", torch.ones(len(task_names)))
        self.register_buffer("initialized", torch.tensor(False))

    def weighted_loss(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Model loss ``sum_i w_i * L_i``; the weights are constants here and get no gradient."""
        stacked = self._stack(losses)
        return (self.weights.detach().to(stacked.dtype) * stacked).sum()

    def gradnorm_loss(
        self, losses: Mapping[str, torch.Tensor], shared_parameters: Iterable[torch.Tensor], loss_scale: float = 1.0
    ) -> torch.Tensor:
        """GradNorm loss; its gradient reaches ``self.weights`` only.

        Parameters
        ----------
        losses
            One scalar, non-negative loss per task name, still attached to the model's graph (kept
            for the model's own backward pass).
        shared_parameters
            Parameters of the last shared layer, where the gradient norms are compared.
        loss_scale
            Factor the losses are multiplied by before they are differentiated, and the norms divided
            by after: AMP's ``GradScaler.get_scale()``, so that gradients through float16 activations
            do not underflow. A scale at which they overflow gives a non-finite loss.
        """
        stacked = self._stack(losses)
        if bool((stacked.detach() < 0).any()):
            # a negative loss ratio has no real power r_i**alpha
            raise ValueError(f"GradNorm needs non-negative task losses; got {self._by_name(stacked)}.")
        shared = [p for p in shared_parameters if p.requires_grad]
        if not shared:
            raise ValueError(
                "GradNorm.gradnorm_loss needs the last shared layer's parameters (requiring grad); got none."
            )
        # G_i = |grad_W w_i L_i| = w_i |grad_W L_i| as w_i > 0: the gradient w.r.t. w equals the
        # create_graph one, without a double-backward graph that would also reach W.
        unweighted = torch.stack([self._grad_norm(name, losses[name], shared, loss_scale) for name in self.task_names])
        norms = self.weights * unweighted.to(self.weights.device)
        loss_ratios = stacked.detach().float() / self._initial_losses(stacked)
        # All losses at exactly 0 (a perfectly fit batch) give the target 0 instead of 0 / 0 = NaN.
        inverse_rates = loss_ratios / loss_ratios.mean().clamp_min(torch.finfo(torch.float32).tiny)
        target = (norms.mean() * inverse_rates**self.alpha).detach()
        return (norms - target).abs().sum()

    @torch.no_grad()
    def renormalize(self) -> None:
        """Keep the weights positive and summing to ``T``; call after each step of their optimizer."""
        self.weights.clamp_(min=torch.finfo(self.weights.dtype).eps)
        self.weights.mul_(len(self.task_names) / self.weights.sum())

    def weights_by_name(self) -> dict[str, float]:
        """Current task weights keyed by task name, for logging."""
        return dict(zip(self.task_names, self.weights.detach().tolist()))

    def _stack(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        unknown = sorted(set(losses) - set(self.task_names))
        missing = [name for name in self.task_names if name not in losses]
        if unknown or missing:
            raise ValueError(
                f"GradNorm expects one loss per task {list(self.task_names)}; "
                f"missing: {missing}, unknown: {unknown}."
            )
        not_scalar = {name: tuple(losses[name].shape) for name in self.task_names if losses[name].numel() != 1}
        if not_scalar:
            raise ValueError(f"GradNorm needs scalar (reduced) task losses; got shapes {not_scalar}.")
        return torch.stack([losses[name].reshape(()) for name in self.task_names]).to(self.weights.device)

    def _by_name(self, stacked: torch.Tensor) -> dict[str, float]:
        return dict(zip(self.task_names, stacked.detach().tolist()))

    def _initial_losses(self, stacked: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            initial = stacked.detach().to(self.initial_losses.dtype)
            if world_size() > 1:
                # The first losses of the global batch, as one process records them. Each rank's own made
                # the ranks' states differ, and a run resumed from rank 0's checkpoint diverged from the
                # uninterrupted one (rank 1 went on with rank 0's losses).
                dist.all_reduce(initial)
                initial /= dist.get_world_size()
            bad = [name for name, value in zip(self.task_names, initial.tolist()) if not 0 < value < float("inf")]
            if bad:
                raise ValueError(
                    f"GradNorm divides by the first losses, which must be finite and > 0; "
                    f"not so for task(s) {bad}: {initial.tolist()}."
                )
            self.initial_losses.copy_(initial)
            self.initialized.fill_(True)
        return self.initial_losses

    @staticmethod
    def _grad_norm(name: str, loss: torch.Tensor, shared: Sequence[torch.Tensor], loss_scale: float) -> torch.Tensor:
        if not loss.requires_grad:
            raise ValueError(f"GradNorm: the loss of task {name!r} does not require grad; pass it before detaching.")
        grads = torch.autograd.grad(loss * loss_scale, shared, retain_graph=True, allow_unused=True)
        return _global_norm(grads) / loss_scale

    def extra_repr(self) -> str:
        return f"task_names={list(self.task_names)}, alpha={self.alpha}"
