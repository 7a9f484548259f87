"""Batch-norm running statistics recomputed from the current weights before each validation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from torch import nn
from torch.optim.swa_utils import update_bn

from mimm_med.checks import is_whole_number
from mimm_med.distributed import world_size
from mimm_med.evaluation.outputs import input_dtype


class RecomputeBatchNorm:
    """Ignite handler: recompute a network's batch-norm statistics over a loader every ``interval`` epochs.

    With small 3D batches and fast-moving weights the running averages lag the weights, and the
    evaluation-mode network can put every image in one class (the stand-in brain's MIMM-X did).
    Attach it before the ``ValidationHandler`` so that validation, the best-checkpoint choice and the
    registered model all use statistics of the final weights. The forward passes run in training
    mode without gradients (``torch.optim.swa_utils.update_bn``); only the running statistics change.
    Under ``torch.distributed`` each rank passes over its own shard and the statistics are then
    averaged over the ranks, so that every rank validates (and rank 0 saves) one network.

    Parameters
    ----------
    loader
        Batches of MONAI dicts, usually the training loader; images are cast to the dtype of the
        network's parameters, as :class:`~mimm_med.engines.MIMMXTrainer` casts them.
    interval
        Epochs between recomputations; match the validation interval.
    image_key
        Key of the network input in a batch.

    Examples
    --------
    >>> import torch
    >>> from monai.engines import SupervisedTrainer
    >>> _ = torch.manual_seed(0)
    >>> train_loader = [{"image": torch.randn(8, 3) + 5, "label": torch.zeros(8, 2)} for _ in range(4)]
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    >>> optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> trainer = SupervisedTrainer("cpu", 2, train_loader, net, optimizer, torch.nn.MSELoss())
    >>> RecomputeBatchNorm(train_loader, interval=1).attach(trainer)
    >>> trainer.run()

    The running mean is now that of the batch-norm inputs over the loader, under the final weights:

    >>> with torch.no_grad():
    ...     inputs = torch.cat([net[0](batch["image"]) for batch in train_loader])
    >>> torch.allclose(net[1].running_mean, inputs.mean(0))
    True
    """

    def __init__(self, loader: Iterable[dict[str, Any]], interval: int = 1, image_key: str = "image") -> None:
        if not is_whole_number(interval, minimum=1):
            raise ValueError(f"interval must be a whole number of epochs >= 1 (the bundles' val_interval), got {interval!r}")
        self.loader = loader
        self.interval = int(interval)
        self.image_key = image_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        network = getattr(engine.network, "module", engine.network)  # the module inside DistributedDataParallel
        # cast as the trainer casts: float64 / integer images of a NumPy pipeline would clash with float32 weights
        dtype = input_dtype(network)
        images = (torch.as_tensor(batch[self.image_key]).to(dtype) for batch in self.loader)
        update_bn(images, network, device=next(network.parameters()).device)
        if world_size() > 1:
            _average_over_ranks(network)


def _average_over_ranks(network: nn.Module) -> None:
    # DDP broadcasts rank 0's buffers only in forward passes with gradients, so validation (without)
    # used each rank's own statistics: val metrics gathered over ranks mixed two networks (CPU, gloo;
    # SyncBatchNorm makes them equal on GPUs). update_bn averages its batches' statistics, so the mean
    # over ranks is that average over every rank's batches (shards of equal size).
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            for statistic in (module.running_mean, module.running_var):
                dist.all_reduce(statistic)
                statistic /= dist.get_world_size()
