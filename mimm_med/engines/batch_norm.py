"""Batch-norm running statistics recomputed from the current weights before each validation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ignite.engine import Engine, Events
from torch.optim.swa_utils import update_bn


class RecomputeBatchNorm:
    """Ignite handler: recompute a network's batch-norm statistics over a loader every ``interval`` epochs.

    With small 3D batches and fast-moving weights the running averages lag the weights, and the
    evaluation-mode network can put every image in one class (the stand-in brain's MIMM-X did).
    Attach it before the ``ValidationHandler`` so that validation, the best-checkpoint choice and the
    registered model all use statistics of the final weights. The forward passes run in training
    mode without gradients (``torch.optim.swa_utils.update_bn``); only the running statistics change.

    Parameters
    ----------
    loader
        Batches of MONAI dicts, usually the training loader.
    interval
        Epochs between recomputations; match the validation interval.
    image_key
        Key of the network input in a batch.

    Examples
    --------
    >>> RecomputeBatchNorm(train_loader, interval=1).attach(trainer)
    """

    def __init__(self, loader: Iterable[dict[str, Any]], interval: int = 1, image_key: str = "image") -> None:
        self.loader = loader
        self.interval = interval
        self.image_key = image_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        # Under DistributedDataParallel the wrapped module is updated; DDP broadcasts rank 0's buffers.
        network = getattr(engine.network, "module", engine.network)
        images = (batch[self.image_key] for batch in self.loader)
        update_bn(images, network, device=next(network.parameters()).device)
