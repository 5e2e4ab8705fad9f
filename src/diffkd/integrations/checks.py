"""Checks every integration makes on the teacher and the levels before it builds a Distiller."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn


def check_teacher_and_levels(teacher: nn.Module | None, levels: Sequence[Any] | None, who: str) -> None:
    """A teacher without levels, or levels without a teacher, is a mistake: say which is missing."""
    if teacher is None and not levels:
        raise ValueError(f"{who} needs teacher=... (a trained model) and levels=[Level(...), ...] (what to distil)")
    if teacher is None:
        raise ValueError(f"{who} got levels but no teacher: pass teacher=... (the trained model the levels tap)")
    if not levels:
        raise ValueError(f"{who} got a teacher but no levels: pass levels=[Level(student_tap, teacher_tap, method), ...]")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"{who}: teacher must be a torch nn.Module, got {type(teacher).__name__}")


def warn_if_teacher_trainable(teacher: nn.Module, who: str) -> None:
    """The Distiller freezes the teacher and pins it to eval mode; say so when that changes what was given."""
    training = [name or "the teacher" for name, m in teacher.named_modules() if m.training]
    trainable = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
    if training or trainable:
        what = " and ".join(x for x in (
            "was in training mode" if training else "",
            f"had {trainable} parameters requiring grad" if trainable else "") if x)
        warnings.warn(f"{who}: the teacher {what}; it is frozen (requires_grad=False) and kept in eval mode "
                      "(no dropout, fixed BatchNorm statistics), as the Distiller does", UserWarning, stacklevel=3)
