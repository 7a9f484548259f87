"""The loss of one training method: task losses, dependence terms and how they are weighted."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimm_med.checks import is_whole_number
from mimm_med.networks import MIMMXNet
from mimm_med.weighting import ConfounderAttention, GradNorm

from .dependence import (
    AdversarialTerms,
    DependenceTerms,
    DistanceCorrelationTerms,
    MMDTerms,
    MutualInformationTerms,
)
from .methods import MethodSpec, parse_method


class MIMMXObjective(nn.Module):
    """Everything a method adds to the network: dependence terms, their weighting, task balancing.

    ``L = Σ_t w_t·L_t + λ·α·Σ_k a_k·D_k`` with task losses ``L_t`` (the primary task, plus the
    spurious heads for MIMM / MIMM-X), GradNorm weights ``w_t`` (MIMM-X, else 1), dependence terms
    ``D_k`` (MI, dCor, MMD or adversary), confounder attention ``a_k`` (MIMM-X, else the mean) and the
    MI gradient scale ``α`` the trainer computes (MIMM-X, else 1).

    Parameters
    ----------
    method
        One of :data:`mimm_med.engines.methods.METHODS`.
    part_sizes, num_classes
        Of every network part, the primary first (as :class:`~mimm_med.networks.MIMMXNet` has them).
    spurious
        Factors the method acts on; default every part after the first.
    mi_weight
        λ.
    estimator, conditional, factor_pairs, estimator_options, balanced, reference
        See :class:`~mimm_med.engines.dependence.MutualInformationTerms` (MIMM, MIMM-X).
    temperature, attention_momentum
        Of :class:`~mimm_med.weighting.ConfounderAttention` (MIMM-X).
    gradnorm_alpha
        Asymmetry of :class:`~mimm_med.weighting.GradNorm` (MIMM-X).

    Examples
    --------
    >>> from mimm_med.networks import MIMMXNet
    >>> net = MIMMXNet("small_cnn", {"y": 8, "z": 8}, {"y": 2, "z": 2}, spatial_dims=2)
    >>> objective = MIMMXObjective.for_network("mimmx", net, mi_weight=1.0)
    >>> objective.label_names
    ['y', 'z']
    """

    def __init__(
        self,
        method: str,
        part_sizes: Mapping[str, int],
        num_classes: Mapping[str, int],
        spurious: Sequence[str] | None = None,
        mi_weight: float = 1.0,
        estimator: str = "mine",
        conditional: bool = False,
        factor_pairs: bool = False,
        estimator_options: Mapping[str, Any] | None = None,
        temperature: float = 1.0,
        attention_momentum: float = 0.9,
        gradnorm_alpha: float = 1.5,
        balanced: bool = False,
        reference: str = "features",
    ) -> None:
        super().__init__()
        self.spec: MethodSpec = parse_method(method)
        names = list(part_sizes)
        if not names:
            raise ValueError("part_sizes must name at least the primary task first, e.g. {'age_group': 16, 'sex': 16}")
        self.primary = names[0]
        if isinstance(spurious, str):
            # list("sex") would make three factors 's', 'e', 'x'
            raise ValueError(f"spurious must be a sequence of factor names, got the string {spurious!r}; pass [{spurious!r}]")
        self.spurious = list(names[1:] if spurious is None else spurious)
        repeated = sorted({z for z in self.spurious if self.spurious.count(z) > 1})
        if repeated:
            raise ValueError(f"spurious factors {repeated} are given more than once in {self.spurious}")
        unknown = [z for z in self.spurious if z not in names[1:]]
        if unknown:
            raise ValueError(f"spurious factors {unknown} are not network parts; parts are {names}")
        if self.spec.penalty is not None and not self.spurious:
            raise ValueError(f"method {method!r} needs at least one spurious factor part in the network")
        if not (math.isfinite(float(mi_weight)) and float(mi_weight) >= 0):
            # a negative weight would maximize the dependence the method is meant to remove
            raise ValueError(f"mi_weight must be a finite number >= 0 (λ of the dependence term), got {mi_weight}")
        self.mi_weight = float(mi_weight)
        self.num_classes = _class_counts(names, num_classes)
        _refuse_regression_where_classes_are_needed(self.num_classes, self.primary, self.spurious, conditional, balanced, reference)
        self.task_names = [self.primary, *(self.spurious if self.spec.factor_heads else [])]
        self.terms = self._build_terms(part_sizes, estimator, conditional, factor_pairs, estimator_options, balanced, reference)
        self.attention = (
            ConfounderAttention(self.terms.term_names, temperature=temperature, momentum=attention_momentum)
            if self.spec.attention and self.terms is not None
            else None
        )
        self.gradnorm = GradNorm(self.task_names, alpha=gradnorm_alpha) if self.spec.gradnorm else None

    @classmethod
    def for_network(cls, method: str, network: MIMMXNet, **kwargs: Any) -> MIMMXObjective:
        """Objective matching the parts and heads of ``network``."""
        return cls(method, dict(zip(network.part_names, network.part_sizes)), network.num_classes, **kwargs)

    def _build_terms(
        self,
        part_sizes: Mapping[str, int],
        estimator: str,
        conditional: bool,
        factor_pairs: bool,
        estimator_options: Mapping[str, Any] | None,
        balanced: bool,
        reference: str,
    ) -> DependenceTerms | None:
        penalty = self.spec.penalty
        if penalty is None:
            return None
        if penalty in ("mimm", "mimmx"):
            return MutualInformationTerms(
                self.primary,
                self.spurious,
                part_sizes,
                estimator,
                conditional,
                factor_pairs,
                estimator_options,
                balanced,
                reference,
                self.num_classes,
            )
        if penalty == "dcor":
            return DistanceCorrelationTerms(self.primary, self.spurious, self.num_classes)
        if penalty == "mmd":
            return MMDTerms(self.primary, self.spurious, self.num_classes)
        return AdversarialTerms(self.primary, self.spurious, part_sizes, self.num_classes)

    @property
    def label_names(self) -> list[str]:
        """Labels a batch must carry for this objective."""
        return [self.primary, *self.spurious]

    def check_labels(self, labels: Mapping[str, Tensor], batch_size: int | None = None) -> None:
        """Raise a ``ValueError`` naming the factor if a label is not one finite class index of its head per image.

        Cross-entropy would raise PyTorch's ``Target 2 is out of bounds`` or a batch-size mismatch
        without naming the factor, and truncate 0.5 to class 0 or count -1 (CheXpert's "uncertain")
        as a group of its own silently. ``batch_size``: the number of images the labels go with.
        """
        for name in self.label_names:
            values = torch.as_tensor(labels[name]).detach().double()
            shape = tuple(values.shape)
            if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1) or (batch_size is not None and values.numel() != batch_size):
                expected = f"({batch_size},)" if batch_size is not None else "(B,)"
                raise ValueError(
                    f"label {name!r} has shape {shape}, expected {expected}: one class index (or value) per image, "
                    "not one-hot rows"
                )
            if not bool(torch.isfinite(values).all()):
                raise ValueError(f"label {name!r} is NaN or infinite in this batch; drop or fill those rows in the manifest")
            classes = self.num_classes[name]
            if classes < 2:
                continue
            bad = (values < 0) | (values >= classes) | (values != values.round())
            if bool(bad.any()):
                shown = sorted(set(values[bad].tolist()))[:5]
                raise ValueError(
                    f"label {name!r} of a {classes}-class head must be a class index 0..{classes - 1}, but this batch "
                    f"has {shown}. Map the values to class indices (a cohort card's label coding does) or drop those rows"
                )

    def task_losses(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Cross-entropy (classes) or mean squared error (regression) of every trained head, in float32."""
        losses = {}
        for name in self.task_names:
            prediction = outputs[f"{name}_output"].float()
            if self.num_classes[name] >= 2:
                losses[name] = F.cross_entropy(prediction, labels[name].long().view(-1))
            else:
                losses[name] = F.mse_loss(prediction.view(-1), labels[name].float().view(-1))
        return losses

    def task_total(self, losses: Mapping[str, Tensor]) -> Tensor:
        """``Σ_t w_t·L_t`` with GradNorm weights (MIMM-X) or unit weights."""
        if self.gradnorm is not None:
            return self.gradnorm.weighted_loss(losses)
        return torch.stack(list(losses.values())).sum()

    def dependence_terms(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The per-factor terms ``D_k``; empty for ERM and rebalancing."""
        return {} if self.terms is None else self.terms(outputs, labels)

    def term_weights(self, terms: Mapping[str, Tensor]) -> Tensor:
        """Confounder attention ``a`` (MIMM-X) or the plain mean."""
        stacked = torch.stack(list(terms.values()))
        if self.attention is not None:
            return self.attention(stacked.detach())
        return torch.full_like(stacked, 1.0 / len(stacked))

    def critic_loss(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor | None:
        """Loss of the critics / adversaries on detached outputs; ``None`` without learnable terms."""
        return None if self.terms is None else self.terms.critic_loss(outputs, labels)

    def critic_parameters(self) -> list[nn.Parameter]:
        """Parameters trained in the critic steps."""
        return [] if self.terms is None else list(self.terms.parameters())


def _class_counts(names: Sequence[str], num_classes: Mapping[str, Any]) -> dict[str, int]:
    missing = [name for name in names if name not in num_classes]
    if missing:
        raise ValueError(f"num_classes lacks {missing}: give every part's number of classes (1 for a regression head)")
    invalid = {name: num_classes[name] for name in names if not is_whole_number(num_classes[name], minimum=1)}
    if invalid:
        raise ValueError(f"num_classes must be whole numbers >= 2 (classes) or 1 (regression), got {invalid}")
    return {name: int(num_classes[name]) for name in names}


def _refuse_regression_where_classes_are_needed(
    num_classes: Mapping[str, int], primary: str, spurious: Sequence[str], conditional: bool, balanced: bool, reference: str
) -> None:
    # Each of these options reads the labels as class codes: a continuous target would be cut to
    # integers (ages in [0, 1) all class 0) and the estimate silently become another one.
    regression = [name for name in (primary, *spurious) if num_classes[name] == 1]
    needs = {
        "conditional=True (strata of the primary label's classes)": conditional and primary in regression,
        "balanced=True (weights of the (y, z) cells)": balanced and bool(regression),
        "reference='labels' (the factors' class labels)": reference == "labels" and bool(set(regression) & set(spurious)),
    }
    for option, refused in needs.items():
        if refused:
            raise ValueError(
                f"{option} needs class labels, but {regression} are regression targets (num_classes 1): bin them into "
                "classes (a label of the cohort card), or turn the option off"
            )
