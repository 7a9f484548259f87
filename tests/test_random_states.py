"""A resumed run draws the shuffling, augmentation and sampling that the uninterrupted run would have drawn."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import Compose, RandFlipd, RandGaussianNoise, RandGaussianNoised
from monai.utils import set_determinism

from mimm_med.data.confounding import rebalancing_sampler
from mimm_med.engines import RandomStates

RECORDS = [{"image": np.arange(16, dtype=np.float32).reshape(1, 4, 4) + i, "y": i % 2, "z": int(i % 3 == 0)} for i in range(12)]


def _run(rebalance: bool) -> tuple[DataLoader, RandomStates]:
    """What a run builds after ``set_determinism``: its data set, sampler and loader."""
    set_determinism(0)
    transform = Compose([RandFlipd("image", prob=0.5, spatial_axis=0), Compose([RandGaussianNoised("image", prob=1.0)])])
    dataset = Dataset(RECORDS, transform)
    sampler = rebalancing_sampler(RECORDS, ["y", "z"], seed=0) if rebalance else None
    loader = DataLoader(dataset, batch_size=4, shuffle=sampler is None, sampler=sampler, num_workers=0)
    return loader, RandomStates(dataset, sampler)


def _epoch(loader: DataLoader) -> torch.Tensor:
    return torch.cat([batch["image"] for batch in loader]) + torch.rand(1)  # torch.rand: what dropout draws


def _round_trip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # as MONAI's CheckpointLoader reads


@pytest.mark.parametrize("rebalance", [False, True])
def test_a_resumed_run_draws_on_where_the_checkpoint_left_off(rebalance):
    loader, states = _run(rebalance)
    _epoch(loader)
    saved = _round_trip(states.state_dict())  # the checkpoint after epoch 1
    second = _epoch(loader)

    restarted, _ = _run(rebalance)
    assert not torch.equal(_epoch(restarted), second)  # without the states, epoch 2 replays epoch 1
    resumed, resumed_states = _run(rebalance)
    resumed_states.load_state_dict(saved)
    assert torch.equal(_epoch(resumed), second)
    # the array transform inside the nested Compose's dictionary transform is what draws the noise
    assert any(isinstance(t, RandGaussianNoise) for t in resumed_states.transforms)


def test_other_transforms_than_the_checkpoints_are_refused():
    loader, states = _run(rebalance=False)
    saved = states.state_dict()
    with pytest.raises(ValueError, match=r"holds 5 random transforms' states, the training data 1: resume with the transforms"):
        RandomStates(Dataset(RECORDS)).load_state_dict(saved)
