"""PKD: feature imitation through the Pearson correlation of every channel.

Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson Correlation
Coefficient", NeurIPS 2022. Each channel of both maps is standardised over the batch and the positions
(mean 0, std 1, the std unbiased, plus 1e-6), then compared by MSE / 2, which is 1 - the Pearson
correlation of the two maps. So the loss ignores the maps' scales and offsets, which differ between
detectors (docs/design.md §5). The authors' FPN setting: loss weight 6. Where the widths differ, a
connector (1x1 conv without bias, then BatchNorm) maps the student to the teacher's, as mmyolo's RTMDet
distillation does.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Method, MethodOutput, require_maps


def channel_standardize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Each channel of (B,C,H,W) minus its mean over (B,H,W), divided by its unbiased std + eps, in float32."""
    flat = x.float().transpose(0, 1).reshape(x.shape[1], -1)
    flat = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + eps)
    return flat.reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1)


def pkd_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """MSE(standardised student, standardised teacher) / 2: 1 - Pearson correlation, averaged per channel."""
    return F.mse_loss(channel_standardize(student), channel_standardize(teacher)) / 2


class PKD(Method):
    """weight * (1 - Pearson correlation) of the channel-standardised maps; a student map of another size is
    resized (bilinear) to the teacher's first."""

    layouts = frozenset({"map"})

    def __init__(self, student_channels: int, teacher_channels: int, weight: float = 6.0):
        super().__init__()
        if not weight >= 0:
            raise ValueError(f"pkd: weight must be >= 0, got {weight!r}")
        self.term_weights = {"pkd": weight}
        self.connector = (nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
                                        nn.BatchNorm2d(teacher_channels))
                          if student_channels != teacher_channels else None)

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, *, weight: float = 6.0) -> "PKD":
        require_maps("pkd", "student", [student_shape])
        require_maps("pkd", "teacher", [teacher_shape])
        return cls(student_shape[1], teacher_shape[1], weight)

    def forward(self, student: Tensor, teacher: Tensor, targets: Any = None) -> MethodOutput:
        s = self.connector(student) if self.connector is not None else student
        if s.shape[-2:] != teacher.shape[-2:]:
            s = F.interpolate(s, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
        return MethodOutput({"pkd": pkd_loss(s, teacher)})
