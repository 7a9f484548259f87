"""Settings for every pytest run here: the suite in ``tests/`` and the docstring examples in ``mimm_med/``."""

import pytest
import torch

# pytest -n 2 runs two workers on two cores: a second intra-op thread per worker only adds
# OpenMP spin-waiting (a 28×28 CNN step measured 10× slower with two threads under load; t-SNE in a
# docstring example stalled for 30 s while torch's threads held the cores).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep a developer's ``MLFLOW_TRACKING_URI`` from sending the tests' runs to their store.

    MONAI's ``MLFlowHandler`` prefers the variable to the URI it is given; tests that want it set it.
    """
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
