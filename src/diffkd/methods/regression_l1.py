"""Regression KD: L1 between the student's and the teacher's box-regression outputs.

For one-stage detectors (RetinaNet, FCOS) both models regress the same anchors / locations of the
same image, so their (B, N, 4) outputs can be compared element by element.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Method, MethodOutput, require_same_shape


class RegressionL1(Method):
    """mean |student - teacher| over every anchor and coordinate, in float32."""

    layouts = frozenset({"map", "vector", "sequence", "raw"})  # element-wise: any layout compares

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, **options) -> "RegressionL1":
        require_same_shape("regression_l1", student_shape, teacher_shape)
        return cls(**options)

    def forward(self, student: Tensor, teacher: Tensor, targets: object = None) -> MethodOutput:
        if student.shape != teacher.shape:
            raise ValueError(
                f"regression_l1: student and teacher regress different anchor sets, {tuple(student.shape)} vs "
                f"{tuple(teacher.shape)}; both detectors need the same anchors and input size"
            )
        return MethodOutput({"regression_l1": (student.float() - teacher.float()).abs().mean()})
