"""What a run trains: a plain model (`diffkd train`) or a Distiller (`diffkd distill`), behind one interface.

The trainer only sees `compute` (forward + named loss terms), the module to optimize and
checkpoint, and the student to evaluate, average (EMA) and export.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from .. import models
from ..config import Config, ConfigError, ModelConfig, TeacherConfig
from ..distiller import Distiller, Level, default_level_name
from ..models.probe import ProbeError, resolve_alias
from ..models.weights import file_sha256
from ..taps import Tap, call_model
from ..tasks import Task
from .identity import weights_digest
from .teacher import load_teacher_weights



@dataclass
class StepOutput:
    """One forward: the (student) outputs, every loss term by name ("task" first), their total, method stats."""

    outputs: Any
    terms: dict[str, Tensor]
    total: Tensor
    stats: Mapping[str, Any] = field(default_factory=dict)


class Learner(ABC):
    """The trained module (optimized, checkpointed, wrapped in DDP) and the student inside it."""

    module: nn.Module
    student: nn.Module
    needs_indices = False  # whether compute needs each sample's dataset index (the training data then yields them)
    teacher_identity: dict[str, Any] | None = None  # the frozen teacher's weights digest and file (identity.py)

    @abstractmethod
    def compute(self, call: Callable[..., Any], inputs: Any, targets: Any, indices: Tensor | None = None) -> StepOutput:
        """Forward a batch through call (the module, maybe wrapped by DDP / torch.compile) and its losses.

        indices: the (B,) dataset indices of the batch's items, given when `needs_indices`.
        """

    def set_progress(self, epoch: float, epochs: int) -> None:
        """Where training stands, before every step (0-based, fractional epoch): for weights that follow it."""

    def end_epoch(self) -> None:
        """An epoch's steps are done (an automatic weight's window closes with the first epoch)."""

    def epoch_columns(self) -> dict[str, float]:
        """Values logged once per epoch besides the losses (the automatic loss weights)."""
        return {}

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the optimizer updates."""
        return (p for p in self.module.parameters() if p.requires_grad)

    def method_parameters(self) -> Iterator[nn.Parameter]:
        """Those of them that belong to the distillation methods' modules (none for plain training)."""
        return iter(())

    @property
    def extra_parameters(self) -> int:
        """Parameters trained besides the student's (method modules); 0 for plain training."""
        return 0

    def describe(self) -> list[str]:
        """Lines the run logs at its start about what it trains (a distillation's resolved taps); none by default."""
        return []


def build_model(task: Task, spec: ModelConfig | TeacherConfig, key: str) -> nn.Module:
    """The task's model for a config section; a name that cannot build one is a ConfigError naming the key."""
    try:
        return task.build_model(spec)
    except models.ModelNameError as err:
        raise ConfigError(f"{key}.name: {err}") from None


class PlainLearner(Learner):
    """`diffkd train`: the model of the config's `model` section with its task loss only (dataset_size unused)."""

    def __init__(self, cfg: Config, task: Task, dataset_size: int | None = None) -> None:
        if cfg.model is None:
            raise ConfigError("model: required for `diffkd train` (e.g. model: {name: fmnist_teacher})")
        self.task = task
        self.module = self.student = build_model(task, cfg.model, "model")

    def compute(self, call: Callable[..., Any], inputs: Any, targets: Any, indices: Tensor | None = None) -> StepOutput:
        outputs = call_model(call, inputs)
        loss = self.task.loss(outputs, targets)
        return StepOutput(outputs, {"task": loss}, loss)


