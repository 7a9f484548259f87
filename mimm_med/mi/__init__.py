"""Mutual-information estimators (MINE, NWJ, InfoNCE, CLUB, Gaussian) and the baselines' dependence penalties."""

from mimm_med.mi.base import ContrastPairs, MutualInformationEstimator, PairScoreEstimator, gather_batch
from mimm_med.mi.critics import ConcatCritic, SeparableCritic, make_critic, mlp
from mimm_med.mi.estimators import CLUB, ESTIMATORS, MINE, NWJ, CriticEstimator, GaussianMI, InfoNCE
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
    "ESTIMATORS",
    "GaussianMI",
    "GradientReversal",
    "GradientReversalFunction",
    "InfoNCE",
    "MINE",
    "MMDPenalty",
    "MutualInformationEstimator",
    "NWJ",
    "PairScoreEstimator",
    "SeparableCritic",
    "correlated_gaussians",
    "gather_batch",
    "make_critic",
    "mlp",
]
