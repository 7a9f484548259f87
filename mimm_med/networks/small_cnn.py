"""A small convolutional feature extractor for 28×28 images (Digits-Morpho) and quick 3D runs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from torch import nn


class SmallCNN(nn.Module):
    """Strided convolution blocks followed by global average pooling; yields a feature vector.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    in_channels
        Input channels.
    channels
        Output channels of each block; the first block keeps the resolution, the others halve it.
        Each block widens what a feature sees: 3, 5, 9 and 17 pixels with the default's four (3×3
        kernels). Three blocks see 9 pixels of a 20-pixel digit, so global pooling averages stroke
        texture, and on Digits-Morpho ERM on balanced data reached 73 % on the inverted set (93.6 %
        with four blocks).
    dropout
        Dropout inside the blocks.
    norm
        Normalization of the blocks, as MONAI's ``Convolution`` takes it (``"batch"``, ``"instance"``,
        ``("group", {"num_groups": 8})``). Instance and group norm compute the same in training and
        evaluation; they also remove each image's overall intensity.

    Examples
    --------
    >>> SmallCNN(spatial_dims=2, in_channels=1)(torch.zeros(4, 1, 28, 28)).shape
    torch.Size([4, 128])
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        dropout: float = 0.0,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        blocks = []
        previous = in_channels
        for index, out_channels in enumerate(channels):
            blocks.append(
                Convolution(
                    spatial_dims,
                    previous,
                    out_channels,
                    strides=1 if index == 0 else 2,
                    kernel_size=3,
                    act="relu",
                    norm=norm,
                    dropout=dropout,
                )
            )
            previous = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.out_features = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.blocks(x)), 1)
