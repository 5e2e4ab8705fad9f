"""DKD: decoupled target-class and non-target-class KD, with a linear warm-up of its weight."""
from __future__ import annotations

import torch
from torch import Tensor

from ..losses import dkd_loss
from .base import Method, MethodOutput, epoch_ramp, require_same_shape


class DKD(Method):
    """tau^2 * (alpha * TCKD + beta * NCKD), scaled by min(1, (epoch + 1) / warmup_epochs) per whole epoch.

    standardize=True z-scores the logits per sample first (logit standardization; its recipe: tau 2).
    """

    needs_targets = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, tau: float = 4.0, warmup_epochs: int = 20,
                 standardize: bool = False):
        super().__init__()
        self.alpha, self.beta, self.tau, self.standardize = alpha, beta, tau, standardize
        self.warmup_epochs = warmup_epochs
        self.ramp = 1.0

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, **options) -> "DKD":
        require_same_shape("dkd", student_shape, teacher_shape)
        if len(student_shape) != 2:
            raise ValueError(f"dkd needs logits (B,K), got a tap of shape {tuple(student_shape)}")
        return cls(**options)

    def set_progress(self, epoch: float, epochs: int) -> None:
        self.ramp = epoch_ramp(epoch, self.warmup_epochs)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> MethodOutput:
        if targets is None:
            raise ValueError("dkd needs the class labels: call the distiller as d(inputs, targets)")
        loss = dkd_loss(student, teacher, targets, self.alpha, self.beta, self.tau, self.standardize)
        return MethodOutput({"dkd": loss}, weights={"dkd": self.ramp})
