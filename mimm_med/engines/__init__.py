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
from .random_states import RandomStates
from .rank_seeds import RankLoaderSeeds
from .resume import (
    ResumeFromLatest,
    RunFinished,
    RunFolderConflict,
    SettingsMismatch,
    latest_checkpoint,
    load_trained_weights,
    require_checkpoint_settings,
    trained_checkpoint,
    training_params,
)
from .trainer import MIMMXTrainer, NegativeMIWarning, TrainingDiverged

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
    "RandomStates",
    "RankLoaderSeeds",
    "ResumeFromLatest",
    "RunFinished",
    "RunFolderConflict",
    "SettingsMismatch",
    "MutualInformationTerms",
    "NegativeMIWarning",
    "TrainingDiverged",
    "latest_checkpoint",
    "load_trained_weights",
    "require_checkpoint_settings",
    "trained_checkpoint",
    "training_params",
    "parse_method",
]
