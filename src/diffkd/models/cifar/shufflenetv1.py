"""ShuffleNet V1 for CIFAR (Zhang et al., 2018) as in the distillation zoo: `ShuffleV1`, 3 groups.

CIFAR changes from the ImageNet net: a 1x1 stem with 24 channels and no max-pool, so 32x32 inputs
end at 4x4 after three stride-2 stages. Each unit: grouped 1x1 conv-BN-ReLU, channel shuffle,
3x3 depthwise conv-BN-ReLU, grouped 1x1 conv-BN; the shortcut is added (stride 1) or, at stride 2,
a 3x3 average pool of the input is concatenated; ReLU last. Module names match the published teachers.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .channel_shuffle import channel_shuffle


class ShuffleUnit(nn.Module):
    """One ShuffleNet V1 bottleneck unit."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int) -> None:
        super().__init__()
        mid = out_channels // 4
        # the 24-channel stem output is not split into groups: the first unit's first conv is dense
        self.first_groups = 1 if in_channels == 24 else groups
        self.stride = stride
        self.conv1 = nn.Conv2d(in_channels, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    """1x1 stem, three stages whose first unit has stride 2 and concatenates, global pool, linear."""

    def __init__(
        self,
        stage_channels: tuple[int, int, int] = (240, 480, 960),
        stage_units: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        channels = 24
        stages = []
        for out, units in zip(stage_channels, stage_units):
            # the strided unit concatenates its input, so its branch makes only the missing channels
            layers = [ShuffleUnit(channels, out - channels, 2, groups)]
            layers += [ShuffleUnit(out, out, 1, groups) for _ in range(units - 1)]
            stages.append(nn.Sequential(*layers))
            channels = out
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.pool(x).flatten(1))


def ShuffleV1(num_classes: int = 100) -> ShuffleNetV1:  # noqa: N802 - the zoo's name
    """ShuffleNet V1 with 3 groups (240-480-960 channels), a usual student of resnet32x4."""
    return ShuffleNetV1(num_classes=num_classes)
