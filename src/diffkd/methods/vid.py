"""VID: variational information distillation, a Gaussian likelihood of the teacher map given the student's.

Ahn, Hu, Damianou, Lawrence and Dai, "Variational Information Distillation for Knowledge Transfer",
CVPR 2019. Computed as the reference code (RepDistiller) does; docs/design.md §5.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Method, MethodOutput, paired_shapes, require_maps

VARIANCE_FLOOR = 1e-5


def _conv1x1(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, bias=False)


class VIDPair(nn.Module):
    """One stage pair: regressor mu(s) (three 1x1 convs, ReLUs between) and a learned variance per teacher channel."""

    def __init__(self, student_channels: int, teacher_channels: int, initial_variance: float = 5.0):
        super().__init__()
        self.regressor = nn.Sequential(
            _conv1x1(student_channels, teacher_channels), nn.ReLU(),
            _conv1x1(teacher_channels, teacher_channels), nn.ReLU(),
            _conv1x1(teacher_channels, teacher_channels),
        )  # fmt: skip
        # softplus(b) + floor = initial_variance at the start
        start = math.log(math.expm1(initial_variance - VARIANCE_FLOOR))
        self.log_scale = nn.Parameter(torch.full((teacher_channels,), start))

    def variance(self) -> Tensor:
        return F.softplus(self.log_scale) + VARIANCE_FLOOR

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        """mean over (B,C,H,W) of 0.5 ((mu - t)^2 / var + log var); the larger map is average-pooled to the smaller."""
        size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
        if student.shape[-2:] != size:
            student = F.adaptive_avg_pool2d(student, size)
        if teacher.shape[-2:] != size:
            teacher = F.adaptive_avg_pool2d(teacher, size)
        mean = self.regressor(student).float()
        variance = self.variance().view(1, -1, 1, 1)
        return (0.5 * ((mean - teacher.float()) ** 2 / variance + variance.log())).mean()


class VID(Method):
    """Sum of the VID losses of each (student map, teacher map) pair; weight 1 in the recipes.

    Takes maps (B,C,H,W) only: one tap per side, or lists of taps (several stage pairs, paired in
    order; the reference uses every stage's post-ReLU output). Sized from the probed channels.
    """

    layouts = frozenset({"map"})
    takes_tap_lists = True

    def __init__(self, pairs: list[tuple[int, int]], initial_variance: float = 5.0):
        super().__init__()
        self.pairs = nn.ModuleList(VIDPair(s, t, initial_variance) for s, t in pairs)

    @classmethod
    def build(cls, student_shape, teacher_shape, **options) -> "VID":
        students, teachers = paired_shapes("vid", student_shape, teacher_shape)
        require_maps("vid", "student", students)
        require_maps("vid", "teacher", teachers)
        return cls([(s[1], t[1]) for s, t in zip(students, teachers)], **options)

    def forward(self, student, teacher, targets: Tensor | None = None) -> MethodOutput:
        students, teachers = (x if isinstance(x, list) else [x] for x in (student, teacher))
        return MethodOutput({"vid": sum(pair(s, t) for pair, s, t in zip(self.pairs, students, teachers))})

