"""Feature-vector backbones by name: MONAI networks with their classification layer removed."""

from __future__ import annotations

from typing import Any

from monai.networks import nets
from torch import nn

from .small_cnn import SmallCNN

RESNETS = {"resnet10": nets.resnet10, "resnet18": nets.resnet18, "resnet34": nets.resnet34, "resnet50": nets.resnet50}
BACKBONE_NAMES: tuple[str, ...] = (*RESNETS, "densenet121", "small_cnn")


def _construct(name: str, constructor: Any, **kwargs: Any) -> nn.Module:
    """``constructor(**kwargs)``, an option that the backbone ``name`` lacks refused by name.

    A bundle's ``backbone_kwargs`` belong to its own backbone (the digits bundle's ``dropout`` to
    ``small_cnn``): ``--backbone resnet10`` alone ended in ``ResNet.__init__() got an unexpected
    keyword argument 'dropout'``, naming neither setting.
    """
    try:
        return constructor(**kwargs)
    except TypeError as error:
        if "unexpected keyword argument" not in str(error):
            raise
        raise ValueError(
            f"backbone {name!r} does not take an option of network_def#backbone_kwargs ({error}): drop it, "
            "e.g. --network_def#backbone_kwargs \"{}\", or choose a backbone that takes it"
        ) from None


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
        resnet = _construct(name, RESNETS[name], spatial_dims=spatial_dims, n_input_channels=in_channels, feed_forward=False, **kwargs)
        return resnet, resnet.in_planes  # in_planes ends as the last block's output channels
    if name == "densenet121":
        densenet = _construct(name, nets.DenseNet121, spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1, **kwargs)
        out_features = densenet.class_layers.out.in_features
        densenet.class_layers.out = nn.Identity()
        return densenet, out_features
    if name == "small_cnn":
        cnn = _construct(name, SmallCNN, spatial_dims=spatial_dims, in_channels=in_channels, **kwargs)
        return cnn, cnn.out_features
    raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONE_NAMES)} or pass an nn.Module")
