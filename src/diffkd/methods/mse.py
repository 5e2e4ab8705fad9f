"""FitNet-style MSE: a connector maps the student feature to the teacher's width, then MSE.

It is the paper's "MSE" baseline, i.e. DiffKD with the diffusion part removed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import mse_loss
from .base import Method, MethodOutput

_CONNECTORS = {2: nn.Conv2d, 1: nn.Conv1d}  # spatial rank -> 1x1 conv; vectors get a linear map


class MSE(Method):
    """1x1 conv (maps, sequences) or linear (vectors) connector; a student map (sequence) is resized
    to the teacher's size (length), bilinear (linear)."""

    def __init__(self, student_channels: int, teacher_channels: int, dims: int = 2):
        super().__init__()
        self.connector = (_CONNECTORS[dims](student_channels, teacher_channels, 1) if dims
                          else nn.Linear(student_channels, teacher_channels))

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size) -> "MSE":
        if len(student_shape) != len(teacher_shape) or len(student_shape) not in (2, 3, 4):
            raise ValueError(
                f"mse needs two maps (B,C,H,W), two sequences (B,C,L) or two vectors (B,K), got student "
                f"{tuple(student_shape)} and teacher {tuple(teacher_shape)}"
            )
        return cls(student_shape[1], teacher_shape[1], dims=len(student_shape) - 2)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> MethodOutput:
        projected = self.connector(student)
        if projected.dim() > 2 and projected.shape[2:] != teacher.shape[2:]:
            mode = "bilinear" if projected.dim() == 4 else "linear"
            projected = F.interpolate(projected, size=teacher.shape[2:], mode=mode, align_corners=False)
        return MethodOutput({"mse": mse_loss(projected, teacher)})
