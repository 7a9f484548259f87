"""MIMMXTrainer: a MONAI trainer that alternates critic steps with encoder-and-heads steps."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines import Trainer, Workflow
from monai.engines.utils import default_metric_cmp_fn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.data import WeightedRandomSampler

from mimm_med.checks import check_device, is_whole_number
from mimm_med.distributed import is_rank_zero, world_size
from mimm_med.networks import MIMMXNet
from mimm_med.weighting import adaptive_mi_scale

from .dependence import MutualInformationTerms
from .objective import MIMMXObjective

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or infinite."""


def _mean_over_ranks(grads: Sequence[Tensor | None]) -> list[Tensor | None]:
    """Average gradients over the ranks of ``torch.distributed`` in one collective; unchanged without one.

    ``None`` entries (parameters a loss does not reach) stay ``None``; every rank has the same ones.
    """
    if world_size() == 1:
        return list(grads)
    present = [grad for grad in grads if grad is not None]
    if not present:
        return list(grads)
    flat = torch.cat([grad.reshape(-1) for grad in present])
    dist.all_reduce(flat)  # a sum: gloo has no average
    chunks = iter((flat / dist.get_world_size()).split([grad.numel() for grad in present]))
    return [None if grad is None else next(chunks).view_as(grad) for grad in grads]


def _clipping_scale(task_total: Tensor, penalty: Tensor, shared: Sequence[Tensor], loss_scale: float = 1.0) -> Tensor:
    """MIMM-X's ``α`` from the gradients of the task loss and the MI penalty at the ``shared`` layer.

    Under AMP both losses are differentiated times the ``GradScaler``'s ``loss_scale``, as for the
    backward: a small gradient through float16 activations would otherwise underflow to zero. ``α``
    depends only on the ratio of the two norms, so the common factor leaves it unchanged.
    """
    task_grads = torch.autograd.grad(task_total * loss_scale, shared, retain_graph=True, allow_unused=True)
    mi_grads = torch.autograd.grad(penalty * loss_scale, shared, retain_graph=True, allow_unused=True)
    grads = _mean_over_ranks([*task_grads, *mi_grads])
    return adaptive_mi_scale(grads[: len(shared)], grads[len(shared) :])


class NegativeMIWarning:
    """Warn, once per term, when an MI term's mean over an epoch is below ``-tolerance`` nats.

    A mutual information is never negative, so such a mean means the critic does not follow the
    features: it fits each batch and misjudges the next (critic learning rate too high for the
    batch size), and the encoder then lowers a number that no longer measures dependence. The
    training loss follows it down without bound, and the run goes on without an error.

    Parameters
    ----------
    estimator
        Name of the estimator, for the message.
    tolerance
        Nats below zero an epoch mean may reach from batch noise alone.
    """

    def __init__(self, estimator: str, tolerance: float = 0.5) -> None:
        self.estimator = estimator
        self.tolerance = tolerance
        self.values: dict[str, list[float]] = {}
        self.warned: set[str] = set()

    def attach(self, engine: MIMMXTrainer) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda _: self.values.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._check)

    def _collect(self, engine: MIMMXTrainer) -> None:
        for key, value in engine.state.output.items():
            if key.startswith("dependence/"):
                self.values.setdefault(key, []).append(value)

    def _check(self, engine: MIMMXTrainer) -> None:
        for key, values in self.values.items():
            mean = float(np.mean(values))
            if mean >= -self.tolerance or key in self.warned or not is_rank_zero():  # ranks see the same global batch
                continue
            self.warned.add(key)
            lr = engine.critic_optimizer.param_groups[0]["lr"] if engine.critic_optimizer is not None else None
            batch_size = getattr(engine.data_loader, "batch_size", None)
            logger.warning(
                "epoch %d: the %s estimate %s averaged %.2f nats over the epoch, but a mutual information is never "
                "negative: the critic does not follow the features, and the penalty no longer measures dependence. "
                "Lower the critic learning rate (critic_lr, now %s), raise the batch size (now %s) or n_critic "
                "(now %d), or use the critic-free estimator 'gaussian'",
                engine.state.epoch, self.estimator, key, mean, lr, batch_size, engine.n_critic,
            )  # fmt: skip


