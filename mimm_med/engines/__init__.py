"""Training engines: methods, objectives and the alternating critic / encoder trainer."""

from .batch_norm import RecomputeBatchNorm
from .dependence import (
    AdversarialTerms,
    DependenceTerms,
    DistanceCorrelationTerms,
    MMDTerms,
    MutualInformationTerms,
)
from .head_refit import InvariantHeadRefit
from .inferer import OutputKeyInferer
from .methods import METHODS, PENALTY_METHODS, MethodSpec, parse_method
from .objective import MIMMXObjective
from .resume import ResumeFromLatest, latest_checkpoint
from .trainer import MIMMXTrainer, TrainingDiverged

__all__ = [
    "METHODS",
    "PENALTY_METHODS",
    "AdversarialTerms",
    "DependenceTerms",
    "DistanceCorrelationTerms",
    "InvariantHeadRefit",
    "MIMMXObjective",
    "MIMMXTrainer",
    "MMDTerms",
    "MethodSpec",
    "OutputKeyInferer",
    "RecomputeBatchNorm",
    "ResumeFromLatest",
    "MutualInformationTerms",
    "TrainingDiverged",
    "latest_checkpoint",
    "parse_method",
]
