"""DIST: match inter- and intra-class Pearson relations instead of exact probabilities."""
from __future__ import annotations

import torch
from torch import Tensor

from ..losses import dist_loss
from .base import Method, MethodOutput, require_same_shape


class DIST(Method):
    """tau^2 * (beta * inter + gamma * intra); dense maps count every pixel as a sample."""

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0):
        super().__init__()
        self.beta, self.gamma, self.tau = beta, gamma, tau

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, **options) -> "DIST":
        require_same_shape("dist", student_shape, teacher_shape)
        return cls(**options)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> MethodOutput:
        return MethodOutput({"dist": dist_loss(student, teacher, self.beta, self.gamma, self.tau)})
