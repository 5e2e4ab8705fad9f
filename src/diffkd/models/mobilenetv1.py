"""MobileNetV1 for ImageNet (Howard et al., 2017), width 1.0: the student of the R50 -> MobileNetV1 benchmark.

A stride-2 3x3 conv-BN-ReLU stem, then 13 depthwise-separable blocks (3x3 depthwise-BN-ReLU,
1x1 pointwise-BN-ReLU), global average pool, linear. 224x224 inputs end at 1024x7x7. The 14 conv
blocks sit in `model` (indices 0-13), as in the checkpoints the distillation code bases publish.
"""

from __future__ import annotations

import torch
import torch.nn as nn

# (output channels, stride) of the 13 depthwise-separable blocks
_SEPARABLE: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)


def stem(out_channels: int) -> nn.Sequential:
    """Stride-2 3x3 conv + BN + ReLU on the RGB input."""
    return nn.Sequential(
        nn.Conv2d(3, out_channels, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 depthwise conv-BN-ReLU followed by 1x1 pointwise conv-BN-ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """Stem plus 13 separable blocks under `model`, global average pool, linear classifier `fc`."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers = [stem(32)]
        channels = 32
        for out, stride in _SEPARABLE:
            layers.append(separable(channels, out, stride))
            channels = out
        self.model = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.model(x)).flatten(1))


def mobilenetv1(num_classes: int = 1000) -> MobileNetV1:
    """MobileNetV1 at width 1.0 (4.23 M parameters with 1000 classes)."""
    return MobileNetV1(num_classes)
