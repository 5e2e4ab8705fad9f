"""Teacher + student + one method per level: the object a training loop optimises.

The teacher is held outside the module tree: it is frozen, pinned to eval mode, never in
`state_dict()` (so checkpoints hold student + method modules only) and invisible to DDP, yet it
follows `.to()` with the rest. Features come from forward hooks, so neither model is edited.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .atomic import save_atomic
from .methods import build_method
from .taps import FeatureTaps, Tap, call_model, probe_features


class Level:
    """One distilled pair: student tap, teacher tap, method name, loss weight and method options.

    `targets` says what the method gets as its targets: None, those given to `Distiller.forward`; a
    tap spec, that capture of the student's latest forward, kept as produced (a tap of layout "object"). A torchvision
    detector's "transform" gives (ImageList, targets) with the boxes resized into the frame of the
    padded batch its feature maps are in, which the batch's own targets (input-image pixels) are not.
    """

    def __init__(self, student: str | Tap | Mapping[str, Any], teacher: str | Tap | Mapping[str, Any], method: str, weight: float = 1.0,
                 name: str | None = None, targets: str | Tap | Mapping[str, Any] | None = None, **options: Any):
        self.student, self.teacher, self.method = student, teacher, method
        self.weight, self.targets, self.options = weight, targets, options
        path = Tap.parse(student).path
        self.name = name or f"{method}_{re.sub(r'[^0-9A-Za-z_]', '_', path) or 'output'}"

    def __repr__(self) -> str:
        targets = "" if self.targets is None else f", targets={self.targets!r}"
        return (f"Level({self.student!r}, {self.teacher!r}, {self.method!r}, weight={self.weight}, "
                f"name={self.name!r}{targets}, options={self.options})")


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
    the method modules are sized automatically.
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

        student_specs = {lv.name: lv.student for lv in levels}
        teacher_specs = {lv.name: lv.teacher for lv in levels}
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
        target_specs = {f"{lv.name}/targets": replace(Tap.parse(lv.targets), layout="object") for lv in levels if lv.targets is not None}
        self.target_taps = FeatureTaps(student, target_specs)

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
            level_targets = targets if level.targets is None else self.target_taps[f"{level.name}/targets"]
            out = self.methods[level.name](self.student_taps[level.name], self.teacher_taps[level.name], level_targets)
            for term, value in out.terms.items():
                losses[level.name if len(out.terms) == 1 else f"{level.name}/{term}"] = level.weight * value
            for key, value in out.stats.items():
                stats[f"{level.name}/{key}"] = value
        return DistillOutput(student_output, losses, sum(losses.values()), stats)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Tell methods with a schedule (DKD's warm-up) where training stands."""
        for method in self.methods.values():
            method.set_epoch(epoch, epochs)

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
        self.target_taps.close()
