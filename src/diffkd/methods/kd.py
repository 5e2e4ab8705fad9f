"""Hinton KD on logits (or per pixel on dense maps)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..losses import kd_loss
from .base import Method, MethodOutput, require_same_shape


class KD(Method):
    """tau^2 * KL(teacher softmax || student softmax); CIFAR uses tau = 4.

    standardize=True: logit standardization (z-scored logits per sample; its recipe: tau 2, weight 9).
    """

    def __init__(self, tau: float = 4.0, standardize: bool = False):
        super().__init__()
        self.tau, self.standardize = tau, standardize

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, **options) -> "KD":
        require_same_shape("kd", student_shape, teacher_shape)
        return cls(**options)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> MethodOutput:
        return MethodOutput({"kd": kd_loss(student, teacher, self.tau, self.standardize)})
