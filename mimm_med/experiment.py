"""One experiment: train a method on confounded splits, then score it with the evaluation protocol."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from monai.data import DataLoader, Dataset
from monai.utils import set_determinism

from mimm_med.checks import check_device
from mimm_med.data.confounding import rebalancing_sampler
from mimm_med.engines import InvariantHeadRefit, MIMMXObjective, MIMMXTrainer, RecomputeBatchNorm, parse_method
from mimm_med.evaluation.report import evaluate_network
from mimm_med.networks import MIMMXNet
from mimm_med.tracking import EpochAverages

TEST_SETS: dict[str, str] = {"iid": "test-iid", "balanced": "test-balanced", "inverted": "test-inverted"}


@dataclass
class ExperimentConfig:
    """Hyper-parameters of one run; every field is a plain value (JSON / MLflow params).

    ``method`` is any of :data:`mimm_med.engines.METHODS` or ``"oracle"`` (ERM; the caller trains it
    on balanced data).
    """

    method: str = "mimmx"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    mi_weight: float = 1.0
    n_critic: int = 3
    critic_lr: float = 1e-3
    gradnorm_lr: float = 0.025
    estimator: str = "mine"
    conditional: bool = False
    balanced: bool = False
    reference: str = "features"
    temperature: float = 1.0
    part_size: int = 16
    backbone: str = "small_cnn"
    backbone_kwargs: dict = field(default_factory=lambda: {"dropout": 0.2, "channels": (16, 32, 64, 128)})
    seed: int = 0
    device: str = "cpu"
    amp: bool = True
    #: Recompute batch-norm running statistics over the training set once training ends
    #: (:class:`~mimm_med.engines.RecomputeBatchNorm`).
    recompute_bn: bool = False
    #: Once training ends, refit the primary head on f_y with the factors' linear traces in the
    #: training and validation sets erased (:class:`~mimm_med.engines.InvariantHeadRefit`).
    invariant_head: bool = False

    def __post_init__(self) -> None:
        check_device(self.device)  # before the data is drawn and the network built, not inside the engine

    @property
    def training_method(self) -> str:
        return "erm" if self.method == "oracle" else self.method


def _loader(records: Sequence[dict], config: ExperimentConfig, labels: Sequence[str], train: bool, transform: Callable | None) -> DataLoader:
    dataset = Dataset(list(records), transform=transform)
    if train and parse_method(config.training_method).rebalance:
        sampler = rebalancing_sampler(records, labels, seed=config.seed)
        return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, drop_last=True)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=train, drop_last=train)


def build_run(
    train_records: Sequence[dict],
    primary: str,
    spurious: Sequence[str],
    num_classes: Mapping[str, int],
    config: ExperimentConfig,
    spatial_dims: int = 2,
    in_channels: int = 1,
    transform: Callable | None = None,
) -> MIMMXTrainer:
    """Network, objective, optimizers and trainer for ``config`` (seeded)."""
    set_determinism(config.seed)
    names = [primary, *spurious]
    network = MIMMXNet(
        config.backbone,
        {name: config.part_size for name in names},
        {name: num_classes[name] for name in names},
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        backbone_kwargs=config.backbone_kwargs,
    ).to(config.device)
    objective = MIMMXObjective.for_network(
        config.training_method,
        network,
        mi_weight=config.mi_weight,
        estimator=config.estimator,
        conditional=config.conditional,
        balanced=config.balanced,
        reference=config.reference,
        temperature=config.temperature,
    )
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    critic_parameters = objective.critic_parameters()
    critic_optimizer = torch.optim.Adam(critic_parameters, lr=config.critic_lr) if critic_parameters else None
    gradnorm_optimizer = (
        torch.optim.Adam(objective.gradnorm.parameters(), lr=config.gradnorm_lr) if objective.gradnorm is not None else None
    )
    return MIMMXTrainer(
        device=config.device,
        max_epochs=config.epochs,
        train_data_loader=_loader(train_records, config, names, True, transform),
        network=network,
        optimizer=optimizer,
        objective=objective,
        critic_optimizer=critic_optimizer,
        gradnorm_optimizer=gradnorm_optimizer,
        n_critic=config.n_critic,
        amp=config.amp,
    )


def run_experiment(
    sets: Mapping[str, Sequence[dict]],
    primary: str,
    spurious: Sequence[str],
    num_classes: Mapping[str, int],
    config: ExperimentConfig,
    spatial_dims: int = 2,
    in_channels: int = 1,
    transform: Callable | None = None,
    residual_mi: Mapping[str, Any] | None = None,
    eval_transform: Callable | None = None,
) -> dict[str, Any]:
    """Train on ``sets["train"]`` and evaluate on the three test sets.

    ``transform`` applies to training items (loading, augmentation), ``eval_transform`` to test items
    (loading only); records holding arrays need neither.

    Returns
    -------
    dict
        ``config``, ``seconds`` (training), ``history`` (per-epoch means of the trainer outputs),
        ``results`` (:func:`mimm_med.evaluation.evaluate_test_sets`) and ``network``.
    """
    _check_experiment(sets, primary, spurious, num_classes)
    trainer = build_run(sets["train"], primary, spurious, num_classes, config, spatial_dims, in_channels, transform)
    averages = EpochAverages()
    averages.attach(trainer)
    start = time.perf_counter()
    trainer.run()
    names = [primary, *spurious]
    if config.recompute_bn:
        RecomputeBatchNorm(_loader(sets["train"], config, names, False, transform))(trainer)
    if config.invariant_head:
        # Training images as the test images are seen: loaded, not augmented. The validation images,
        # which nothing else here uses, show how the network encodes the factors of unseen subjects.
        held_out = _loader(sets["val"], config, names, False, eval_transform) if sets.get("val") else None
        refit = InvariantHeadRefit(_loader(sets["train"], config, names, False, eval_transform), primary, spurious, held_out_loader=held_out)
        refit.refit(trainer.network)
    seconds = time.perf_counter() - start
    loaders = {short: _loader(sets[split], config, names, False, eval_transform) for short, split in TEST_SETS.items()}
    results, _ = evaluate_network(trainer.network, loaders, primary, spurious, config.device, residual_mi=residual_mi, seed=config.seed)
    return {"config": asdict(config), "seconds": seconds, "history": averages.history, "results": results, "network": trainer.network}


def _check_experiment(sets: Mapping[str, Sequence[dict]], primary: str, spurious: Sequence[str], num_classes: Mapping[str, int]) -> None:
    """Refuse before training what the evaluation after it would refuse."""
    missing = [split for split in ("train", *TEST_SETS.values()) if not sets.get(split)]
    if missing:
        raise ValueError(f"sets lacks {missing} (or they are empty): it needs 'train' and the test sets {list(TEST_SETS.values())}")
    absent = [name for name in (primary, *spurious) if name not in num_classes]
    if absent:
        raise ValueError(f"num_classes lacks {absent}: give the number of classes of the primary label and of every factor")
    regression = [name for name in (primary, *spurious) if num_classes[name] < 2]
    if regression:
        # the protocol's accuracies, groups and leakage probes are defined over classes
        raise ValueError(
            f"{regression} have regression heads (num_classes {[num_classes[name] for name in regression]}), but the "
            "evaluation protocol needs classes: bin them into classes (a label of the cohort card)"
        )
