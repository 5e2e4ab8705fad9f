"""FitNet-style MSE: a connector maps the student feature to the teacher's width, then MSE.

It is the paper's "MSE" baseline, i.e. DiffKD with the diffusion part removed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import mse_loss
from .base import Method, MethodOutput


class MSE(Method):
    """1x1 conv (maps) or linear (vectors) connector; a student map is resized to the teacher's."""

    def __init__(self, student_channels: int, teacher_channels: int, maps: bool = True):
        super().__init__()
        self.connector = nn.Conv2d(student_channels, teacher_channels, 1) if maps else nn.Linear(student_channels, teacher_channels)

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, **options) -> "MSE":
        if len(student_shape) != len(teacher_shape) or len(student_shape) not in (2, 4):
            raise ValueError(
                f"mse needs two maps (B,C,H,W) or two vectors (B,K), got student {tuple(student_shape)} "
                f"and teacher {tuple(teacher_shape)}"
            )
        return cls(student_shape[1], teacher_shape[1], maps=len(student_shape) == 4, **options)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> MethodOutput:
        projected = self.connector(student)
        if projected.dim() == 4 and projected.shape[-2:] != teacher.shape[-2:]:
            projected = F.interpolate(projected, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
        return MethodOutput({"mse": mse_loss(projected, teacher)})
