"""VGG with batch norm for CIFAR (Simonyan & Zisserman, 2015, without the big FC layers): vgg8/11/13/16/19_bn.

Five conv blocks (3x3 conv with bias, BN, ReLU) separated by 2x2 max-pools, global average pool and one
linear layer. Each block stores no final ReLU (the zoo exposes pre-activation maps), so the ReLU after a
block is applied in `forward`. Module names match the published CIFAR-100 teachers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .init import init_fan_out_

# channels of the convs in each of the five blocks
_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def conv_block(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    """Conv-BN-ReLU layers, the last ReLU left out (the caller applies it)."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """Five conv blocks with max-pools between them, global average pool, linear classifier."""

    def __init__(self, config: Sequence[Sequence[int]], num_classes: int = 100) -> None:
        super().__init__()
        in_channels = [3] + [widths[-1] for widths in config[:-1]]
        self.block0 = conv_block(in_channels[0], config[0])
        self.block1 = conv_block(in_channels[1], config[1])
        self.block2 = conv_block(in_channels[2], config[2])
        self.block3 = conv_block(in_channels[3], config[3])
        self.block4 = conv_block(in_channels[4], config[4])
        self.relu = nn.ReLU()  # the last block's ReLU, a module so the pre-pool map is addressable
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(config[4][-1], num_classes)
        init_fan_out_(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """32x32 inputs reach block4 at 4x4; 64x64 (Tiny-ImageNet) ones get a fourth max-pool, as in the zoo."""
        height = x.shape[-2]
        x = F.max_pool2d(F.relu(self.block0(x)), 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.relu(self.block3(x))
        if height == 64:
            x = F.max_pool2d(x, 2)
        x = self.relu(self.block4(x))
        return self.classifier(self.pool(x).flatten(1))


def vgg8_bn(num_classes: int = 100) -> VGG:
    """VGG-8 with BN (one conv per block), the usual student of vgg13."""
    return VGG(_CONFIGS["vgg8"], num_classes)


def vgg11_bn(num_classes: int = 100) -> VGG:
    """VGG-11 with BN (configuration A)."""
    return VGG(_CONFIGS["vgg11"], num_classes)


def vgg13_bn(num_classes: int = 100) -> VGG:
    """VGG-13 with BN (configuration B), a usual CIFAR teacher."""
    return VGG(_CONFIGS["vgg13"], num_classes)


def vgg16_bn(num_classes: int = 100) -> VGG:
    """VGG-16 with BN (configuration D)."""
    return VGG(_CONFIGS["vgg16"], num_classes)


def vgg19_bn(num_classes: int = 100) -> VGG:
    """VGG-19 with BN (configuration E)."""
    return VGG(_CONFIGS["vgg19"], num_classes)
