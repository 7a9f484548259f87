"""MIMMXNet: a backbone whose feature vector is split into named parts, one head per part."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict  # TorchScript reads typing.Dict in forward's signature

import torch
from torch import nn

from ..checks import is_whole_number
from .backbones import feature_backbone


class MIMMXNet(nn.Module):
    """Split-feature network of MIMM / MIMM-X.

    The backbone's feature vector goes through one shared linear layer (the last shared layer,
    where gradient norms are balanced) whose output ``f`` is cut into disjoint named parts; the first
    part is the primary task's ``f_y``, the others ``f_z1 .. f_zK``. Each part has its own head:
    ``num_classes[name] >= 2`` gives a classifier (logits), ``1`` a regressor.

    Parameters
    ----------
    backbone
        A name from :data:`mimm_med.networks.backbones.BACKBONE_NAMES` or any module mapping an image
        to a ``(B, backbone_dim)`` feature vector.
    parts
        Ordered ``{name: feature size}``; the first entry is the primary task. Names are non-empty
        strings without ``.`` (they name submodules).
    num_classes
        ``{name: classes}`` for every part (1 = regression).
    spatial_dims, in_channels
        Used when ``backbone`` is a name.
    backbone_dim
        Feature size of a module backbone (ignored for names).
    backbone_kwargs
        Extra arguments of a named backbone.
    head_hidden
        Width of a hidden layer in each head; 0 gives linear heads.

    Examples
    --------
    >>> net = MIMMXNet("small_cnn", {"digit": 16, "thickness": 16}, {"digit": 2, "thickness": 2})
    >>> out = net(torch.zeros(2, 1, 28, 28))
    >>> out["digit_output"].shape, out["thickness_features"].shape
    (torch.Size([2, 2]), torch.Size([2, 16]))
    """

    def __init__(
        self,
        backbone: str | nn.Module,
        parts: Mapping[str, int],
        num_classes: Mapping[str, int],
        spatial_dims: int = 2,
        in_channels: int = 1,
        backbone_dim: int | None = None,
        backbone_kwargs: Mapping[str, Any] | None = None,
        head_hidden: int = 0,
    ) -> None:
        super().__init__()
        if not parts:
            raise ValueError("parts must name at least the primary task, e.g. {'age_group': 16, 'sex': 16}")
        if set(parts) != set(num_classes):
            raise ValueError(
                f"parts {list(parts)} and num_classes {list(num_classes)} must name the same factors"
            )
        for name, size in parts.items():
            # names become ModuleDict keys and output keys "<name>_features" / "<name>_output"
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"part names must be non-empty strings without '.', got {name!r} in {list(parts)}")
            if hasattr(nn.ModuleDict, name):  # ModuleDict refuses keys that shadow its attributes (train, type, to, ...)
                raise ValueError(f"part name {name!r} is taken by torch's ModuleDict; rename it, e.g. {name + '_label'!r}")
            if not is_whole_number(size, minimum=1):
                raise ValueError(f"part {name!r} needs a positive feature size (an integer), got {size!r}")
            if not is_whole_number(num_classes[name], minimum=1):
                raise ValueError(
                    f"num_classes[{name!r}] must be an integer ≥ 2 (classification) or 1 (regression), "
                    f"got {num_classes[name]!r}"
                )
        if not is_whole_number(head_hidden, minimum=0):
            raise ValueError(f"head_hidden must be a whole number ≥ 0 (0 gives linear heads), got {head_hidden!r}")
        if isinstance(backbone, str):
            self.backbone, backbone_dim = feature_backbone(backbone, spatial_dims, in_channels, **(backbone_kwargs or {}))
            self.input_ndim = spatial_dims + 2
        elif backbone_dim is None:
            raise ValueError("backbone_dim is required when backbone is a module")
        elif not is_whole_number(backbone_dim, minimum=1):
            raise ValueError(f"backbone_dim must be the positive width of the backbone's output, got {backbone_dim!r}")
        else:
            self.backbone = backbone
            self.input_ndim = 0  # a module backbone decides which inputs it takes
        self.part_names = list(parts)
        self.part_sizes = [int(parts[name]) for name in self.part_names]
        self.num_classes = {name: int(num_classes[name]) for name in self.part_names}
        self.shared_layer = nn.Linear(int(backbone_dim), sum(self.part_sizes))
        self.heads = nn.ModuleDict(
            {name: self._head(size, self.num_classes[name], int(head_hidden)) for name, size in zip(self.part_names, self.part_sizes)}
        )

    @staticmethod
    def _head(in_features: int, out_features: int, hidden: int) -> nn.Module:
        if hidden <= 0:
            return nn.Linear(in_features, out_features)
        return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features))

    @property
    def primary(self) -> str:
        """Name of the primary task (the first part)."""
        return self.part_names[0]

    @property
    def spurious(self) -> list[str]:
        """Names of the spurious factors."""
        return self.part_names[1:]

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.input_ndim > 0 and x.dim() != self.input_ndim:
            # without this, a (B, H, W) batch reaches conv2d as one unbatched image with B channels
            raise ValueError(
                f"expected an image batch (B, C, *spatial) with {self.input_ndim - 2} spatial dims, "
                f"got shape {list(x.shape)}"
            )
        backbone_features = self.backbone(x)
        if backbone_features.dim() != 2 or backbone_features.shape[1] != self.shared_layer.in_features:
            raise ValueError(
                f"the backbone returned shape {list(backbone_features.shape)}, "
                f"expected (B, {self.shared_layer.in_features}): set backbone_dim to its feature width, "
                "flattening its output if needed"
            )
        features = self.shared_layer(backbone_features)
        outputs = {"features": features}
        start = 0
        index = 0
        # Indexing by counter rather than zip keeps the module TorchScript-compatible.
        for name, head in self.heads.items():
            part = features[:, start : start + self.part_sizes[index]]
            outputs[name + "_features"] = part
            outputs[name + "_output"] = head(part)
            start += self.part_sizes[index]
            index += 1
        return outputs
