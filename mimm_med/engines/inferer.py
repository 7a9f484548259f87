"""Inferer that lets MONAI's evaluators and inference configs read one output of a MIMMXNet."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer


class OutputKeyInferer(Inferer):
    """Call the network and return ``outputs[key]`` of its output dict.

    MONAI evaluators, metrics and post-transforms expect one prediction tensor; a MIMMXNet returns a
    dict of features and head outputs.

    Examples
    --------
    >>> from mimm_med.networks import MIMMXNet
    >>> net = MIMMXNet("small_cnn", {"age_group": 8, "sex": 8}, {"age_group": 2, "sex": 2})
    >>> images = torch.zeros(8, 1, 28, 28)
    >>> OutputKeyInferer("age_group_output")(images, net).shape
    torch.Size([8, 2])
    """

    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        outputs = network(inputs, *args, **kwargs)
        if self.key not in outputs:
            raise KeyError(f"network output has no {self.key!r}; it has {sorted(outputs)}")
        return outputs[self.key]
