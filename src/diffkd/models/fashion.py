"""Two small CNNs for 1x28x28 Fashion-MNIST, sized so the CPU demo and benchmarks run in seconds.

`fmnist_teacher`: conv-BN-ReLU stages 32@28x28, 64@14x14, 128@7x7, 256@7x7 (about 22 M multiply-adds).
`fmnist_student`: 8@28x28, 16@14x14, 32@7x7 (about 0.5 M multiply-adds).
The last map before pooling is the output of `features`; the logits are the output of `fc`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


def conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 conv (no bias) + BN + ReLU; stride 2 halves the resolution."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FashionNet(nn.Module):
    """Conv-BN-ReLU stages (`features`), global average pool, linear classifier (`fc`)."""

    def __init__(self, stages: Sequence[tuple[int, int]], num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        layers = []
        for out, stride in stages:
            layers.append(conv_bn_relu(in_channels, out, stride))
            in_channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def fmnist_teacher(num_classes: int = 10) -> FashionNet:
    """Fashion-MNIST teacher: last map 256x7x7."""
    return FashionNet([(32, 1), (64, 2), (128, 2), (256, 1)], num_classes)


def fmnist_student(num_classes: int = 10) -> FashionNet:
    """Fashion-MNIST student: last map 32x7x7."""
    return FashionNet([(8, 1), (16, 2), (32, 2)], num_classes)
