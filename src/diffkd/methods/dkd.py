"""DKD: decoupled target-class and non-target-class KD, with a linear warm-up of its weight."""
from __future__ import annotations

import torch
from torch import Tensor

from ..losses import dkd_loss
from ..weighting import EpochRamp, check_schedule_epochs
from .base import Method, MethodOutput, require_same_shape


class DKD(Method):
    """tau^2 * (alpha * TCKD + beta * NCKD), scaled by min(1, (epoch + 1) / warmup_epochs) per whole epoch.

    standardize=True z-scores the logits per sample first (logit standardization; its recipe: tau 2).
    """

    needs_targets = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, tau: float = 4.0, warmup_epochs: int = 20,
                 standardize: bool = False):
        super().__init__()
        self.alpha, self.beta, self.tau, self.standardize = alpha, beta, tau, standardize
        self.schedules = {"dkd": EpochRamp(check_schedule_epochs("dkd: warmup_epochs", warmup_epochs))}

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, **options) -> "DKD":
        require_same_shape("dkd", student_shape, teacher_shape)
        if len(student_shape) != 2:
            raise ValueError(f"dkd needs logits (B,K), got a tap of shape {tuple(student_shape)}")
        return cls(**options)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> MethodOutput:
        if targets is None:
            raise ValueError("dkd needs the class labels: call the distiller as d(inputs, targets)")
        loss = dkd_loss(student, teacher, targets, self.alpha, self.beta, self.tau, self.standardize)
        return MethodOutput({"dkd": loss})
