"""The typed shape of a run configuration: one dataclass per YAML section, with defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class DataConfig:
    """Which dataset, where it lives, and how it is batched (limit_* keep evenly spaced items)."""

    name: str = "fashion_mnist"
    root: str | None = None
    download: bool = False
    batch_size: int = 128
    eval_batch_size: int | None = None
    workers: int = 0
    augment: bool | None = None
    limit_train: int | None = None
    limit_test: int | None = None


@dataclass
class ModelConfig:
    """A model from the `diffkd.models` registry (num_classes defaults to the dataset's)."""

    name: str
    num_classes: int | None = None
    pretrained: bool = False


@dataclass
class TeacherConfig:
    """The frozen teacher: a registry model plus its trained weights (a run checkpoint or a state dict)."""

    name: str
    checkpoint: str | None = None
    sha256: str | None = None
    pretrained: bool = False
    num_classes: int | None = None


@dataclass
class LevelConfig:
    """One distilled pair of taps ("@feature"/"@logits" mean the model's default taps) and its method."""

    student: str
    teacher: str
    method: str
    weight: float = 1.0
    name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimizer (sgd, adamw, rmsprop) and its hyper-parameters; unused ones are ignored by the others."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_decay_norm_bias: bool = False
    eps: float = 1e-8
    alpha: float = 0.99
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, applied every iteration; times are in (fractional) epochs."""

    name: str = "constant"
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1
    step_size: float = 30.0
    every_epochs: float = 1.0
    warmup_epochs: float = 0.0
    min_lr: float = 0.0


@dataclass
class TrainConfig:
    """The loop: length, regularization, precision, seed, device and logging cadence."""

    epochs: int = 10
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    clip_grad_norm: float = 0.0
    amp: Literal["none", "bf16", "fp16"] = "none"
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    log_every: int = 50
    progress: bool = True


@dataclass
class OutputConfig:
    """Where the run directory goes, and whether to write TensorBoard events."""

    dir: str = "runs/default"
    tensorboard: bool = True


@dataclass
class Config:
    """A whole run: `model` for `diffkd train`; `teacher`, `student` and `levels` for `diffkd distill`."""

    task: str = "classification"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig | None = None
    teacher: TeacherConfig | None = None
    student: ModelConfig | None = None
    levels: list[LevelConfig] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# Value ranges checked after the types: dotted key -> (test, what the value must be).
RANGES: dict[str, tuple[Any, str]] = {
    "data.batch_size": (lambda v: v >= 1, "at least 1"),
    "data.eval_batch_size": (lambda v: v is None or v >= 1, "at least 1 (or null)"),
    "data.workers": (lambda v: v >= 0, "0 or more"),
    "data.limit_train": (lambda v: v is None or v >= 1, "at least 1 (or null for all)"),
    "data.limit_test": (lambda v: v is None or v >= 1, "at least 1 (or null for all)"),
    "optim.lr": (lambda v: v >= 0, "0 or more"),
    "optim.weight_decay": (lambda v: v >= 0, "0 or more"),
    "optim.betas": (lambda v: len(v) == 2, "a list of two numbers"),
    "schedule.every_epochs": (lambda v: v > 0, "more than 0"),
    "schedule.step_size": (lambda v: v > 0, "more than 0"),
    "schedule.warmup_epochs": (lambda v: v >= 0, "0 or more"),
    "train.epochs": (lambda v: v >= 1, "at least 1"),
    "train.label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.ema_decay": (lambda v: 0 <= v < 1, "in [0, 1) (0 turns EMA off)"),
    "train.clip_grad_norm": (lambda v: v >= 0, "0 or more (0 turns clipping off)"),
    "train.log_every": (lambda v: v >= 1, "at least 1"),
    "train.device": (lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"), "auto, cpu, cuda or cuda:N"),
}
