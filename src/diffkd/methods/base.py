"""What every distillation method is: a small module from (student, teacher) features to losses."""
from __future__ import annotations

import inspect
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

    @classmethod
    def option_names(cls) -> list[str]:
        """The options a level may give (named in errors); by default the keyword parameters of __init__.
        A method whose build fills some of those from the shapes, or takes others, says so by overriding."""
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [p.name for p in inspect.signature(cls.__init__).parameters.values() if p.kind in kinds][1:]

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> MethodOutput:
        raise NotImplementedError

    def set_progress(self, epoch: float, epochs: int) -> None:
        """Hook for methods whose weights follow training (DKD's warm-up, DiffKD's kd_warmup_epochs).

        `epoch` is fractional: 2.25 is a quarter into the third epoch (0-based); `epochs` the run's total.
        """


def require_same_shape(
    method: str, student_shape: torch.Size, teacher_shape: torch.Size, remedy: str = "check the taps and num_classes"
) -> None:
    """Logit-matching methods need identical shapes apart from the batch."""
    if tuple(student_shape[1:]) != tuple(teacher_shape[1:]):
        raise ValueError(
            f"{method} compares student and teacher outputs of the same shape, got student "
            f"{tuple(student_shape)} and teacher {tuple(teacher_shape)} ({remedy})"
        )
