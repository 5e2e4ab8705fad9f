"""One distillation step, for every front end: the levels' methods on the features a front end hands over,
every weight applied once, and the total with the task loss.

The engine and the Hugging Face and Lightning adapters reach it through the Distiller (which gathers the
features with forward hooks); the Ultralytics adapter calls it with the neck maps it reads from YOLO's
head. Each front end only gathers features, a task loss and the training progress in its framework's way.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .methods import MethodOutput
from .weighting import LossWeights, WeightedTerms

Progress = tuple[float, int]  # (fractional 0-based epoch, epochs of the run): 2.25 is a quarter into the third


@dataclass
class DistillOutput:
    """The student's own output (where the front end had one), the weighted loss terms by name, their sum
    (`loss`), the task loss when given, and the total to optimise (`total`: task loss + loss); diagnostics;
    the same terms unweighted (`raw`) with the weight each got (`weights`); each level's term names, in order
    (`terms`: a loss's name is the level's for a method of one term, else level/term)."""

    student: Any
    losses: dict[str, Tensor]
    loss: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)
    raw: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, float | Tensor] = field(default_factory=dict)
    task_loss: Tensor | None = None
    terms: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def total(self) -> Tensor:
        """What a training step optimises: the task loss (where given) plus every weighted term."""
        return self.loss if self.task_loss is None else self.task_loss + self.loss


class DistillationStep(nn.Module):
    """The levels' methods (`methods`, by level name) and their weights (`weighting`): from features to losses."""

    def __init__(self, methods: nn.ModuleDict, weighting: LossWeights):
        super().__init__()
        self.methods, self.weighting = methods, weighting

    def compute(self, student: Mapping[str, Any], teacher: Mapping[str, Any], *, targets: Any = None,
                extra: Mapping[str, Mapping[str, Any]] | None = None, task_loss: Tensor | None = None,
                progress: Progress | None = None, student_output: Any = None) -> DistillOutput:
        """Every level's method on its features (`student[level]`, `teacher[level]`: a tensor, or a list for a
        level of several taps), with its extra inputs (`extra[level]`), then every weight at `progress`."""
        outputs: dict[str, MethodOutput] = {}
        stats: dict[str, Tensor] = {}
        for name, method in self.methods.items():
            outputs[name] = out = method(student[name], teacher[name], targets, **(extra or {}).get(name, {}))
            stats.update({f"{name}/{key}": value for key, value in out.stats.items()})
        weighed: WeightedTerms = self.weighting(outputs, task_loss, progress)
        return DistillOutput(student_output, weighed.weighted, sum(weighed.weighted.values()), stats,  # type: ignore[arg-type]
                             weighed.raw, weighed.weights, task_loss, {n: tuple(o.terms) for n, o in outputs.items()})

    def end_epoch(self) -> None:
        """An epoch is over: a calibration window (weight "auto") still open ends with the first epoch."""
        self.weighting.end_windows()

    def auto_weights(self) -> dict[str, float]:
        """Each level with weight "auto": its factor (the running estimate while its window is open)."""
        return self.weighting.current()
