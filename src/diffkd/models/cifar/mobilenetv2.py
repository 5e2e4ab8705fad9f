"""MobileNetV2 for CIFAR (Sandler et al., 2018) as in the distillation zoo: `mobile_half` is width 0.5.

CIFAR changes from the ImageNet net: the second stage keeps stride 1, so a 32x32 input ends at 2x2
(stem stride 2, then strides 1, 1, 2, 2, 1, 2, 1), and every inverted residual keeps its 1x1
expansion conv even at expansion 1. The 1280-channel head conv is not narrowed. Module names match
the published CIFAR-100 teachers.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .init import init_fan_out_

# (expansion, output channels at width 1, blocks, stride of the first block); None = the model's expansion
_STAGES: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding) + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 linear projection-BN; identity shortcut when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_shortcut = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_shortcut else out


class MobileNetV2(nn.Module):
    """Stem conv, seven stages of inverted residuals, 1x1 conv to 1280, global pool, linear classifier."""

    def __init__(self, expansion: int = 6, width: float = 1.0, num_classes: int = 100) -> None:
        super().__init__()
        channels = int(32 * width)
        self.conv1 = conv_bn_relu(3, channels, 3, stride=2)
        self.blocks = nn.ModuleList()
        for stage_expansion, base_out, count, stride in _STAGES:
            out = int(base_out * width)
            layers = []
            for index in range(count):
                block_stride = stride if index == 0 else 1
                layers.append(InvertedResidual(channels, out, block_stride, stage_expansion or expansion))
                channels = out
            self.blocks.append(nn.Sequential(*layers))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = conv_bn_relu(channels, last, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        init_fan_out_(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        x = self.conv2(x)
        return self.classifier(self.pool(x).flatten(1))


def mobile_half(num_classes: int = 100) -> MobileNetV2:
    """MobileNetV2 at half width, expansion 6: the zoo's MobileNetV2 student."""
    return MobileNetV2(expansion=6, width=0.5, num_classes=num_classes)
