"""ShuffleNet V2 for CIFAR (Ma et al., 2018) as in the distillation zoo: `ShuffleV2`, width 1.0.

CIFAR changes from the ImageNet net: a 1x1 stem with 24 channels and no max-pool, so 32x32 inputs
end at 4x4. Each stage is one down-sampling unit (two stride-2 branches, concatenated) followed by
basic units (channel split in half; one half passes, the other goes 1x1-BN-ReLU, 3x3 depthwise-BN,
1x1-BN-ReLU; concatenate), each unit ending in a channel shuffle with 2 groups. A 1x1 conv-BN-ReLU
to 1024 channels comes before pooling. Module names match the published CIFAR-100 teachers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .channel_shuffle import channel_shuffle


class BasicUnit(nn.Module):
    """Split channels in half; transform the second half; concatenate (first half first); shuffle."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        passed, branch = x.chunk(2, dim=1)
        branch = F.relu(self.bn1(self.conv1(branch)))
        branch = self.bn2(self.conv2(branch))
        branch = F.relu(self.bn3(self.conv3(branch)))
        return channel_shuffle(torch.cat([passed, branch], 1), 2)


class DownUnit(nn.Module):
    """Two stride-2 branches on the full input, each giving half the output channels; concatenate; shuffle."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        half = out_channels // 2
        # left branch: 3x3 depthwise (stride 2)-BN, 1x1-BN-ReLU
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, half, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        # right branch: 1x1-BN-ReLU, 3x3 depthwise (stride 2)-BN, 1x1-BN-ReLU
        self.conv3 = nn.Conv2d(in_channels, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.conv4 = nn.Conv2d(half, half, 3, stride=2, padding=1, groups=half, bias=False)
        self.bn4 = nn.BatchNorm2d(half)
        self.conv5 = nn.Conv2d(half, half, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """1x1 stem, three stages (a down unit + basic units), 1x1 conv-BN-ReLU, global pool, linear."""

    def __init__(
        self,
        stage_channels: tuple[int, int, int] = (116, 232, 464),
        stage_units: tuple[int, int, int] = (3, 7, 3),
        head_channels: int = 1024,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        channels = 24
        stages = []
        for out, units in zip(stage_channels, stage_units):
            stages.append(nn.Sequential(DownUnit(channels, out), *(BasicUnit(out) for _ in range(units))))
            channels = out
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(channels, head_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(head_channels)
        self.relu = nn.ReLU()  # a module so the last pre-pool map is addressable as `relu`
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(head_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.linear(self.pool(x).flatten(1))


def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:  # noqa: N802 - the zoo's name
    """ShuffleNet V2 at width 1.0 (116-232-464, head 1024), a usual student of resnet32x4."""
    return ShuffleNetV2(num_classes=num_classes)
