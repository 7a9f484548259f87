"""Under torch.distributed the estimators see the global batch: two gloo ranks vs one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo_ranks import leave_process_group, spawn_gloo_ranks

from mimm_med.mi import CLUB, MINE, GaussianMI, InfoNCE, correlated_gaussians

WORLD_SIZE = 2
BATCH = 12
# Rank 0 holds 7 rows and rank 1 holds 5 in the uneven case: the last batch of an epoch.
SPLITS = {"even": (6, 6), "uneven": (7, 5)}
ESTIMATORS = {"MINE": MINE, "InfoNCE": InfoNCE, "CLUB": CLUB, "Gaussian": GaussianMI}
CRITIC_OPTIONS = {"hidden_dim": 32}


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    x, b = correlated_gaussians(BATCH, 3, 1.0, generator)
    strata = torch.randint(3, (BATCH,), generator=generator)
    return x, b, strata


def build() -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """The same encoder and estimator weights in every process."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(3, 3)
    return encoder, {name: cls(3, 3) if cls is GaussianMI else cls(3, 3, **CRITIC_OPTIONS) for name, cls in ESTIMATORS.items()}


def results(encoder, estimators, x, b, strata) -> dict[str, float | torch.Tensor]:
    """Estimate and critic loss of every estimator, and the encoder's gradient of their sum."""
    features = encoder(x)
    out: dict[str, float | torch.Tensor] = {}
    total = 0.0
    for name, estimator in estimators.items():
        for conditional in (False, True):
            key = f"{name}{'|s' if conditional else ''}"
            given = strata if conditional else None
            estimate = estimator(features, b, given)
            out[key] = estimate.item()
            out[f"{key} critic_loss"] = estimator.critic_loss(features.detach(), b, given).item()
            total = total + estimate
    total.backward()
    out["encoder_grad"] = next(encoder.parameters()).grad.clone()  # DDP-wrapped or not
    return out


def rank_split_results(rank: int, sizes: tuple[int, int]) -> dict[str, float | torch.Tensor]:
    """:func:`results` of this rank's rows of the global batch, through a DDP-wrapped encoder (freed on return)."""
    x, b, strata = global_batch()
    encoder, estimators = build()
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    return results(torch.nn.parallel.DistributedDataParallel(encoder), estimators, x[rows], b[rows], strata[rows])


def run_rank(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        for split, sizes in SPLITS.items():
            torch.save(rank_split_results(rank, sizes), Path(out_dir) / f"{split}{rank}.pt")
    finally:
        leave_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("ranks")
    spawn_gloo_ranks(run_rank, out_dir, WORLD_SIZE)
    return out_dir


@pytest.mark.parametrize("split", SPLITS)
def test_every_rank_gets_the_single_process_estimate_of_the_global_batch(rank_results, split):
    encoder, estimators = build()
    expected = results(encoder, estimators, *global_batch())
    for rank in range(WORLD_SIZE):
        got = torch.load(rank_results / f"{split}{rank}.pt")
        for key, value in expected.items():
            if key == "encoder_grad":
                # DDP averages the ranks' gradients; the gather's backward makes that average exact.
                torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-6)
            else:
                assert got[key] == pytest.approx(value, abs=1e-5), (split, rank, key)