class MIMMXTrainer(Trainer):
    """Trains a :class:`~mimm_med.networks.MIMMXNet` with any method of :mod:`mimm_med.engines.methods`.

    One iteration on a batch:

    1. forward the network once (autocast under AMP);
    2. critic phase: ``n_critic`` steps of the critics / adversaries on the batch's *detached*
       features (float32), through ``critic_optimizer``;
    3. encoder phase: one step of network and heads on ``L = Σ w_t·L_t + λ·α·Σ a_k·D_k`` with the
       critics frozen (their gradients are discarded). For MIMM-X, ``α`` clips the MI gradient at the
       network's last shared layer to the task gradient's norm, and GradNorm updates the task
       weights ``w`` through ``gradnorm_optimizer``. Under AMP both take their shared-layer gradients
       from the losses as the ``GradScaler`` scales them, so that small ones do not underflow in
       float16; a GradNorm update whose gradients overflow is skipped, as the scaler skips the step.

    Under ``torch.distributed`` (the network wrapped in ``DistributedDataParallel``) the critics see the
    global batch (:func:`mimm_med.mi.gather_batch`), so the MI estimates, critic updates and attention
    match a single process on that batch. The shared-layer gradients behind ``α`` and the GradNorm
    weight gradients are averaged over the ranks, as DDP averages the network's: ``α`` is then the
    global batch's and the task weights stay equal on every rank, while the task losses are per rank.

    Reusing the batch's features for the critic steps costs one network forward per iteration, so a
    MIMM-X step stays close to an ERM step (see ``benchmarks/step_overhead.py``).

    ``engine.state.output`` is a flat dict of floats: ``loss``, ``loss/<task>``, ``dependence/<term>``,
    ``weight/<term>`` (attention), ``task_weight/<task>`` (GradNorm), ``mi_scale`` and ``critic_loss``.
    It is not decollated. An MI term whose epoch mean is negative is warned about
    (:class:`NegativeMIWarning`).

    Parameters
    ----------
    device
        Where to train; AMP is used only when it is a CUDA device and ``amp`` is set.
    max_epochs
        Epochs to train.
    train_data_loader
        Yields dicts with ``image_key`` and one label per factor of ``objective``.
    network
        The network; its ``shared_layer`` is where MIMM-X balances gradients.
    optimizer
        Optimizer of the network parameters.
    objective
        The method's loss (:class:`~mimm_med.engines.objective.MIMMXObjective`).
    critic_optimizer
        Optimizer of ``objective.critic_parameters()``; required when there are any.
    gradnorm_optimizer
        Optimizer of ``objective.gradnorm.parameters()``; required when the method uses GradNorm.
    n_critic
        Critic steps per encoder step.
    image_key
        Key of the image in a batch.
    epoch_length, non_blocking, iteration_update, postprocessing, key_train_metric, additional_metrics,
    metric_cmp_fn, train_handlers, amp, event_names, event_to_attr, to_kwargs, amp_kwargs
        As in :class:`monai.engines.SupervisedTrainer`.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: MIMMXNet,
        optimizer: Optimizer,
        objective: MIMMXObjective,
        critic_optimizer: Optimizer | None = None,
        gradnorm_optimizer: Optimizer | None = None,
        n_critic: int = 1,
        image_key: str = "image",
        epoch_length: int | None = None,
        non_blocking: bool = False,
        iteration_update: Callable[[Engine, Any], Any] | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        if not is_whole_number(max_epochs, minimum=1):
            raise ValueError(
                f"max_epochs (the bundles' and benchmarks' epochs) must be a whole number >= 1, got {max_epochs!r}"
            )
        device = check_device(device)
        sampler = getattr(train_data_loader, "sampler", None)
        if objective.spec.rebalance and not isinstance(sampler, WeightedRandomSampler):
            # the trainer cannot rebalance by itself: the loader draws the batches
            warnings.warn(
                f"{objective.spec.name!r} rebalances through the training loader's sampler, but this loader draws with "
                f"a {type(sampler).__name__}: give it sampler=mimm_med.data.confounding.rebalancing_sampler(datalist, "
                "factors), as the bundles and run_experiment do, or it trains without rebalancing",
                UserWarning,
                stacklevel=2,
            )
        # AMP is a CUDA feature here; on CPU it is off without a warning so one config serves both.
        use_amp = bool(amp) and device.type == "cuda"
        super().__init__(
            device=device,
            max_epochs=int(max_epochs),
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=train_handlers,
            amp=use_amp,
            event_names=event_names,
            event_to_attr=event_to_attr,
            decollate=False,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        if not is_whole_number(n_critic, minimum=0):
            raise ValueError(f"n_critic must be a whole number ≥ 0 (critic steps per encoder step), got {n_critic!r}")
        if objective.critic_parameters() and int(n_critic) == 0:
            # the critic steps are the only ones that train them: an untrained critic's estimate measures nothing
            raise ValueError(
                f"method {objective.spec.name!r} trains critics (or adversaries) in n_critic steps per encoder step, "
                "and n_critic 0 would leave them untrained: give n_critic >= 1"
            )
        if objective.critic_parameters() and critic_optimizer is None:
            raise ValueError(
                f"method {objective.spec.name!r} has critics: pass critic_optimizer over objective.critic_parameters()"
            )
        if objective.gradnorm is not None and gradnorm_optimizer is None:
            raise ValueError(
                f"method {objective.spec.name!r} uses GradNorm: pass gradnorm_optimizer over objective.gradnorm.parameters()"
            )
        self.network = network
        self.optimizer = optimizer
        self.objective = objective.to(device)
        self.critic_optimizer = critic_optimizer
        self.gradnorm_optimizer = gradnorm_optimizer
        self.n_critic = int(n_critic)
        self.image_key = image_key
        self.scaler = torch.amp.GradScaler("cuda") if use_amp else None
        if isinstance(objective.terms, MutualInformationTerms):
            NegativeMIWarning(objective.terms.estimator_name).attach(self)

    def run(self) -> None:  # type: ignore[override]
        """Train, keeping this trainer's ``GradScaler``.

        MONAI's ``Trainer.run`` replaces ``scaler`` with a new (deprecated ``torch.cuda.amp``) one at
        every call, after the checkpoint items were handed out: a resumed run would load the scaler
        state into an object no longer used, and save one that never stepped.

        A data loader without a batch (fewer training samples than ``batch_size`` with
        ``drop_last``) is refused: MONAI would log that it skips the run and return, leaving no model.
        """
        if isinstance(self.data_loader, Sized) and len(self.data_loader) == 0:
            dataset = getattr(self.data_loader, "dataset", None)
            samples = f"{len(dataset)} training samples" if isinstance(dataset, Sized) else "the training samples"
            processes = world_size()
            # under DDP both counts are one rank's, which a user who counted the whole manifest would not recognise
            shared = f" of this process's share of the training set, over {processes} processes" if processes > 1 else ""
            fewer = " or launch fewer processes (torchrun --nproc_per_node)" if processes > 1 else ""
            raise ValueError(
                f"the training data loader yields no batch ({samples}{shared}, batch_size "
                f"{getattr(self.data_loader, 'batch_size', None)} per process, drop_last): lower the batch size "
                f"(the bundles' --batch_size){fewer} or train on more subjects"
            )
        Workflow.run(self)

    def checkpoint_items(self) -> dict[str, Any]:
        """Everything a resumed run needs, for ``CheckpointSaver(save_dict=...)`` / ``CheckpointLoader``."""
        items: dict[str, Any] = {
            "network": self.network,
            "objective": self.objective,
            "optimizer": self.optimizer,
            "trainer": self,
        }
        optional = {"critic_optimizer": self.critic_optimizer, "gradnorm_optimizer": self.gradnorm_optimizer, "scaler": self.scaler}
        items.update({name: item for name, item in optional.items() if item is not None})
        return items

    def _prepare(self, batchdata: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        missing = [key for key in (self.image_key, *self.objective.label_names) if key not in batchdata]
        if missing:
            raise KeyError(
                f"batch lacks {missing}; it has {sorted(batchdata)}. The data set must give the image and one "
                f"label per factor of the method ({self.objective.label_names})"
            )
        kwargs = {"device": self.state.device, "non_blocking": self.non_blocking, **self.to_kwargs}
        # float64 / integer images from numpy pipelines would clash with float32 weights
        image = torch.as_tensor(batchdata[self.image_key]).to(**kwargs).float()
        if not bool(torch.isfinite(image).all()):
            subjects = batchdata.get("subject_id")
            raise ValueError(
                f"the images of the batch at iteration {self.state.iteration} hold NaN or infinite values"
                + (f" (subjects {list(subjects)})" if subjects is not None else "")
                + "; re-run `mimm-med preprocess`, which refuses such images, or check the transforms"
            )
        labels = {name: torch.as_tensor(batchdata[name]).to(**kwargs) for name in self.objective.label_names}
        self.objective.check_labels(labels, batch_size=image.shape[0])
        return image, labels

    def _autocast(self) -> Any:
        return torch.autocast("cuda", **self.amp_kwargs) if self.amp else nullcontext()

    def _check_finite(
        self, engine: MIMMXTrainer, name: str, value: Tensor, fix: str = "Lower the learning rate or mi_weight."
    ) -> None:
        value = value.detach()
        if not bool(torch.isfinite(value).all()):
            shown = f"= {float(value)}" if value.numel() == 1 else "holds NaN or infinite values"
            raise TrainingDiverged(
                f"training diverged at epoch {engine.state.epoch}, iteration {engine.state.iteration}: "
                f"{name} {shown}. {fix}"
            )

    def _critic_phase(self, engine: MIMMXTrainer, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> float:
        if self.critic_optimizer is None or self.n_critic == 0:
            return float("nan")
        detached = {key: value.detach().float() for key, value in outputs.items()}
        loss = torch.zeros(())
        for _ in range(self.n_critic):
            self.critic_optimizer.zero_grad(set_to_none=True)
            loss = self.objective.critic_loss(detached, labels)
            # checked here: a diverged critic would next show as a NaN dependence term, blamed on the encoder
            self._check_finite(engine, "critic loss", loss, "Lower critic_lr, or raise the batch size.")
            loss.backward()
            self.critic_optimizer.step()
        return float(loss.detach())

    def _iteration(self, engine: MIMMXTrainer, batchdata: dict[str, Any]) -> dict[str, float]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        image, labels = self._prepare(batchdata)
        objective = self.objective
        self.network.train()
        objective.train()
        with self._autocast():
            outputs = self.network(image)
        # Every part is a slice of the shared features, and every head's output is checked through its
        # loss below: the features are what the critics must not see non-finite.
        self._check_finite(engine, "network output 'features'", outputs["features"])
        report: dict[str, float] = {"critic_loss": self._critic_phase(engine, outputs, labels)}

        self.optimizer.zero_grad(set_to_none=True)
        task_losses = objective.task_losses(outputs, labels)
        task_total = objective.task_total(task_losses)
        for name, value in task_losses.items():
            self._check_finite(engine, f"loss of task {name!r}", value)
        total = task_total
        terms = objective.dependence_terms(outputs, labels)
        core = getattr(self.network, "module", self.network)  # DistributedDataParallel wraps the MIMMXNet
        shared = [p for p in core.shared_layer.parameters() if p.requires_grad]
        # Shared-layer gradients taken apart from the backward (α, GradNorm) are scaled as it is.
        loss_scale = self.scaler.get_scale() if self.scaler is not None else 1.0
        if terms:
            for name, value in terms.items():
                self._check_finite(engine, f"dependence term {name!r}", value)
            weights = objective.term_weights(terms)
            penalty = (weights * torch.stack(list(terms.values()))).sum()
            scale = torch.ones((), device=penalty.device)
            if objective.spec.adaptive_scaling:
                scale = _clipping_scale(task_total, penalty, shared, loss_scale)
                if self.scaler is None:
                    self._check_finite(engine, "MI gradient scale α (a gradient at the shared layer overflowed)", scale)
            # λ multiplies after the clip (MIMM-X's gradient-norm scaling), so the MI gradient at the shared layer is at most
            # λ times the task gradient: λ stays the knob of how much the penalty may outweigh the task.
            total = task_total + objective.mi_weight * scale * penalty
            report.update({f"dependence/{name}": float(value.detach()) for name, value in terms.items()})
            report.update({f"weight/{name}": float(w) for name, w in zip(terms, weights)})
            report["mi_scale"] = float(scale.detach())

        gradnorm_grads = None
        if objective.gradnorm is not None:
            gradnorm_loss = objective.gradnorm.gradnorm_loss(task_losses, shared, loss_scale)
            gradnorm_grads = _mean_over_ranks(
                torch.autograd.grad(gradnorm_loss, list(objective.gradnorm.parameters()), retain_graph=True)
            )
            if self.scaler is not None and not all(bool(torch.isfinite(grad).all()) for grad in gradnorm_grads):
                gradnorm_grads = None  # overflowed at this loss scale: skipped, as the GradScaler skips the step

        if self.scaler is not None:
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            self.optimizer.step()
        if gradnorm_grads is not None and self.gradnorm_optimizer is not None:
            self.gradnorm_optimizer.zero_grad(set_to_none=True)
            for parameter, grad in zip(objective.gradnorm.parameters(), gradnorm_grads):
                parameter.grad = grad
            self.gradnorm_optimizer.step()
            objective.gradnorm.renormalize()
            report.update({f"task_weight/{k}": v for k, v in objective.gradnorm.weights_by_name().items()})

        report["loss"] = float(total.detach())
        report.update({f"loss/{name}": float(value.detach()) for name, value in task_losses.items()})
        return report
