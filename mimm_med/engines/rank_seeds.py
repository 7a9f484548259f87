"""Distinct random draws of the training loader on each rank of a distributed run, reproducible across resumes."""

from __future__ import annotations

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.data.utils import set_rnd
from monai.utils.misc import MAX_SEED
from torch.utils.data import DataLoader

from mimm_med.distributed import world_size

__all__ = ["RankLoaderSeeds"]


class RankLoaderSeeds:
    """Ignite handler: at each epoch's start, seed a loader's random draws anew for each rank.

    Every rank of a bundle run seeds its generators alike (``set_determinism(seed)``), which keeps the
    network, the critics and the checkpoint the same on all ranks; but MONAI's DataLoader then seeds
    the transforms (and the workers' base seed) alike on every rank too, so the ranks' images of a
    step all drew one flip, one affine. This handler draws one seed from torch's global generator,
    the same on every rank, and seeds rank ``r``'s transforms, worker base seed and sampler generator
    (the rebalancing sampler's) with ``seed + r``: the ranks draw differently, and a resumed run,
    whose checkpoint restores the global generator, draws the same seeds as the uninterrupted run
    (rank 0's checkpoint holds rank 0's loader states only). Without a process group it does
    nothing, so one-process runs draw as before.

    Parameters
    ----------
    loader
        The training loader: its dataset's transforms are seeded in this process, its ``generator``
        gives the base seed of its workers, its sampler's ``generator`` (if it has one) its draws.

    Examples
    --------
    >>> from monai.data import DataLoader
    >>> from monai.engines import SupervisedTrainer
    >>> records = [{"image": torch.rand(3), "label": torch.rand(1)} for _ in range(8)]
    >>> train_loader = DataLoader(records, batch_size=4, shuffle=True)
    >>> net = torch.nn.Linear(3, 1)
    >>> optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> trainer = SupervisedTrainer("cpu", 2, train_loader, net, optimizer, torch.nn.MSELoss())
    >>> RankLoaderSeeds(train_loader).attach(trainer)
    >>> trainer.run()
    >>> train_loader.generator is None  # one process: the loader is left as it was
    True
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def attach(self, engine: Engine) -> None:
        # ignite builds each epoch's data iterator (and with it the workers) after EPOCH_STARTED
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if world_size() == 1:
            return
        seed = int(torch.randint(MAX_SEED - world_size(), ()).item()) + dist.get_rank()
        set_rnd(self.loader.dataset, seed)
        self.loader.generator = torch.Generator().manual_seed(seed)
        sampler_generator = getattr(self.loader.sampler, "generator", None)
        if isinstance(sampler_generator, torch.Generator):
            sampler_generator.manual_seed(seed)
