"""ReviewKD: knowledge review, student stages fused deepest first (ABF) and matched to the teacher's (HCL).

Chen, Liu, Zhao and Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021. Computed as the
reference code (the authors' ReviewKD and mdistiller) does; docs/design.md §5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..weighting import EpochRamp, check_schedule_epochs
from .base import Method, MethodOutput, paired_shapes, require_maps

POOLED_SIZES = (4, 2, 1)  # HCL's pyramid, weights 1/2, 1/4, 1/8


class ABF(nn.Module):
    """Attention-based fusion: 1x1 conv + BN, fused with the deeper level's residual by two sigmoid maps,
    then a 3x3 conv + BN to the teacher's channels (and size)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """(output at out_size with the teacher's channels, residual passed to the next shallower level)."""
        x = self.conv1(x)
        if self.attention is not None:
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            z = self.attention(torch.cat([x, residual], dim=1))
            x = x * z[:, :1] + residual * z[:, 1:]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.conv2(x), x


def hcl_loss(student: list[Tensor], teacher: list[Tensor]) -> Tensor:
    """Hierarchical context loss: per level MSE at full size plus MSE of (4,2,1) pooled maps (l < H), weights
    1, 1/2, 1/4, 1/8 over their sum; levels summed."""
    total = 0.0
    for s, t in zip(student, teacher):
        s, t = s.float(), t.float()
        loss, weight, weights = F.mse_loss(s, t), 1.0, 1.0
        for size in POOLED_SIZES:
            if size >= s.shape[-2]:
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size))
            weights += weight
        total = total + loss / weights
    return total  # type: ignore[return-value]


class ReviewKD(Method):
    """HCL between the ABF outputs and the teacher's stages, ramped min((epoch + 1) / warmup_epochs, 1).

    A level with lists of (B,C,H,W) stage maps on both sides, shallow to deep and as many on each
    side (the pooled vector of each side, the global mean of its deepest map, is added as a 1x1
    level). Weight (level weight) in the recipes: CIFAR 5 (8 for resnet32x4 -> ShuffleV2, 0.6 for
    resnet56 -> resnet20), ImageNet 1 for R34 -> R18, 8 for R50 -> MobileNetV1. The ABFs' middle
    width is min(max_mid_channels, the deepest student width): 512 by default, 256 for MobileNetV1.
    """

    layouts = frozenset({"map"})
    takes_tap_lists = True

    def __init__(self, student_channels: list[int], teacher_channels: list[int], teacher_sizes: list[tuple[int, int]],
                 max_mid_channels: int = 512, warmup_epochs: int = 20):
        super().__init__()
        mid = min(max_mid_channels, student_channels[-1])
        # one ABF per student level, deepest (the pooled vector) first; only it fuses nothing
        pairs = list(zip(student_channels, teacher_channels))[::-1]
        self.abfs = nn.ModuleList(ABF(s, mid, t, fuse=i > 0) for i, (s, t) in enumerate(pairs))
        self.teacher_sizes = [tuple(size) for size in teacher_sizes[::-1]]
        self.schedules = {"reviewkd": EpochRamp(check_schedule_epochs("reviewkd: warmup_epochs", warmup_epochs))}

    @classmethod
    def build(cls, student_shape, teacher_shape, **options) -> "ReviewKD":
        students, teachers = paired_shapes("reviewkd", student_shape, teacher_shape)
        require_maps("reviewkd", "student", students)
        require_maps("reviewkd", "teacher", teachers)
        for side, shapes in (("student", students), ("teacher", teachers)):
            for i in range(1, len(shapes)):
                if shapes[i][-2] > shapes[i - 1][-2] or shapes[i][-1] > shapes[i - 1][-1]:
                    raise ValueError(
                        f"reviewkd fuses stages listed shallow to deep, but {side} tap {i} {tuple(shapes[i])} is larger "
                        f"than {side} tap {i - 1} {tuple(shapes[i - 1])}; list the taps from the shallowest to the deepest"
                    )
        return cls([s[1] for s in students] + [students[-1][1]], [t[1] for t in teachers] + [teachers[-1][1]],
                   [tuple(t[-2:]) for t in teachers] + [(1, 1)], **options)

    def forward(self, student, teacher, targets: Tensor | None = None) -> MethodOutput:
        student, teacher = (x if isinstance(x, list) else [x] for x in (student, teacher))
        students = [*student, student[-1].mean(dim=(2, 3), keepdim=True)]
        teachers = [*teacher, teacher[-1].mean(dim=(2, 3), keepdim=True)]
        outputs, residual = [], None
        for abf, x, size in zip(self.abfs, students[::-1], self.teacher_sizes):
            out, residual = abf(x, residual, size)
            outputs.insert(0, out)
        return MethodOutput({"reviewkd": hcl_loss(outputs, teachers)})
