"""Wide ResNets (Zagoruyko & Komodakis, 2016) for CIFAR: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Pre-activation blocks (BN-ReLU-conv twice); a block that changes width takes its 1x1 shortcut
(key `convShortcut`, the checkpoint's spelling) from the pre-activated input. Module names match the
published CIFAR-100 teachers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .init import init_fan_out_


class WideBasicBlock(nn.Module):
    """BN-ReLU-3x3 conv, BN-ReLU-(dropout)-3x3 conv, plus the input or a 1x1 projection of it."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.convShortcut: nn.Conv2d | None = None
        if in_channels != out_channels:
            self.convShortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)))
        out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(activated)
        return out + shortcut


class WideStage(nn.Module):
    """A run of wide blocks at one resolution, held under `layer` as the checkpoints expect."""

    def __init__(self, blocks: int, in_channels: int, out_channels: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        layers = [WideBasicBlock(in_channels, out_channels, stride, drop_rate)]
        layers += [WideBasicBlock(out_channels, out_channels, 1, drop_rate) for _ in range(blocks - 1)]
        self.layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: 3x3 stem, three wide stages (strides 1, 2, 2), BN-ReLU, global pool, linear."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = WideStage(blocks, widths[0], widths[1], 1, drop_rate)
        self.block2 = WideStage(blocks, widths[1], widths[2], 2, drop_rate)
        self.block3 = WideStage(blocks, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()  # a module so the last pre-pool map is addressable as `relu`
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_fan_out_(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn1(x))
        return self.fc(self.pool(x).flatten(1))


def wrn_16_1(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-16-1."""
    return WideResNet(16, 1, num_classes, drop_rate)


def wrn_16_2(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-16-2."""
    return WideResNet(16, 2, num_classes, drop_rate)


def wrn_40_1(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-40-1, the usual student of WRN-40-2."""
    return WideResNet(40, 1, num_classes, drop_rate)


def wrn_40_2(num_classes: int = 100, drop_rate: float = 0.0) -> WideResNet:
    """WRN-40-2, a usual CIFAR teacher."""
    return WideResNet(40, 2, num_classes, drop_rate)
