"""What every distillation method is: a small module from (student, teacher) features to losses."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class MethodOutput:
    """Named loss terms (their sum is the method's loss) and diagnostics worth logging."""

    terms: dict[str, Tensor]
    stats: dict[str, Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> Tensor:
        return sum(self.terms.values())  # type: ignore[return-value]


class Method(nn.Module):
    """Base of all methods; `build` sizes the method from the probed tap shapes."""

    needs_targets = False
    # The tap layouts (FeatureTaps.layouts) the method reads; "raw" captures are not channel-first.
    layouts: frozenset[str] = frozenset({"map", "vector", "sequence"})

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, **options) -> "Method":
        """Construct from probed shapes (batch first) and the level's options."""
        return cls(**options)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> MethodOutput:
        raise NotImplementedError

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Hook for methods whose weight depends on training progress (DKD's warm-up)."""


def require_same_shape(method: str, student_shape: torch.Size, teacher_shape: torch.Size) -> None:
    """Logit-matching methods need identical shapes apart from the batch."""
    if tuple(student_shape[1:]) != tuple(teacher_shape[1:]):
        raise ValueError(
            f"{method} compares student and teacher outputs of the same shape, got student "
            f"{tuple(student_shape)} and teacher {tuple(teacher_shape)} (check the taps and num_classes)"
        )
