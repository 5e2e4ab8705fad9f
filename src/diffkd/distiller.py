"""Teacher + student + one method per level: the object a training loop optimises.

The teacher is held outside the module tree: it is frozen, pinned to eval mode, never in
`state_dict()` (so checkpoints hold student + method modules only) and invisible to DDP, yet it
follows `.to()` with the rest. Features come from forward hooks, so neither model is edited.
"""
from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .atomic import save_atomic
from .methods import build_method
from .models.probe import resolve_aliases
from .taps import FeatureTaps, Tap, call_model, probe_features


class Level:
    """One distilled pair: student tap, teacher tap, method name, loss weight and method options."""

    def __init__(self, student: str | Tap | Mapping[str, Any], teacher: str | Tap | Mapping[str, Any], method: str, weight: float = 1.0,
                 name: str | None = None, **options: Any):
        self.student, self.teacher, self.method = student, teacher, method
        self.weight, self.options = check_weight(weight), options
        path = Tap.parse(student).path
        self.name = name or f"{method}_{re.sub(r'[^0-9A-Za-z_]', '_', path) or 'output'}"

    def __repr__(self) -> str:
        return (f"Level({self.student!r}, {self.teacher!r}, {self.method!r}, weight={self.weight}, "
                f"name={self.name!r}, options={self.options})")


def check_weight(weight: Any) -> float:
    """A level's loss weight: a finite real number >= 0 (a bool or a string is a mistake, not a weight)."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"Level weight must be a finite number >= 0, got {weight!r}")
    return weight


@dataclass
class DistillOutput:
    """The student's own output, the weighted loss terms by name, their sum, and diagnostics."""

    student: Any
    losses: dict[str, Tensor]
    loss: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


class Distiller(nn.Module):
    """Distil `student` from a frozen `teacher` on the given levels.

    Give `example_input` (or `input_shape` without batch) so every tap's shape is probed once and
    the method modules are sized automatically. A level's tap may be "@feature" / "@logits": the
    model's pooled feature and logits, found by probing it (`diffkd.models.find_taps`).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, levels: Sequence[Level],
                 example_input: Any = None, input_shape: tuple[int, ...] | None = None):
        super().__init__()
        if not levels:
            raise ValueError("a Distiller needs at least one Level")
        if example_input is None and input_shape is None:
            raise ValueError("give example_input or input_shape so the method modules can be sized from the taps")
        names = [level.name for level in levels]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"level names must be unique, got {duplicates} twice; pass name=... to Level")
        self.levels = list(levels)
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see the module docstring
        teacher.requires_grad_(False).eval()

        student_specs = resolve_aliases({lv.name: lv.student for lv in levels}, student, example_input,
                                        input_shape=input_shape, role="student")
        teacher_specs = resolve_aliases({lv.name: lv.teacher for lv in levels}, teacher, example_input,
                                        input_shape=input_shape, role="teacher")
        student_probe = probe_features(student, student_specs, example_input, input_shape=input_shape)
        teacher_probe = probe_features(teacher, teacher_specs, example_input, input_shape=input_shape)
        self.methods = nn.ModuleDict()
        for lv in levels:
            s, t = student_probe[lv.name], teacher_probe[lv.name]
            try:
                self.methods[lv.name] = build_method(lv.method, s.shape, t.shape, layouts=(s.layout, t.layout), **lv.options)
            except ValueError as exc:
                raise ValueError(f"level {lv.name!r} ({lv.student!r} -> {lv.teacher!r}): {exc}") from None
        self.student_taps = FeatureTaps(student, student_specs)
        self.teacher_taps = FeatureTaps(teacher, teacher_specs)

    # ----------------------------------------------------------------------------- modes, devices
    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()
        return self

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    # ----------------------------------------------------------------------------- forward
    def forward(self, inputs: Any, targets: Tensor | None = None) -> DistillOutput:
        """Run teacher (no grad) and student, then every level's method on the captured features.

        A tuple `inputs` is spread as positional arguments (detectors take `(images, targets)`).
        """
        with torch.no_grad():
            call_model(self.teacher, inputs)
        student_output = call_model(self.student, inputs)
        losses: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        for level in self.levels:
            out = self.methods[level.name](self.student_taps[level.name], self.teacher_taps[level.name], targets)
            for term, value in out.terms.items():
                losses[level.name if len(out.terms) == 1 else f"{level.name}/{term}"] = level.weight * value
            for key, value in out.stats.items():
                stats[f"{level.name}/{key}"] = value
        return DistillOutput(student_output, losses, sum(losses.values()), stats)  # type: ignore[arg-type]

    def set_progress(self, epoch: float, epochs: int) -> None:
        """Tell methods with a schedule (DKD's warm-up, DiffKD's kd_warmup_epochs) where training stands.

        Call it before every step: `epoch` is fractional, `e + i / steps_per_epoch` before step i of
        epoch e (0-based), out of `epochs`. The engine does this; a hand-written loop must too.
        """
        for method in self.methods.values():
            method.set_progress(epoch, epochs)

    # ----------------------------------------------------------------------------- parameters, export
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student + method modules: what the optimizer gets."""
        for p in self.parameters():
            if p.requires_grad:
                yield p

    def extra_parameters(self) -> int:
        """Number of parameters the methods add (training-time only)."""
        return sum(p.numel() for p in self.methods.parameters())

    def student_state_dict(self) -> dict[str, Tensor]:
        """The student's weights alone, loadable with strict=True into a plain student model."""
        return {k: v.detach().clone() for k, v in self.student.state_dict().items()}

    def export_student(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the student's weights alone, atomically; an existing file is kept unless overwrite."""
        return save_atomic(self.student_state_dict(), path, overwrite=overwrite)

    def close(self) -> None:
        """Remove the feature hooks from both models."""
        self.student_taps.close()
        self.teacher_taps.close()
