"""One output tensor for MLflow's pyfunc, and the network's dict of outputs back from it.

MLflow's PyTorch flavour serves (``mlflow models serve``, ``mlflow.pyfunc.load_model``) a module
that returns one tensor; a :class:`~mimm_med.networks.MIMMXNet` returns a dict of feature parts
and head outputs. A registered network returns them side by side, and the model's metadata
(``MLmodel``, key :data:`OUTPUT_COLUMNS`) records which columns hold which output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["OUTPUT_COLUMNS", "ConcatenatedOutputs", "SplitOutputs", "output_columns"]

#: Metadata key of a logged model: output name -> ``[start, stop)`` of its columns in the served array.
OUTPUT_COLUMNS = "mimm_med_output_columns"


def output_columns(outputs: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
    """``[start, stop)`` of each output's columns in :class:`ConcatenatedOutputs`' tensor, in the dict's order.

    Examples
    --------
    >>> output_columns({"age_group_output": torch.zeros(2, 2), "age_group_features": torch.zeros(2, 16)})
    {'age_group_output': [0, 2], 'age_group_features': [2, 18]}
    """
    columns, start = {}, 0
    for name, value in outputs.items():
        width = value[0].numel()
        columns[name] = [start, start + width]
        start += width
    return columns


class ConcatenatedOutputs(torch.nn.Module):
    """``network`` with its dict of ``(B, n)`` outputs returned as one ``(B, K)`` tensor, in the order of ``names``.

    Examples
    --------
    >>> from mimm_med.networks import MIMMXNet
    >>> net = MIMMXNet(torch.nn.Flatten(), {"age_group": 4, "sex": 4}, {"age_group": 2, "sex": 2}, backbone_dim=8)
    >>> names = list(net(torch.zeros(2, 8)))
    >>> names
    ['features', 'age_group_features', 'age_group_output', 'sex_features', 'sex_output']
    >>> ConcatenatedOutputs(net, names)(torch.zeros(2, 8)).shape  # 8 + 4 + 2 + 4 + 2 columns
    torch.Size([2, 20])
    """

    def __init__(self, network: torch.nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.network = network
        self.names = tuple(names)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        outputs = self.network(image)
        return torch.cat([outputs[name].flatten(1) for name in self.names], dim=1)


class SplitOutputs(torch.nn.Module):
    """The dict of named outputs again from a module that returns them side by side.

    Parameters
    ----------
    module
        Returns a ``(B, K)`` tensor, e.g. a loaded :class:`ConcatenatedOutputs`.
    columns
        Output name -> ``[start, stop)`` of its columns (:func:`output_columns`).

    Examples
    --------
    >>> split = SplitOutputs(torch.nn.Identity(), {"y_output": [0, 2], "y_features": [2, 5]})
    >>> {name: tuple(value.shape) for name, value in split(torch.zeros(3, 5)).items()}
    {'y_output': (3, 2), 'y_features': (3, 3)}
    """

    def __init__(self, module: torch.nn.Module, columns: Mapping[str, Sequence[int]]) -> None:
        super().__init__()
        self.module = module
        self.columns = {name: (int(start), int(stop)) for name, (start, stop) in columns.items()}

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        served = self.module(image)
        return {name: served[:, start:stop] for name, (start, stop) in self.columns.items()}
