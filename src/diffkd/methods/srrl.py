"""SRRL: the student's feature, through a connector, goes through the teacher's frozen classifier.

Yang, Martinez, Bulat and Tzimiropoulos, "Knowledge Distillation via Softmax Regression
Representation Learning", ICLR 2021. docs/design.md §5. The teacher's classifier is given by its
module path (`teacher_head`); the Distiller hands the frozen module over (see `hold_teacher_module`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Method, MethodOutput, hold_teacher_module, require_maps


class SRRL(Method):
    """L_FM + L_SR (weights 1, 1): connector (1x1 conv, BN, ReLU) on the student map, then

    L_FM = mean over (B,C) of (spatial mean of the connector output - spatial mean of the teacher map)^2,
    L_SR = MSE(teacher_head(spatial mean of the connector output), teacher_head(spatial mean of the teacher map)).
    Takes the last (B,C,H,W) maps before pooling on both sides and `teacher_head`, the path of the
    teacher's classifier applied to its pooled (B,C) vector (e.g. "fc"); with those taps,
    teacher_head(pooled teacher map) is the teacher's own logits. Gradient flows through the frozen
    head to the student; its weights never change.
    """

    layouts = frozenset({"map"})
    teacher_module_options = ("teacher_head",)

    def __init__(self, student_channels: int, teacher_channels: int, teacher_head: nn.Module):
        super().__init__()
        self.connector = nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
                                       nn.BatchNorm2d(teacher_channels), nn.ReLU())
        hold_teacher_module(self, "teacher_head", teacher_head)

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, *,
              teacher_head: nn.Module | None = None) -> "SRRL":
        require_maps("srrl", "student", [student_shape])
        require_maps("srrl", "teacher", [teacher_shape])
        if not isinstance(teacher_head, nn.Module):
            raise ValueError("srrl needs teacher_head=<module path of the teacher's classifier>, e.g. teacher_head='fc'")
        param = next(teacher_head.parameters(), None)
        probe = torch.zeros(2, teacher_shape[1], device=param.device if param is not None else None,
                            dtype=param.dtype if param is not None else None)
        try:
            with torch.no_grad():
                teacher_head(probe)
        except RuntimeError as exc:
            raise ValueError(
                f"srrl: teacher_head ({type(teacher_head).__name__}) does not take the teacher tap's pooled "
                f"(B, {teacher_shape[1]}) vector ({str(exc).splitlines()[0]}); give the classifier that follows the "
                "teacher's global pooling, and the map that is pooled as the teacher tap"
            ) from None
        return cls(student_shape[1], teacher_shape[1], teacher_head)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> MethodOutput:
        pooled_student = self.connector(student).float().mean(dim=(2, 3))
        pooled_teacher = teacher.float().mean(dim=(2, 3))
        with torch.no_grad():
            teacher_logits = self.teacher_head(pooled_teacher.to(teacher.dtype)).float()
        student_logits = self.teacher_head(pooled_student.to(teacher.dtype)).float()
        return MethodOutput({
            "feature": F.mse_loss(pooled_student, pooled_teacher),
            "softmax_regression": F.mse_loss(student_logits, teacher_logits),
        })  # fmt: skip
