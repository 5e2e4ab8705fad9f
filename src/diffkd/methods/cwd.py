"""CWD: channel-wise distillation of dense maps (segmentation logits).

Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021. Each channel of
a (B,C,H,W) map becomes a distribution over the H*W positions (softmax with temperature tau); the
student matches the teacher's per channel by KL:
`tau^2 sum_{n,c,hw} p_T (log p_T - log p_S) / (N C)`. The authors' segmentation setting is tau 4 with
loss weight 3 (docs/design.md §5).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Method, MethodOutput


def cwd_loss(student: Tensor, teacher: Tensor, tau: float) -> Tensor:
    """tau^2 * sum over (n, c) of KL(softmax_hw(t / tau) || softmax_hw(s / tau)), divided by N*C, in float32."""
    n, c = student.shape[:2]
    log_p_s = F.log_softmax(student.float().reshape(n, c, -1) / tau, dim=2)
    log_p_t = F.log_softmax(teacher.float().reshape(n, c, -1) / tau, dim=2)
    return tau**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum() / (n * c)


class CWD(Method):
    """Per-channel spatial KL; a student map of another size is resized to the teacher's (bilinear) first."""

    layouts = frozenset({"map"})

    def __init__(self, tau: float = 4.0):
        super().__init__()
        if tau <= 0:
            raise ValueError(f"cwd: tau must be positive, got {tau}")
        self.tau = tau

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, **options: Any) -> "CWD":
        if len(student_shape) != 4 or len(teacher_shape) != 4 or student_shape[1] != teacher_shape[1]:
            raise ValueError(
                f"cwd compares two maps (B,C,H,W) with the same channels (one per class for logits), got student "
                f"{tuple(student_shape)} and teacher {tuple(teacher_shape)} (check the taps and num_classes)"
            )
        return cls(**options)

    def forward(self, student: Tensor, teacher: Tensor, targets: Any = None) -> MethodOutput:
        if student.shape[-2:] != teacher.shape[-2:]:
            student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
        return MethodOutput({"cwd": cwd_loss(student, teacher, self.tau)})
