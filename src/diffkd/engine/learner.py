"""What a run trains: a plain model (`diffkd train`) or a Distiller (`diffkd distill`), behind one interface.

The trainer only sees `compute` (forward + named loss terms), the module to optimize and
checkpoint, and the student to evaluate, average (EMA) and export.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import Tensor, nn

from .. import models
from ..config import Config, ConfigError
from ..distiller import Distiller, Level
from ..tasks import Task
from .teacher import load_teacher_weights

TAP_ALIASES = ("feature", "logits")  # "@feature" / "@logits" in a config: the model's default taps


@dataclass
class StepOutput:
    """One forward: the (student) outputs, every loss term by name ("task" first), their total, method stats."""

    outputs: Any
    terms: dict[str, Tensor]
    total: Tensor
    stats: Mapping[str, Any] = field(default_factory=dict)


def forward(model: Callable[..., Any], inputs: Any) -> Any:
    """Call a model on a batch's inputs; a tuple (a detector's (images, targets)) is spread as arguments."""
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


class Learner(ABC):
    """The trained module (optimized, checkpointed, wrapped in DDP) and the student inside it."""

    module: nn.Module
    student: nn.Module

    @abstractmethod
    def compute(self, call: Callable[..., Any], inputs: Any, targets: Any) -> StepOutput:
        """Forward a batch through call (the module, maybe wrapped by DDP / torch.compile) and its losses."""

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Tell epoch-dependent parts (loss ramps) where training is; 0-based epoch."""

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the optimizer updates."""
        return (p for p in self.module.parameters() if p.requires_grad)

    @property
    def extra_parameters(self) -> int:
        """Parameters trained besides the student's (method modules); 0 for plain training."""
        return 0


class PlainLearner(Learner):
    """`diffkd train`: the model of the config's `model` section with its task loss only."""

    def __init__(self, cfg: Config, task: Task) -> None:
        if cfg.model is None:
            raise ConfigError("model: required for `diffkd train` (e.g. model: {name: fmnist_teacher})")
        self.task = task
        self.module = self.student = task.build_model(cfg.model)

    def compute(self, call: Callable[..., Any], inputs: Any, targets: Any) -> StepOutput:
        outputs = forward(call, inputs)
        loss = self.task.loss(outputs, targets)
        return StepOutput(outputs, {"task": loss}, loss)


def resolve_tap(
    spec: str | dict[str, Any], model_name: str, where: str, default_taps: Callable[[str], models.Taps] = models.default_taps
) -> str | dict[str, Any]:
    """'@feature' / '@logits' -> the model's default tap path (per `default_taps`); any other spec unchanged."""
    if not isinstance(spec, str) or not spec.startswith("@"):
        return spec
    alias = spec[1:]
    if alias not in TAP_ALIASES:
        raise ConfigError(
            f"{where}: unknown tap alias {spec!r}; use {', '.join('@' + a for a in TAP_ALIASES)} or a module path"
        )
    return getattr(default_taps(model_name), alias)


class DistillLearner(Learner):
    """`diffkd distill`: a Distiller of the frozen teacher and the student, with the config's levels."""

    def __init__(self, cfg: Config, task: Task) -> None:
        missing = [k for k in ("teacher", "student") if getattr(cfg, k) is None] + ([] if cfg.levels else ["levels"])
        if missing:
            raise ConfigError(f"{', '.join(missing)}: required for `diffkd distill`")
        self.task = task
        teacher = task.build_model(cfg.teacher)
        load_teacher_weights(teacher, cfg.teacher)
        student = task.build_model(cfg.student)
        levels = [
            Level(
                student=resolve_tap(lv.student, cfg.student.name, f"levels.{i}.student", task.default_taps),
                teacher=resolve_tap(lv.teacher, cfg.teacher.name, f"levels.{i}.teacher", task.default_taps),
                method=lv.method,
                weight=lv.weight,
                name=lv.name,
                targets=lv.targets,
                **lv.options,
            )
            for i, lv in enumerate(cfg.levels)
        ]
        self.module = Distiller(teacher, student, levels, input_shape=task.input_shape)
        self.student = self.module.student

    def compute(self, call: Callable[..., Any], inputs: Any, targets: Any) -> StepOutput:
        out = call(inputs, targets)
        task_loss = self.task.loss(out.student, targets)
        return StepOutput(out.student, {"task": task_loss, **out.losses}, task_loss + out.loss, out.stats)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.module.set_epoch(epoch, epochs)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.module.trainable_parameters())

    @property
    def extra_parameters(self) -> int:
        return int(self.module.extra_parameters())


LEARNERS: Mapping[str, Callable[[Config, Task], Learner]] = MappingProxyType(
    {"train": PlainLearner, "distill": DistillLearner}
)
