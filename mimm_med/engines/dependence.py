"""Per-factor dependence terms between the primary features f_y and each spurious factor.

Every term is differentiable w.r.t. the network outputs; the encoder minimizes it. Terms with
learnable parts (MI critics, adversaries) also define ``critic_loss`` on detached outputs, which the
trainer minimizes over :meth:`DependenceTerms.parameters` in its critic steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimm_med.mi import ESTIMATORS, AdversarialHead, DistanceCorrelation, MMDPenalty


class DependenceTerms(nn.Module):
    """Base class: ``forward(outputs, labels) -> {term name: scalar}``.

    Parameters
    ----------
    primary
        Name of the primary part.
    factors
        Names of the spurious factors.
    """

    def __init__(self, primary: str, factors: Sequence[str]) -> None:
        super().__init__()
        if not factors:
            raise ValueError("a dependence penalty needs at least one spurious factor")
        self.primary = primary
        self.factors = list(factors)

    @property
    def term_names(self) -> list[str]:
        """Names of the terms ``forward`` returns, in order."""
        return list(self.factors)

    def critic_loss(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor | None:
        """Loss of the learnable parts on detached ``outputs``; ``None`` when there are none."""
        return None

    def primary_features(self, outputs: Mapping[str, Tensor]) -> Tensor:
        return outputs[f"{self.primary}_features"]


def _factor_width(num_classes: int) -> int:
    """Columns of :func:`_factor_as_matrix` for a factor with ``num_classes`` (1: regression)."""
    return num_classes if num_classes >= 2 else 1


def _factor_as_matrix(values: Tensor, num_classes: int) -> Tensor:
    """One-hot codes for a classification factor, a column for a regression factor."""
    if num_classes >= 2:
        return F.one_hot(values.long().view(-1), num_classes).float()
    return values.float().view(-1, 1)


class MutualInformationTerms(DependenceTerms):
    """MI estimates I(f_y; f_zk) (and optionally I(f_zi; f_zj)) with one estimator per pair.

    The encoder step's gradient reaches f_y only: f_zk is held fixed as the reference of what z_k
    looks like (its head keeps it informative). Letting the MI gradient reshape f_zk too gives the
    encoder a second way to lower the estimate without cleaning f_y; on Digits-Morpho the primary
    loss then barely fell (0.53 after 8 epochs, against 0.25 with f_zk fixed).

    Parameters
    ----------
    part_sizes
        Feature size of every part, primary included.
    estimator
        A name of :data:`mimm_med.mi.ESTIMATORS`: ``"mine"``, ``"nwj"``, ``"infonce"``, ``"club"`` or
        ``"gaussian"`` (closed form, no critic).
    conditional
        Estimate I(f_y; f_zk | y) with negatives drawn within each primary class.
    reference
        What stands for z_k in the pair: ``"features"`` (f_zk, MIMM's choice) or ``"labels"`` (the
        factor's one-hot label, or its value for a regression factor). With labels the estimate
        targets I(f_y; z_k) itself, what the leakage probe measures, rather than the dependence on
        whatever else f_zk encodes (f_zk may carry y as a shortcut for z_k).
    num_classes
        Classes of every factor (1 for regression); needed with ``reference="labels"``.
    balanced
        Estimate the MI under the cell-balanced distribution of the batch: sample weights
        1 / count(y, z_k) for the pair (y, z_k) (1 / count(z_i, z_j) for factor pairs). When z
        agrees with y at rate r, the plain I(f_y; f_zk) cannot reach zero without f_y losing y
        (it is at least I(y; z_k)); under the balanced weights y and z_k are independent, so the
        estimate reaches zero exactly when f_y carries nothing about z_k beyond y — the leakage the
        balanced test set measures.
    factor_pairs
        Also penalize MI between every pair of spurious parts.
    estimator_options
        Passed to each estimator (e.g. ``hidden_dim``).
    """

    def __init__(
        self,
        primary: str,
        factors: Sequence[str],
        part_sizes: Mapping[str, int],
        estimator: str = "mine",
        conditional: bool = False,
        factor_pairs: bool = False,
        estimator_options: Mapping[str, Any] | None = None,
        balanced: bool = False,
        reference: str = "features",
        num_classes: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(primary, factors)
        if reference not in ("features", "labels"):
            raise ValueError(f"reference must be 'features' or 'labels', got {reference!r}")
        if reference == "labels" and num_classes is None:
            raise ValueError("reference='labels' needs num_classes of every factor")
        if reference == "labels" and factor_pairs:
            raise ValueError(
                "factor_pairs=True with reference='labels' would estimate the MI between two factors' labels, "
                "which training cannot change (a constant that takes attention weight from the f_y terms): "
                "use reference='features' for factor pairs"
            )
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {estimator!r}; choose one of {list(ESTIMATORS)}")
        pairs = [(primary, z) for z in self.factors]
        if factor_pairs:
            pairs += [(a, b) for i, a in enumerate(self.factors) for b in self.factors[i + 1 :]]
        self.pairs = pairs
        self.estimator_name = estimator
        self.conditional = conditional
        self.balanced = balanced
        self.reference = reference
        self.num_classes = {z: int(num_classes[z]) for z in self.factors} if num_classes is not None else {}
        sizes = dict(part_sizes)
        if reference == "labels":
            sizes.update({z: _factor_width(n) for z, n in self.num_classes.items()})
        self.estimators = nn.ModuleDict(
            {
                self._pair_name(a, b): ESTIMATORS[estimator](sizes[a], sizes[b], **(estimator_options or {}))
                for a, b in pairs
            }
        )

    def _pair_name(self, a: str, b: str) -> str:
        return b if a == self.primary else f"{a}~{b}"

    @property
    def term_names(self) -> list[str]:
        return list(self.estimators)

    def _strata(self, labels: Mapping[str, Tensor]) -> Tensor | None:
        return labels[self.primary].long().view(-1) if self.conditional else None

    def _weights(self, labels: Mapping[str, Tensor], a: str, b: str) -> Tensor | None:
        if not self.balanced:
            return None
        cells = labels[a].long().view(-1) * (int(labels[b].max()) + 1) + labels[b].long().view(-1)
        return 1.0 / torch.bincount(cells).float()[cells]

    def _side(self, name: str, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor], detach: bool) -> Tensor:
        if name == self.primary or self.reference == "features":
            features = outputs[f"{name}_features"]
            return features.detach() if detach else features
        return _factor_as_matrix(labels[name], self.num_classes[name])

    def _per_pair(self, method: str, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        strata = self._strata(labels)
        return {
            name: getattr(self.estimators[name], method)(
                self._side(a, outputs, labels, detach=False),
                self._side(b, outputs, labels, detach=a == self.primary),
                strata=strata,
                weights=self._weights(labels, a, b),
            )
            for name, (a, b) in zip(self.estimators, self.pairs)
        }

    def forward(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._per_pair("forward", outputs, labels)

    def critic_loss(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor:
        return torch.stack(list(self._per_pair("critic_loss", outputs, labels).values())).sum()


class DistanceCorrelationTerms(DependenceTerms):
    """Distance correlation between f_y and each factor's labels (one-hot for classes)."""

    def __init__(self, primary: str, factors: Sequence[str], num_classes: Mapping[str, int]) -> None:
        super().__init__(primary, factors)
        self.num_classes = {z: int(num_classes[z]) for z in self.factors}
        self.dcor = DistanceCorrelation()

    def forward(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        f_y = self.primary_features(outputs)
        return {z: self.dcor(f_y, _factor_as_matrix(labels[z], self.num_classes[z])) for z in self.factors}


class MMDTerms(DependenceTerms):
    """MMD between the f_y distributions of the groups of each (classification) factor."""

    def __init__(self, primary: str, factors: Sequence[str], num_classes: Mapping[str, int]) -> None:
        super().__init__(primary, factors)
        regression = [z for z in self.factors if int(num_classes[z]) < 2]
        if regression:
            raise ValueError(f"MMD needs groups; factors {regression} are regression targets: bin them first")
        self.mmd = MMDPenalty()

    def forward(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        f_y = self.primary_features(outputs)
        return {z: self.mmd(f_y, labels[z].long().view(-1)) for z in self.factors}


class AdversarialTerms(DependenceTerms):
    """Adversaries predicting each factor from f_y behind gradient reversal (DANN-style).

    The adversaries learn in the critic steps on detached f_y; in the encoder step the reversed
    gradient of their loss pushes f_y to carry no information about the factor.
    """

    def __init__(
        self, primary: str, factors: Sequence[str], part_sizes: Mapping[str, int], num_classes: Mapping[str, int]
    ) -> None:
        super().__init__(primary, factors)
        regression = [z for z in self.factors if int(num_classes[z]) < 2]
        if regression:
            raise ValueError(f"the adversarial method needs class labels; factors {regression} are regression targets")
        self.adversaries = nn.ModuleDict(
            {z: AdversarialHead(part_sizes[primary], int(num_classes[z])) for z in self.factors}
        )

    def _losses(self, f_y: Tensor, labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {z: F.cross_entropy(self.adversaries[z](f_y).float(), labels[z].long().view(-1)) for z in self.factors}

    def forward(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self._losses(self.primary_features(outputs), labels)

    def critic_loss(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor:
        return torch.stack(list(self._losses(self.primary_features(outputs), labels).values())).sum()
