"""Mutual-information estimators (MINE, NWJ, InfoNCE, CLUB) and the baselines' dependence penalties."""

from mimm_med.mi.base import ContrastPairs, MutualInformationEstimator, gather_batch
from mimm_med.mi.critics import ConcatCritic, SeparableCritic, make_critic, mlp
from mimm_med.mi.estimators import CLUB, MINE, NWJ, CriticEstimator, InfoNCE
from mimm_med.mi.penalties import (
    AdversarialHead,
    DistanceCorrelation,
    GradientReversal,
    GradientReversalFunction,
    MMDPenalty,
)
from mimm_med.mi.synthetic import correlated_gaussians

__all__ = [
    "AdversarialHead",
    "CLUB",
    "ConcatCritic",
    "ContrastPairs",
    "CriticEstimator",
    "DistanceCorrelation",
    "GradientReversal",
    "GradientReversalFunction",
    "InfoNCE",
    "MINE",
    "MMDPenalty",
    "MutualInformationEstimator",
    "NWJ",
    "SeparableCritic",
    "correlated_gaussians",
    "gather_batch",
    "make_critic",
    "mlp",
]
