"""The random number generators of a training run as one checkpoint item, so that a resumed run draws on."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, Randomizable, Transform
from torch.utils.data import Dataset, Sampler

__all__ = ["RandomStates"]


class RandomStates:
    """Checkpoint item holding the states of every generator that shuffles, augments or drops out in training.

    Python's, NumPy's and torch's global generators (CPU and CUDA: shuffling, dropout, the seeds of
    DataLoader workers), the generator of a sampler that has its own (rebalancing), and those of the
    random transforms of ``dataset``: MONAI's DataLoader seeds them once, when it is built without
    workers, so a resumed run restarted them and replayed the first epoch's augmentation (a bundle run
    resumed after epoch 1 ended 3 epochs with other weights than the same run uninterrupted).

    Parameters
    ----------
    dataset
        The training data set, whose ``transform`` may hold random MONAI transforms.
    sampler
        The training sampler, if it draws from a ``generator`` of its own.

    Examples
    --------
    A training set with a random flip; in a run, the item joins the checkpoint as
    ``dict(trainer.checkpoint_items(), random_states=RandomStates(train_dataset, sampler))``:

    >>> from monai.data import Dataset
    >>> from monai.transforms import RandFlipd
    >>> train_dataset = Dataset([{"image": torch.zeros(1, 4, 4)}], transform=RandFlipd("image", prob=0.5))
    >>> random_states = RandomStates(train_dataset)
    >>> saved = random_states.state_dict()  # what the checkpoint holds
    >>> drawn = torch.rand(2), train_dataset.transform.R.random()

    Loading the saved states (as a resumed run does) draws the same numbers again:

    >>> random_states.load_state_dict(saved)
    >>> torch.equal(torch.rand(2), drawn[0]), train_dataset.transform.R.random() == drawn[1]
    (True, True)
    """

    def __init__(self, dataset: Dataset | None = None, sampler: Sampler | None = None) -> None:
        self.transforms = _randomizables(getattr(dataset, "transform", None))
        self.generator: torch.Generator | None = getattr(sampler, "generator", None)

    def state_dict(self) -> dict[str, Any]:
        # tensors and plain Python values only: MONAI's CheckpointLoader reads with weights_only=True
        state = {
            "python": random.getstate(),
            "numpy": _numpy_state(np.random.get_state()),
            "torch": torch.get_rng_state(),
            "transforms": [_numpy_state(t.R.get_state()) for t in self.transforms],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        if self.generator is not None:
            state["sampler"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["transforms"]) != len(self.transforms):
            raise ValueError(
                f"the checkpoint holds {len(state['transforms'])} random transforms' states, the training data "
                f"{len(self.transforms)}: resume with the transforms the run was trained with"
            )
        random.setstate(_python_state(state["python"]))
        np.random.set_state(_from_numpy_state(state["numpy"]))
        torch.set_rng_state(state["torch"])
        for t, saved in zip(self.transforms, state["transforms"]):
            t.R.set_state(_from_numpy_state(saved))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        if self.generator is not None and "sampler" in state:
            self.generator.set_state(state["sampler"])


def _randomizables(root: Any) -> list[Randomizable]:
    """Every ``Randomizable`` reachable from ``root``: a dictionary transform draws from an array transform inside it."""
    found: dict[int, Randomizable] = {}
    pending, seen = [root], set()
    while pending:
        item = pending.pop()
        if id(item) in seen or isinstance(item, (str, bytes, np.ndarray, torch.Tensor)):
            continue
        seen.add(id(item))
        if isinstance(item, Randomizable):
            found[id(item)] = item
        if isinstance(item, (list, tuple)):
            pending.extend(reversed(item))
        elif isinstance(item, dict):
            pending.extend(reversed(list(item.values())))
        elif hasattr(item, "__dict__") and isinstance(item, (Randomizable, MapTransform, Transform)):
            pending.extend(reversed(list(vars(item).values())))
    return list(found.values())


def _numpy_state(state: tuple) -> tuple:
    name, keys, position, has_gauss, cached_gaussian = state
    return name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian


def _from_numpy_state(state: tuple | list) -> tuple:
    name, keys, position, has_gauss, cached_gaussian = state
    return name, keys.numpy().astype(np.uint32), int(position), int(has_gauss), float(cached_gaussian)


def _python_state(state: tuple | list) -> tuple:
    version, internal, gauss = state
    return int(version), tuple(int(v) for v in internal), gauss