class DistillLearner(Learner):
    """`diffkd distill`: a Distiller of the frozen teacher and the student, with the config's levels.

    dataset_size: the training set's size, for methods that use each sample's dataset index (CRD).
    """

    def __init__(self, cfg: Config, task: Task, dataset_size: int | None = None) -> None:
        missing = [k for k in ("teacher", "student") if getattr(cfg, k) is None] + ([] if cfg.levels else ["levels"])
        if missing:
            raise ConfigError(f"{', '.join(missing)}: required for `diffkd distill`")
        self.task = task
        teacher = build_model(task, cfg.teacher, "teacher")
        teacher_file = load_teacher_weights(teacher, cfg.teacher)
        if teacher_file is not None:
            task.check_run(teacher_file.parent, role="teacher")
        self.teacher_identity = {
            "weights_sha256": weights_digest(teacher),
            "checkpoint": str(teacher_file) if teacher_file is not None else f"pretrained {cfg.teacher.name}",
            "file_sha256": file_sha256(teacher_file) if teacher_file is not None else None,
        }
        student = build_model(task, cfg.student, "student")
        student_taps = functools.cache(lambda: task.default_taps(cfg.student.name, student))
        teacher_taps = functools.cache(lambda: task.default_taps(cfg.teacher.name, teacher))
        levels = []
        for i, lv in enumerate(cfg.levels):
            try:
                student_tap = resolve_alias(lv.student, f"levels.{i}.student", student_taps)
                teacher_tap = resolve_alias(lv.teacher, f"levels.{i}.teacher", teacher_taps)
            except ProbeError as err:  # its message already names the config key
                raise ConfigError(str(err)) from None
            name = lv.name or default_level_name(lv.method, lv.student)  # named by the taps as written, as the API does
            try:
                levels.append(Level(student_tap, teacher_tap, lv.method, lv.weight, name, inputs=lv.inputs,
                                    ratio=lv.ratio, window=lv.window, calibrate=lv.calibrate, **lv.options))
            except ValueError as err:  # a bad weight: name the config entry
                raise ConfigError(f"levels.{i}: {err}") from None
        self.module = Distiller(teacher, student, levels, input_shape=task.input_shape, dataset_size=dataset_size,
                                task_loss=task.loss)
        self.student = self.module.student
        self.needs_indices = self.module.needs_indices
        self.written_taps = [(lv.student, lv.teacher) for lv in cfg.levels]  # as in the config, for describe()
        self.progress: tuple[float, int] | None = None  # set before every training step

    def describe(self) -> list[str]:
        """Each level's taps as written and as resolved, with their probed shapes and layouts, e.g.
        `level diffkd_feature: student @feature -> layer4 (B,512,7,7) map; teacher ...`."""
        lines = []
        for level, written in zip(self.module.levels, self.written_taps):
            sides = [_describe_side(self.module, level, side, spec) for side, spec in zip(("student", "teacher"), written)]
            lines.append(f"level {level.name} ({level.method}): {'; '.join(sides)}")
        return lines

    def compute(self, call: Callable[..., Any], inputs: Any, targets: Any, indices: Tensor | None = None) -> StepOutput:
        out = call(inputs, targets, indices, progress=self.progress)
        raw = {f"{k}/raw": v.detach() for k, v in out.raw.items() if not _is_one(out.weights[k])}  # where they differ
        return StepOutput(out.student, {"task": out.task_loss, **out.losses}, out.total, {**out.stats, **raw})

    def end_epoch(self) -> None:
        self.module.end_epoch()

    def epoch_columns(self) -> dict[str, float]:
        return {f"weight_{name}": value for name, value in self.module.auto_weights().items()}

    def set_progress(self, epoch: float, epochs: int) -> None:
        # a tensor, so a compiled step reads a new epoch without recompiling (the trainer ends each epoch itself)
        self.progress = (torch.tensor(epoch, dtype=torch.float64), epochs)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.module.trainable_parameters())

    def method_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.module.methods.parameters() if p.requires_grad)

    @property
    def extra_parameters(self) -> int:
        return int(self.module.extra_parameters())


def _is_one(weight: float | Tensor) -> bool:
    """Whether a weight is the constant 1 (its weighted term is the raw one), without reading a tensor."""
    return not isinstance(weight, Tensor) and weight == 1


def _describe_side(distiller: Distiller, level: Level, side: str, written: Any) -> str:
    """One side of a level: each tap as written -> its module path (shape with B for the batch) layout."""
    resolved = getattr(level, side)
    specs = written if isinstance(written, list) else [written]
    taps = resolved if isinstance(resolved, list) else [resolved]
    names = distiller.tap_names(level.name, side)
    shown = []
    for name, spec, tap in zip(names, specs, taps):
        probed = distiller.probed[side].get(name)
        path = Tap.parse(tap).path or "<output>"
        alias = f"{spec} -> " if isinstance(spec, str) and spec.startswith("@") else ""
        shape = "(" + ",".join(["B", *map(str, probed.shape[1:])]) + ")" if probed is not None and len(probed.shape) else "()"
        shown.append(f"{alias}{path} {shape} {probed.layout if probed is not None else '?'}")
    return f"{side} {', '.join(shown)}"


LEARNERS: Mapping[str, Callable[..., Learner]] = MappingProxyType(  # (cfg, task, dataset_size=None)
    {"train": PlainLearner, "distill": DistillLearner}
)
