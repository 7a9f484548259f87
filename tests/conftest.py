"""Suite-wide settings and shared fixtures."""

from pathlib import Path

import pandas as pd
import pytest
import torch
from bundle_runs import REPO
from filelock import FileLock

from mimm_med.commands.demo import prepare

#: The tiny brain cohort of :func:`brain_splits`: subjects per stand-in cohort, voxel size, volume edge and
#: the seed of generation and split (at 80 subjects the split's small cells leave val nearly empty for some seeds).
BRAIN_SUBJECTS, BRAIN_RESOLUTION_MM, BRAIN_SIZE, BRAIN_SEED = 80, 6.0, 24, 0
#: The pseudonyms order the subjects the split draws from: a fixed key makes the split the same in every run.
BRAIN_PSEUDONYM_KEY = "mimm-med-test-fixture-key"


@pytest.fixture(scope="session")
def brain_splits(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """Splits folder (``train.csv``, ``val.csv``, ``test-*.csv``) of a tiny stand-in UKB + NAKO brain cohort.

    Generated, preprocessed to 24³ voxels at 6 mm, merged and split at r = 0.9 (sex and cohort agree
    with the age group) as ``mimm-med demo`` does, once per test run: pytest-xdist workers share one
    copy, built by the first worker that asks while the others wait on a lock. About 25 s on one core.
    """
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # every worker's base folder sits in the run's shared one
        root = root.parent
    workdir = root / "brain_cohort"
    with FileLock(f"{workdir}.lock"):
        workdir.mkdir(exist_ok=True)
        key = workdir / "pseudonym.key"
        key.write_text(BRAIN_PSEUDONYM_KEY)  # prepare() makes a random one if absent
        key.chmod(0o600)  # a key others can read is warned of
        splits = prepare(workdir, BRAIN_SUBJECTS, BRAIN_RESOLUTION_MM, BRAIN_SIZE, correlation=0.9, seed=BRAIN_SEED)
    sizes = {name: len(pd.read_csv(splits / f"{name}.csv")) for name in ("train", "val")}
    assert sizes["train"] >= 24 and sizes["val"] >= 4, (
        f"the brain fixture's split has {sizes} images, too few to train a bundle: change BRAIN_SEED or BRAIN_SUBJECTS"
    )
    return splits


@pytest.fixture
def single_torch_thread():
    """One intra-op thread: small critics on two cores shared by two test workers only contend for more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def at_repo_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Run from the repository root (the bundle configs' ``%bundles/common/...`` macros) with a private MLflow store."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri
