"""Segmentation heads on a stride-8 map: DeepLabV3 (ASPP), PSPNet (pyramid pooling), FCN (auxiliary).

Each ends in a 1x1 conv to the class logits at the map's resolution; the model upsamples afterwards.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import ASPP
from torchvision.models.segmentation.fcn import FCNHead


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def deeplabv3_head(in_channels: int, num_classes: int, channels: int = 256, rates: tuple[int, ...] = (12, 24, 36)) -> nn.Sequential:
    """ASPP (rates 12/24/36 at output stride 8), a 3x3 conv, then the 1x1 classifier."""
    return nn.Sequential(
        ASPP(in_channels, list(rates), channels), *_conv_bn_relu(channels, channels, 3), nn.Conv2d(channels, num_classes, 1)
    )


class PyramidPooling(nn.Module):
    """PSPNet's context: average-pool to each bin size, reduce to in/4 channels, upsample, concatenate with the input."""

    def __init__(self, in_channels: int, bins: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        reduced = max(1, in_channels // len(bins))
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), *_conv_bn_relu(in_channels, reduced, 1)) for b in bins
        )
        self.out_channels = in_channels + reduced * len(bins)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False) for branch in self.branches]
        return torch.cat([x, *pooled], dim=1)


def pspnet_head(in_channels: int, num_classes: int, channels: int = 512) -> nn.Sequential:
    """Pyramid pooling (bins 1, 2, 3, 6), a 3x3 conv, dropout 0.1, then the 1x1 classifier."""
    pyramid = PyramidPooling(in_channels)
    return nn.Sequential(
        pyramid, *_conv_bn_relu(pyramid.out_channels, channels, 3), nn.Dropout(0.1), nn.Conv2d(channels, num_classes, 1)
    )


def aux_head(in_channels: int, num_classes: int) -> nn.Module:
    """The auxiliary FCN head (3x3 conv to in/4, dropout 0.1, 1x1 classifier) on the second-to-last stage."""
    return FCNHead(in_channels, num_classes)
