"""ImageNet-style ResNet-18 / ResNet-50 adapted to CIFAR (the zoo's `ResNet18` / `ResNet50`).

The four stages of the ImageNet nets (64-128-256-512 base widths, strides 1, 2, 2, 2) behind a 3x3
stride-1 stem without max-pool, so 32x32 inputs end at 4x4. Shortcuts that change shape are a strided
1x1 conv + BN (key `shortcut`); ReLU after each sum. Registered as `resnet18_cifar` / `resnet50_cifar`
so they never shadow torchvision's `resnet18` / `resnet50`. Module names match the published teachers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .init import init_fan_out_


def projection(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    """Strided 1x1 conv + BN shortcut when the block changes shape, else None (identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers (the first strided) plus a shortcut, ReLU after the sum."""

    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = projection(in_channels, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4, each with BN, plus a shortcut, ReLU after the sum."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class CifarImageNetResNet(nn.Module):
    """3x3 stem (64 channels, stride 1), four stages, global average pool, linear classifier."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], blocks: tuple[int, int, int, int],
                 num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        channels = 64
        stages = []
        for width, count, stride in zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)):
            layers = []
            for index in range(count):
                layers.append(block(channels, width, stride if index == 0 else 1))
                channels = width * block.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)
        init_fan_out_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.pool(x).flatten(1))


def resnet18_cifar(num_classes: int = 100) -> CifarImageNetResNet:
    """ResNet-18 for 32x32 inputs (the zoo's `ResNet18`)."""
    return CifarImageNetResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet50_cifar(num_classes: int = 100) -> CifarImageNetResNet:
    """ResNet-50 for 32x32 inputs (the zoo's `ResNet50`), the teacher of the MobileNetV2 student."""
    return CifarImageNetResNet(Bottleneck, (3, 4, 6, 3), num_classes)
