"""The typed shape of a run configuration: one dataclass per YAML section, with defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class DataConfig:
    """Which dataset, where it lives, how it is batched and augmented (limit_* keep evenly spaced items).

    batch_size is the global batch, split evenly over DDP processes. augment (default: on for the
    training split) is the dataset's crop + flip; image_size, randaugment, color_jitter and
    random_erasing apply to ImageNet and image_folder (your own images: root/train/<class>/*,
    root/val/<class>/*); mixup / cutmix (Beta alphas, 0 = off) mix training batches.
    """

    name: str = "fashion_mnist"
    root: str | None = None
    download: bool = False
    batch_size: int = 128
    eval_batch_size: int | None = None
    workers: int = 0
    augment: bool | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    image_size: int | None = None
    randaugment: bool = False
    color_jitter: float = 0.0
    random_erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0


@dataclass
class ModelConfig:
    """A model by name (num_classes defaults to the dataset's): a `diffkd.models` registry name,
    `timm:<name>`, `hf:<folder>` or an import path `package.module:callable`; options are keyword
    arguments for its builder (e.g. {img_size: 64} for timm, {in_chans: 1})."""

    name: str
    num_classes: int | None = None
    pretrained: bool = False
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherConfig:
    """The frozen teacher: a model named as in ModelConfig plus its trained weights (a run checkpoint or a state dict)."""

    name: str
    checkpoint: str | None = None
    sha256: str | None = None
    pretrained: bool = False
    num_classes: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class LevelConfig:
    """One distilled pair of taps and its method; a tap is "@feature"/"@logits" (the model's default
    taps), a module path such as "layer4", "backbone['0']" or 8 (an nn.Sequential's child: integers are
    kept as the path "8"), or a mapping of `diffkd.taps.Tap` fields. A side may be a list of taps for
    methods that take several (reviewkd, vid). `weight: auto` calibrates the level against the task loss
    (`ratio`, `window`, `calibrate`: see diffkd.distiller.Level)."""

    student: str | int | dict[str, Any] | list[str | int | dict[str, Any]]
    teacher: str | int | dict[str, Any] | list[str | int | dict[str, Any]]
    method: str
    weight: float | Literal["auto"] = 1.0
    name: str | None = None
    inputs: dict[str, str] | None = None  # extra input -> student module path, where not the method's own: see Level
    ratio: float | None = None  # weight auto: weighted terms / task loss (default 1 / number of auto levels)
    window: int | None = None  # weight auto: calibration steps (default 100, or the first epoch if shorter)
    calibrate: list[str] | None = None  # weight auto: the terms scaled (default: the method's, e.g. diffkd's kd)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.student, self.teacher = (_int_as_path(v) for v in (self.student, self.teacher))


def _int_as_path(spec: Any) -> Any:
    """An integer tap (YAML `student: 8`) as the module path it names ("8"), in a list too."""
    if isinstance(spec, list):
        return [_int_as_path(item) for item in spec]
    return str(spec) if isinstance(spec, int) and not isinstance(spec, bool) else spec


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
    methods_lr_scale: float = 1.0  # the distillation methods' modules learn at this multiple of lr


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
    power: float = 0.9


@dataclass
class TrainConfig:
    """The loop: length, regularization, precision, memory layout, seed, device and logging cadence.

    channels_last puts the trained module's 4-D weights and the 4-D input batches (training and
    evaluation) in torch.channels_last memory format (strides only; shapes are unchanged), which
    convolutions on GPUs often run faster in; other inputs (detection's image lists) are left alone.
    """

    epochs: int = 10
    label_smoothing: float = 0.0
    ema_decay: float = 0.0
    clip_grad_norm: float = 0.0
    amp: Literal["none", "bf16", "fp16"] = "none"
    compile: bool = False
    channels_last: bool = False
    seed: int = 0
    device: str = "auto"
    log_every: int = 50
    progress: bool = True


@dataclass
class MosaicsConfig:
    """Generated Fashion-MNIST detection mosaics (the fields of `diffkd.detection.mosaics.MosaicSpec`)."""

    canvas: int = 128
    train_images: int = 1000
    val_images: int = 250
    min_items: int = 1
    max_items: int = 4
    min_scale: float = 1.0
    max_scale: float = 2.5
    max_overlap: float = 0.3
    seed: int = 0


@dataclass
class DetectionConfig:
    """Settings the detection task reads: detector resize range, backbone start, mosaics, detector options."""

    min_size: int | None = None
    max_size: int | None = None
    imagenet_backbone: bool = False
    mosaics: MosaicsConfig = field(default_factory=MosaicsConfig)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class SegmentationConfig:
    """Settings the segmentation task reads: training crop (H, W), scale range, flip, width, aux loss weight.

    width_mult scales every network's channels (1 = the paper's); teacher_width_mult, when set, the
    teacher's instead (CPU-sized runs want a wider teacher than student).
    """

    crop_size: list[int] = field(default_factory=lambda: [512, 1024])
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    flip: bool = True
    width_mult: float = 1.0
    teacher_width_mult: float | None = None
    aux_weight: float = 0.4


@dataclass
class OutputConfig:
    """Where the run directory goes, and whether to write TensorBoard events."""

    dir: str = "runs/default"
    tensorboard: bool = True


CONFIG_FORMAT = 1  # the config layout this diffkd reads


@dataclass
class Config:
    """A whole run: `model` for `diffkd train`; `teacher`, `student` and `levels` for `diffkd distill`.

    `detection` and `segmentation` hold the settings of those task plug-ins (ignored by the others).
    """

    format: int = CONFIG_FORMAT  # the layout of this config; written into every saved config
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
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    segmentation: SegmentationConfig = field(default_factory=SegmentationConfig)


# Sections read by one task only (section -> task); YAML dumps leave them out for other tasks when unchanged.
TASK_SECTIONS = {"detection": "detection", "segmentation": "segmentation"}


# Value ranges checked after the types: dotted key -> (test, what the value must be).
RANGES: dict[str, tuple[Any, str]] = {
    "data.batch_size": (lambda v: v >= 1, "at least 1"),
    "data.eval_batch_size": (lambda v: v is None or v >= 1, "at least 1 (or null)"),
    "data.workers": (lambda v: v >= 0, "0 or more"),
    "data.limit_train": (lambda v: v is None or v >= 1, "at least 1 (or null for all)"),
    "data.limit_test": (lambda v: v is None or v >= 1, "at least 1 (or null for all)"),
    "data.image_size": (lambda v: v is None or v >= 1, "at least 1 (or null for the dataset's size)"),
    "data.color_jitter": (lambda v: v >= 0, "0 or more"),
    "data.random_erasing": (lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    "data.mixup": (lambda v: v >= 0, "0 (off) or a positive Beta alpha"),
    "data.cutmix": (lambda v: v >= 0, "0 (off) or a positive Beta alpha"),
    "optim.lr": (lambda v: v >= 0, "0 or more"),
    "optim.methods_lr_scale": (lambda v: v > 0, "more than 0"),
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
    "segmentation.crop_size": (lambda v: len(v) == 2 and min(v) >= 1, "two positive sizes [height, width]"),
    "segmentation.scale_range": (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "[low, high] with 0 < low <= high"),
    "segmentation.width_mult": (lambda v: v > 0, "more than 0"),
    "segmentation.teacher_width_mult": (lambda v: v is None or v > 0, "more than 0 (or null: width_mult)"),
    "segmentation.aux_weight": (lambda v: v >= 0, "0 or more (0 drops the aux head)"),
    "train.device": (lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"), "auto, cpu, cuda or cuda:N"),
}
