"""Feature-vector backbones by name: MONAI networks with their classification layer removed."""

from __future__ import annotations

from typing import Any

from monai.networks import nets
from torch import nn

from .small_cnn import SmallCNN

RESNETS = {"resnet10": nets.resnet10, "resnet18": nets.resnet18, "resnet34": nets.resnet34, "resnet50": nets.resnet50}
BACKBONE_NAMES: tuple[str, ...] = (*RESNETS, "densenet121", "small_cnn")


def feature_backbone(name: str, spatial_dims: int, in_channels: int, **kwargs: Any) -> tuple[nn.Module, int]:
    """Build a backbone that maps an image to a feature vector.

    Parameters
    ----------
    name
        One of :data:`BACKBONE_NAMES`.
    spatial_dims, in_channels
        Image dimensionality (2 or 3) and channels.
    kwargs
        Passed to the MONAI constructor (e.g. ``widen_factor`` for ResNets, ``channels`` for SmallCNN).

    Returns
    -------
    module, out_features
    """
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3 (1 for signals), got {spatial_dims!r}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be at least 1, got {in_channels!r}")
    if name in RESNETS:
        resnet = RESNETS[name](spatial_dims=spatial_dims, n_input_channels=in_channels, feed_forward=False, **kwargs)
        return resnet, resnet.in_planes  # in_planes ends as the last block's output channels
    if name == "densenet121":
        densenet = nets.DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1, **kwargs)
        out_features = densenet.class_layers.out.in_features
        densenet.class_layers.out = nn.Identity()
        return densenet, out_features
    if name == "small_cnn":
        cnn = SmallCNN(spatial_dims=spatial_dims, in_channels=in_channels, **kwargs)
        return cnn, cnn.out_features
    raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONE_NAMES)} or pass an nn.Module")
