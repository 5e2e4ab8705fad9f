"""DiffKD and its baselines inside Ultralytics' own YOLO trainers: detect, segment, pose and obb.

One distillation module per neck level (the maps the YOLO head reads) adds its terms to the student's
loss. The student's maps come from its head's training output, the teacher's from running the frozen
teacher's layers up to those maps. The student gets no hook and no extra module: the distillation
modules and the teacher belong to the trainer, so the EMA, best.pt and last.pt are plain Ultralytics
checkpoints that `YOLO(path)` loads without diffkd. The distillation modules are a param group of
Ultralytics' optimizer (so their optimizer state is in last.pt's) and are saved beside last.pt in
`weights/kd_modules.pt` (settings, the teacher's weights digest, and the distillation step's state of the last two
saves, written before last.pt so that one of them is always of last.pt's epoch); `resume=True` restores both. The
loss is diffkd's one distillation step (`diffkd.step`) on the neck maps, at the batch's fractional epoch; every kd
weight is applied there (`kd_weight`: a number, or "auto" against Ultralytics' per-image task loss).

What a run is given is checked before Ultralytics creates its folder: the teacher and a student or resumed
checkpoint are read with Ultralytics' restricted unpickler (a file that would run code is refused unread), the
teacher's task, classes and layers, and the pairing of the maps. The run folder is locked while a run writes it.
"""
from __future__ import annotations

import ast
import difflib
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

try:
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.models.yolo.obb import OBBTrainer
    from ultralytics.models.yolo.pose import PoseTrainer
    from ultralytics.models.yolo.segment import SegmentationTrainer
except ModuleNotFoundError as exc:
    if not (exc.name or "").startswith("ultralytics"):
        raise
    raise ImportError("diffkd's YOLO integration needs Ultralytics, which is not installed: pip install diffkd[ultralytics]") from None
from ultralytics.cfg import get_cfg, get_save_dir
from ultralytics.nn.modules.head import Detect
from ultralytics.nn.tasks import (DetectionModel, OBBModel, PoseModel, SegmentationModel, guess_model_task,
                                  torch_safe_load, yaml_model_load)
from ultralytics.utils import DEFAULT_CFG, DEFAULT_CFG_DICT, LOGGER, RANK
from ultralytics.utils import callbacks as ultralytics_callbacks
from ultralytics.utils.torch_utils import unwrap_model

from .. import __version__
from ..atomic import save_atomic
from ..boxes import Boxes
from ..engine.errors import RunDirError
from ..engine.identity import weights_digest
from ..engine.runlock import RunLock
from ..methods import METHODS, Method, MethodOutput, build_method
from ..models.weights import read_state_file
from ..step import DistillationStep
from ..weighting import LossWeights, term_key, weight_spec

SUPPORTED_METHODS = ("diffkd", "mse", "cwd", "fgd", "mgd", "pkd")
# Each method's options on YOLO neck maps. diffkd: the paper's main detection setting (MSE on each neck map, the
# diffusion and kd terms at weight 1, no autoencoder; the level weight by the paper's rule, kd_weight=auto); its
# attention-weighted MSE is method_options={"distance": "attention_mse"}. fgd: the authors' one-stage (FCOS)
# weights; cwd, mgd, pkd: their defaults (mgd and pkd: the authors' FPN settings).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "diffkd": {},
    "mse": {},
    "cwd": {},
    "fgd": {"family": "fcos"},
    "mgd": {},
    "pkd": {},
}
NO_DEFAULT = (f"give method= (one of {', '.join(SUPPORTED_METHODS)}): diffkd yolo has no default method, since "
              "none was at least the student alone in both workflows of the YOLO benchmark (docs/benchmarks-yolo.md)")
KD_KEYS = ("teacher", "method", "kd_weight", "kd_latent", "kd_lr_scale", "teacher_layers", "student_layers",
           "method_options", "resize_maps", "allow_download")
STATE_FILE = "kd_modules.pt"  # beside last.pt; not named last*.pt, which Ultralytics' resume=True searches for
STATE_FORMAT = 2  # kd_modules.pt's layout: settings, teacher identity, the snapshots of the last two saves
SETTINGS_KEY = "diffkd_settings"  # the trainer.callbacks entry that carries the settings into Ultralytics' DDP workers
TEACHER_SEED = 0  # a teacher built from a model .yaml gets these random weights, so a resumed run rebuilds the same
MODELS_BY_TASK = {"detect": DetectionModel, "segment": SegmentationModel, "pose": PoseModel, "obb": OBBModel}
SHORT_TERMS = {"diffusion": "diff", "attention": "att", "global": "glob"}  # progress-bar columns are 11 wide


@dataclass(frozen=True)
class KDSettings:
    """What to distil: the teacher (YOLO checkpoint or model .yaml), the method, its level weight and options."""

    teacher: str
    method: str  # no default: none measured at least the student alone in both benchmark workflows (NO_DEFAULT)
    kd_weight: float | str = "auto"  # every level's weight: "auto" (the kd terms together on the task loss's scale,
    # the paper's rule; diffkd.weighting) or a number
    kd_latent: int | None = None  # diffkd only: an autoencoder with this many latent channels (at most the teacher's)
    teacher_layers: tuple[int, ...] | None = None  # default: the inputs of the teacher's head
    student_layers: tuple[int, ...] | None = None  # default: the inputs of the student's head (only those can be read)
    method_options: dict[str, Any] = field(default_factory=dict)
    resize_maps: bool = False  # pair maps of different strides, the student's resized to the teacher's (else refused)
    kd_lr_scale: float = 10.0  # the kd modules learn at this multiple of the student's learning rate (lr0); 10:
    # chosen on the YOLO benchmark's tuning setting by its written rule (DiffKD's denoiser learns; docs/benchmarks-yolo)

    def __post_init__(self) -> None:
        if self.method not in SUPPORTED_METHODS:
            raise ValueError(unsupported_method(self.method))
        try:
            weight_spec(self.kd_weight)
        except ValueError:
            raise ValueError(f"kd_weight must be a number >= 0 or 'auto', got {self.kd_weight!r}") from None
        if isinstance(self.kd_lr_scale, bool) or not isinstance(self.kd_lr_scale, (int, float)) or not (
                math.isfinite(self.kd_lr_scale) and self.kd_lr_scale > 0):
            raise ValueError(f"kd_lr_scale must be a number > 0 (the kd modules' learning rate over the student's), "
                             f"got {self.kd_lr_scale!r}")
        if self.kd_latent is not None:
            if self.method != "diffkd":
                raise ValueError(f"kd_latent sizes DiffKD's autoencoder; method {self.method!r} has none")
            if isinstance(self.kd_latent, bool) or not isinstance(self.kd_latent, int) or self.kd_latent < 1:
                raise ValueError(f"kd_latent must be a positive number of channels, got {self.kd_latent!r}")
        for name in ("teacher_layers", "student_layers"):
            layers = getattr(self, name)
            if layers is not None:
                if isinstance(layers, int):
                    layers = (layers,)
                if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                    raise ValueError(f"{name} must list layer indices (integers >= 0), got {layers!r}")
                object.__setattr__(self, name, tuple(layers))


def unsupported_method(name: str) -> str:
    """Why method `name` cannot distil YOLO neck maps (an unknown name gets the closest of those that can)."""
    takes = f"YOLO distillation takes one of {', '.join(SUPPORTED_METHODS)}"
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), SUPPORTED_METHODS, n=1)
        return f"unknown method {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; {takes}"
    cls = METHODS[name]
    if cls.needs_indices:
        why = "needs each image's index in the training set (a memory bank), which Ultralytics' batches do not carry"
    elif cls.takes_tap_lists:
        why = "pairs lists of taps (a backbone's stages), not one neck map with one neck map"
    else:
        why = "compares class scores or pooled vectors, which YOLO's per-anchor outputs are not"
    return f"method {name!r} {why}; {takes}"


# ----------------------------------------------------------------------------------------------- models and maps
def head_of(model: nn.Module, role: str) -> Detect:
    """The model's Detect-family head (Detect, Segment, Pose, OBB and their 26 forms): its `f` lists the neck layers."""
    head = model.model[-1]
    if not isinstance(head, Detect):
        raise ValueError(f"the {role} ends in {type(head).__name__}, not a Detect-family head; YOLO distillation needs "
                         "a detect, segment, pose or obb model")
    return head


def layer_outputs(model: nn.Module, images: Tensor, layers: set[int]) -> dict[int, Tensor]:
    """The outputs of the YOLO model's layers numbered `layers`, running its layers in order up to the last one asked."""
    outputs: list[Any] = []
    found: dict[int, Tensor] = {}
    x: Any = images
    for m in model.model:
        if m.f != -1:  # the layer reads earlier layers' outputs, not the previous one's
            x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
        x = m(x)
        outputs.append(x)
        if m.i in layers:
            found[m.i] = x
            if len(found) == len(layers):
                break
    return found


def head_inputs(preds: Any) -> list[Tensor]:
    """The neck maps a Detect-family head read, from its training output (end-to-end heads: the one-to-many branch's,
    the one-to-one branch reads them detached)."""
    branch = preds.get("one2many", preds) if isinstance(preds, dict) else None
    if not isinstance(branch, dict) or "feats" not in branch:
        raise ValueError("the student's head returned no 'feats' in training mode; this head does not keep the "
                         "Detect contract the YOLO integration reads the neck maps from")
    return branch["feats"]


def read_yolo_checkpoint(source: str | Path, role: str) -> dict:
    """A YOLO checkpoint's dict, read by Ultralytics' restricted unpickler (weights_only, with an allow-list of its
    model classes): a file holding anything else, such as a function that would run code, is refused unloaded."""
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"{role} {source} is not a file; give a YOLO checkpoint (.pt) or a model .yaml")
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        raise ValueError(f"reading {role} {source} safely needs torch >= 2.6 (Ultralytics' restricted loading); "
                         f"found torch {torch.__version__}")
    try:
        checkpoint, _ = torch_safe_load(path, safe_only=True)
    except Exception as exc:  # Ultralytics wraps torch's errors; the unpickler's names what it refused
        cause = exc.__cause__ or exc
        refused = re.search(r"GLOBAL ([\w.]+)", str(cause))
        if refused:
            raise ValueError(f"{role} {source} is refused for safety: it holds {refused.group(1)}, which is not one of "
                             "Ultralytics' model classes, and loading it could run code; give a checkpoint written by "
                             "Ultralytics") from None
        reason = next((line.strip() for line in str(cause).splitlines() if line.strip()), type(cause).__name__)
        raise ValueError(f"{role} {source} is not an Ultralytics YOLO checkpoint ({reason[:160]}); give a best.pt or "
                         "last.pt written by Ultralytics, or a model .yaml") from None
    model = (checkpoint.get("ema") or checkpoint.get("model")) if isinstance(checkpoint, dict) else None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{role} {source} is not an Ultralytics YOLO checkpoint (no model in it); give a best.pt or "
                         "last.pt written by Ultralytics, or a model .yaml")
    return checkpoint


def checkpoint_model(checkpoint: dict) -> nn.Module:
    """The float32 model of a checkpoint read by `read_yolo_checkpoint`, its task attached."""
    model = (checkpoint.get("ema") or checkpoint["model"]).float()
    model.task = getattr(model, "task", None) or guess_model_task(model)
    return model


def build_model(task: str, cfg: str | dict, data: dict) -> nn.Module:
    """A model of `task` from a model .yaml (random weights) for the data's classes, as Ultralytics' trainers build it."""
    extra = {"data_kpt_shape": tuple(data["kpt_shape"])} if task == "pose" else {}
    return MODELS_BY_TASK[task](cfg, nc=data["nc"], ch=data.get("channels", 3), verbose=False, **extra)


def load_teacher(source: str, task: str, data: dict) -> nn.Module:
    """The frozen teacher in eval mode, BatchNorm fused: a YOLO checkpoint of the student's task and class count, or a
    model .yaml (random weights drawn from a fixed seed, so that a resumed run rebuilds the same; for tests)."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        found = guess_model_task(model_yaml(source, "teacher"))
        if found != task:
            raise ValueError(f"teacher {source} is a {found} model but the student is a {task} model; distil within a task")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TEACHER_SEED)
            teacher = build_model(task, str(path), data)
    else:
        teacher = checkpoint_model(read_yolo_checkpoint(source, "teacher"))
        if teacher.task != task:
            raise ValueError(f"teacher {source} is a {teacher.task} model but the student is a {task} model; distil "
                             "within a task")
    head = head_of(teacher, "teacher")
    if head.nc != data["nc"]:
        raise ValueError(f"teacher {source} predicts {head.nc} classes but the data has {data['nc']}; use a teacher "
                         "trained on these classes")
    if task == "pose" and tuple(getattr(head, "kpt_shape", ())) != tuple(data.get("kpt_shape", ())):
        raise ValueError(f"teacher {source} predicts keypoints {tuple(head.kpt_shape)} but the data has "
                         f"{tuple(data.get('kpt_shape', ()))}; use a teacher trained on this keypoint layout")
    teacher = teacher.float().fuse(verbose=False).eval()
    return teacher.requires_grad_(False)


def random_teacher(settings: KDSettings) -> bool:
    """Whether the teacher is a model .yaml, so the distillation is from random weights."""
    return Path(settings.teacher).suffix in (".yaml", ".yml")


class Projected(Method):
    """A 1x1 conv from the student's width to the teacher's, then `method` (CWD compares maps of equal widths); it
    declares what `method` declares."""

    def __init__(self, student_channels: int, teacher_channels: int, method: Method):
        super().__init__()
        self.projector = nn.Conv2d(student_channels, teacher_channels, 1)
        self.method = method
        self.calibrated_terms, self.term_weights, self.schedules = (method.calibrated_terms, method.term_weights,
                                                                    method.schedules)
        self.extra_inputs = method.extra_inputs

    def forward(self, student: Tensor, teacher: Tensor, targets: Any = None) -> MethodOutput:
        return self.method(self.projector(student), teacher, targets)


@dataclass(frozen=True)
class NeckLevel:
    """One distilled pair: the column prefix, the student map's position among its head's inputs, the teacher layer."""

    name: str
    student_position: int
    teacher_layer: int


def probe_maps(student: nn.Module, teacher: nn.Module, student_layers: list[int], teacher_layers: list[int],
               imgsz: int, channels: int) -> tuple[dict[int, Tensor], dict[int, Tensor]]:
    """The chosen layers' outputs on a probe batch (both models in eval mode); a teacher layer that is not a neck map
    (the head, or past the last layer) is refused naming the neck layers."""
    if max(teacher_layers) >= len(teacher.model):
        raise ValueError(f"teacher_layers {teacher_layers}: the teacher has layers 0..{len(teacher.model) - 1}")
    device = next(student.parameters()).device
    probe = torch.zeros(2, channels, imgsz, imgsz, device=device)
    was_training = student.training
    with torch.no_grad():
        student_maps = layer_outputs(student.eval(), probe, set(student_layers))
        teacher_maps = layer_outputs(teacher, probe, set(teacher_layers))
    student.train(was_training)
    neck = list(head_of(teacher, "teacher").f)
    for layer in teacher_layers:
        found = teacher_maps[layer]
        if not (isinstance(found, Tensor) and found.dim() == 4):
            raise ValueError(f"teacher layer {layer} ({type(teacher.model[layer]).__name__}) gives no feature map "
                             f"(B,C,H,W); pick neck layers, such as the inputs of the teacher's head {neck}")
    return student_maps, teacher_maps


def build_levels(student: nn.Module, teacher: nn.Module, settings: KDSettings, imgsz: int,
                 channels: int) -> tuple[DistillationStep, list[NeckLevel]]:
    """The distillation step of the neck levels: one method per level, sized from the maps of a probe forward (both
    models in eval mode), and the weights of every level (kd_weight: a number, or auto)."""
    student_inputs = list(head_of(student, "student").f)
    chosen = list(settings.student_layers or student_inputs)
    outside = [i for i in chosen if i not in student_inputs]
    if outside:
        raise ValueError(f"student layers {outside} are not inputs of the student's head {student_inputs}: the student's "
                         "maps are read from its head's inputs (no hooks on the student), so pick among those")
    teacher_layers = list(settings.teacher_layers or head_of(teacher, "teacher").f)
    if len(teacher_layers) != len(chosen):
        raise ValueError(f"{len(chosen)} student maps (layers {chosen}) but {len(teacher_layers)} teacher maps "
                         f"(layers {teacher_layers}); pair them one to one with student_layers= and teacher_layers=")
    student_maps, teacher_maps = probe_maps(student, teacher, chosen, teacher_layers, imgsz, channels)
    modules, levels = nn.ModuleDict(), []
    for student_layer, teacher_layer in zip(chosen, teacher_layers):
        s, t = student_maps[student_layer].shape, teacher_maps[teacher_layer].shape
        name = f"p{round(math.log2(imgsz / s[-1]))}"
        name = name if name not in modules else f"{name}l{student_layer}"
        if s[-2:] != t[-2:] and not settings.resize_maps:
            raise ValueError(f"level {name}: student layer {student_layer} is a {s[-2]}x{s[-1]} map (stride "
                             f"{imgsz // s[-1]}) but teacher layer {teacher_layer} is {t[-2]}x{t[-1]} (stride "
                             f"{imgsz // t[-1]}); pair maps of the same stride with teacher_layers= and student_layers=, "
                             "or pass resize_maps=True to resize the student's map to the teacher's")
        options = {**METHOD_DEFAULTS[settings.method], **settings.method_options}
        if settings.kd_latent is not None:
            options["latent_channels"] = min(settings.kd_latent, t[1])
        try:
            if settings.method == "cwd" and s[1] != t[1]:
                module = Projected(s[1], t[1], build_method("cwd", t, t, **options))
            else:
                module = build_method(settings.method, s, t, **options)
        except ValueError as exc:
            raise ValueError(f"level {name} (student layer {student_layer} {tuple(s)}, teacher layer {teacher_layer} "
                             f"{tuple(t)}): {exc}") from None
        modules[name] = module
        levels.append(NeckLevel(name, student_inputs.index(student_layer), teacher_layer))
    spec = weight_spec(settings.kd_weight)
    step = DistillationStep(modules, LossWeights({lv.name: spec for lv in levels}, dict(modules.items())))
    return step.to(next(student.parameters()).device).train(), levels


def batch_boxes(batch: dict, oriented: bool) -> Boxes:
    """The batch's boxes (x1, y1, x2, y2) in pixels of its images, the neutral form FGD reads; oriented boxes (cx, cy,
    w, h, angle) become the axis-aligned boxes around them."""
    images = batch["img"]
    height, width = images.shape[-2:]
    boxes = batch["bboxes"].float()
    scale = boxes.new_tensor([width, height, width, height])
    cx, cy, w, h = (boxes[:, :4] * scale).unbind(1)
    if oriented:
        cos, sin = boxes[:, 4].cos().abs(), boxes[:, 4].sin().abs()
        w, h = w * cos + h * sin, w * sin + h * cos
    corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    index = batch["batch_idx"].long().view(-1)
    return Boxes([corners[index == i] for i in range(images.shape[0])], (height, width))


class DistillationCriterion:
    """The student's own criterion plus every neck level's kd terms, each logged as its own loss item.

    Not an nn.Module, so setting it as the student's `criterion` registers nothing in the student; a deep copy of the
    student (Ultralytics' EMA) gets None in its place and builds its own plain criterion.
    """

    def __init__(self, base: Any, teacher: nn.Module, step: DistillationStep, levels: list[NeckLevel], oriented: bool,
                 progress: Callable[[], tuple[float, int]], columns: set[str]):
        self.base, self.teacher, self.step, self.levels = base, teacher, step, levels
        self.oriented, self.progress, self.columns = oriented, progress, columns
        # The one extra input a method here may declare (FGD's): the batch's boxes, in the frame of its images.
        self.needs_boxes = {name for name, m in step.methods.items() if "boxes" in m.extra_inputs}

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __getattr__(self, name: str) -> Any:  # the base criterion's own attributes (update(), updates, ...)
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def update(self) -> None:
        """Called by Ultralytics at every epoch's end: fix auto weights whose window outlasted the first epoch."""
        self.step.end_epoch()
        if hasattr(self.base, "update"):
            self.base.update()

    def __call__(self, preds: Any, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        loss, items = self.base(preds, batch)
        student_maps = head_inputs(preds)
        with torch.no_grad():
            teacher_maps = layer_outputs(self.teacher, batch["img"], {lv.teacher_layer for lv in self.levels})
        boxes = batch_boxes(batch, self.oriented) if self.needs_boxes else None
        images = batch["img"].shape[0]
        # Ultralytics' loss vector holds batch sums (mean x batch size): the task loss auto weights compare with is
        # its per-image sum, and the weighted kd sum joins the vector scaled the same way.
        out = self.step.compute({lv.name: student_maps[lv.student_position] for lv in self.levels},
                                {lv.name: teacher_maps[lv.teacher_layer] for lv in self.levels},
                                extra={name: {"boxes": boxes} for name in self.needs_boxes},
                                task_loss=loss.detach().sum() / images, progress=self.progress())
        for name, terms in out.terms.items():
            for term in terms:
                column = f"{name}_{SHORT_TERMS.get(term, term)}"
                self.columns.add(column)
                items[column] = out.losses[term_key(name, term, terms)].detach()
        for name, factor in self.step.auto_weights().items():  # auto weights: 0 until calibrated
            self.columns.add(f"{name}_w")
            items[f"{name}_w"] = loss.new_tensor(factor)
        return torch.cat([loss.reshape(-1), (out.loss.float() * images).reshape(1).to(loss.dtype)]), items


def average_gradients(parameters: list[nn.Parameter], world_size: int) -> None:
    """Average the gradients over DDP ranks as DDP averages the student's (a parameter without one counts as zero)."""
    import torch.distributed as dist

    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world_size)


# ----------------------------------------------------------------------------------------------- the trainers
@dataclass
class Preflight:
    """What `distill` checked before the trainer was made: the settings, and the loaded teacher with its digest (the
    teacher stays behind when Ultralytics' DDP launcher pickles the callbacks: its workers load and check their own)."""

    settings: KDSettings
    teacher: nn.Module | None = None
    digest: str | None = None

    def __getstate__(self) -> dict:
        return {"settings": self.settings, "teacher": None, "digest": self.digest}


class DistillationTrainerMixin:
    """Mixed in before an Ultralytics task trainer: builds the teacher and the kd modules, adds them to the optimizer,
    the loss, gradient clipping, DDP averaging, last.pt's companion file and resume."""

    def __init__(self, cfg: Any = DEFAULT_CFG, overrides: dict | None = None, _callbacks: dict | None = None):
        super().__init__(cfg, overrides, _callbacks)
        preflight = (self.callbacks.get(SETTINGS_KEY) or [None])[0]
        if not isinstance(preflight, Preflight):
            raise ValueError("no distillation settings: start the run with diffkd.integrations.ultralytics.distill() or "
                             "`diffkd yolo`, which give the teacher and method")
        self.kd_preflight: Preflight = preflight
        self.kd_settings: KDSettings = preflight.settings
        self.kd_teacher: nn.Module | None = None
        self.kd_step: DistillationStep | None = None
        self.kd_levels: list[NeckLevel] = []
        self.kd_columns: set[str] = set()
        self.kd_snapshots: list[dict] = []  # the last saves' kd state, newest first (kd_modules.pt holds two)

    # ---------------------------------------------------------------- the kd state beside last.pt
    @property
    def kd_state_path(self) -> Path:
        return Path(self.args.resume if self.resume else self.last).parent / STATE_FILE

    def save_model(self) -> bool:
        """kd_modules.pt first, then Ultralytics' last.pt (and best.pt): kd_modules.pt holds this save's kd state and
        the one before, so whichever write a stop interrupts, one of them is of last.pt's epoch."""
        snapshot = {"epoch": self.epoch, "step": clone_state(self.kd_step)}
        self.kd_snapshots = [snapshot, *self.kd_snapshots[:1]]
        state = {"format": STATE_FORMAT, "diffkd_version": __version__, "settings": asdict(self.kd_settings),
                 "teacher": {"path": self.kd_settings.teacher, "weights_sha256": self.kd_preflight.digest,
                             "random_weights": random_teacher(self.kd_settings)},
                 "snapshots": self.kd_snapshots}
        save_atomic(state, self.wdir / STATE_FILE)
        return super().save_model()

    def restore_kd_state(self, epoch: int, path: Path) -> None:
        """Load the distillation step saved with last.pt's `epoch` (0-based) from kd_modules.pt at `path`."""
        state = read_kd_state(path)
        match = next((snap for snap in state["snapshots"] if snap["epoch"] == epoch), None)
        if match is None:
            held = " and ".join(str(snap["epoch"] + 1) for snap in state["snapshots"])
            raise ValueError(f"{path} holds the kd modules of epoch {held} but last.pt is from epoch {epoch + 1}: they are "
                             "not one run's pair; resume from the last.pt that was saved with it, or start a new run")
        self.kd_step.load_state_dict(match["step"])
        self.kd_snapshots = [match]

    def resume_training(self, ckpt: dict | None) -> None:
        if ckpt is not None and self.resume:
            self.restore_kd_state(ckpt.get("epoch", -1), self.kd_state_path)
        super().resume_training(ckpt)

    def _handle_nan_recovery(self, epoch: int) -> bool:
        """Ultralytics reloads the student (and the optimizer) from last.pt after a NaN epoch; the kd modules too."""
        recovered = super()._handle_nan_recovery(epoch)
        if recovered:  # in this process the newest save wrote both files: its snapshot is last.pt's
            self.kd_step.load_state_dict(self.kd_snapshots[0]["step"])
        return recovered

    # ---------------------------------------------------------------- building, optimizing, the loss
    def build_optimizer(self, model: nn.Module, name: str = "auto", lr: float = 0.001, momentum: float = 0.9,
                        decay: float = 1e-5, iterations: float = 1e5) -> torch.optim.Optimizer:
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        if self.kd_step is None:
            student = unwrap_model(model)
            self.kd_teacher = self.kd_preflight.teacher or checked_teacher(self.kd_settings, self.args.task, self.data,
                                                                           self.kd_preflight.digest)
            self.kd_teacher.to(self.device)
            self.kd_step, self.kd_levels = build_levels(
                student, self.kd_teacher, self.kd_settings, self.args.imgsz, self.data["channels"])
        template = next(g for g in optimizer.param_groups if g.get("param_group") in ("weight", "muon"))
        hyper = {k: v for k, v in template.items() if k not in ("params", "param_group")}
        hyper["lr"] = self.kd_settings.kd_lr_scale * self.args.lr0  # of the chosen rate (MuSGD raises some groups')
        if "use_muon" in hyper:
            hyper["use_muon"] = False
        optimizer.add_param_group({**hyper, "params": list(self.kd_step.parameters()), "param_group": "kd"})
        return optimizer

    def _setup_train(self) -> None:
        super()._setup_train()
        student = unwrap_model(self.model)
        base = getattr(student, "criterion", None) or student.init_criterion()
        student.criterion = DistillationCriterion(
            base, self.kd_teacher, self.kd_step, self.kd_levels, self.args.task == "obb", self.kd_progress,
            self.kd_columns)
        self.kd_batch = 0
        self.add_callback("on_train_epoch_start", DistillationTrainerMixin._start_epoch)
        self.add_callback("on_train_batch_start", DistillationTrainerMixin._start_batch)

    def _start_epoch(self) -> None:
        self.kd_batch = -1

    def _start_batch(self) -> None:
        self.kd_batch += 1

    def kd_progress(self) -> tuple[float, int]:
        """(fractional epoch, epochs) of the batch being trained: epoch e + i / (batches per epoch) before batch i, so
        per-step schedules (a kd warm-up) move within an epoch as they do in diffkd's engine."""
        return self.epoch + max(self.kd_batch, 0) / max(len(self.train_loader), 1), self.epochs

    def _do_train(self) -> None:
        try:
            super()._do_train()
        finally:  # the student leaves as it came: its own criterion, nothing of the teacher
            student = unwrap_model(self.model)
            if isinstance(getattr(student, "criterion", None), DistillationCriterion):
                student.criterion = student.criterion.base

    def optimizer_step(self) -> None:
        """Ultralytics' step with the kd modules: DDP-averaged, clipped at the same norm (10) but on their own, so a
        diffusion model's gradients never shrink the student's step, stepped by the same optimizer and scaler."""
        self.scaler.unscale_(self.optimizer)
        kd_parameters = list(self.kd_step.parameters())
        if self.world_size > 1:
            average_gradients(kd_parameters, self.world_size)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
        torch.nn.utils.clip_grad_norm_(kd_parameters, max_norm=10.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad()
        if self.ema:
            self.ema.update(self.model)

    def label_loss_items(self, loss_items: Any = None, prefix: str = "train") -> Any:
        """Ultralytics' loss columns; the kd terms only as train columns (validation runs the EMA without a teacher)."""
        labelled = super().label_loss_items(loss_items, prefix)
        if prefix != "val":
            return labelled
        kept = [k for k in labelled if k.split("/", 1)[-1] not in self.kd_columns]
        return kept if isinstance(labelled, list) else {k: labelled[k] for k in kept}


def distillation_trainer(base: type) -> type:
    """`base` (an Ultralytics task trainer) with the distillation mixed in, named in this module so that Ultralytics'
    DDP launcher, which pickles the trainer class, finds it by its import path."""
    name = f"Distillation{base.__name__}"
    return type(name, (DistillationTrainerMixin, base), {"__module__": __name__, "__qualname__": name,
                                                         "__doc__": f"{base.__name__} that distils its student."})


DistillationDetectionTrainer = distillation_trainer(DetectionTrainer)
DistillationSegmentationTrainer = distillation_trainer(SegmentationTrainer)
DistillationPoseTrainer = distillation_trainer(PoseTrainer)
DistillationOBBTrainer = distillation_trainer(OBBTrainer)
TRAINERS: dict[str, type] = {"detect": DistillationDetectionTrainer, "segment": DistillationSegmentationTrainer,
                             "pose": DistillationPoseTrainer, "obb": DistillationOBBTrainer}


# ----------------------------------------------------------------------------------------------- entry points
def check_data(data: Any) -> None:
    """Refuse data that Ultralytics would download: a name it resolves to a bundled dataset, a URL, or a yaml with a
    `download:` key (run when the images are missing)."""
    text = str(data)
    if text.startswith(("http://", "https://", "ul://")):
        raise ValueError(f"data {text} is a URL, which Ultralytics would download; download it yourself and give its "
                         "yaml, or pass allow_download=true")
    path = Path(text)
    if path.suffix not in (".yaml", ".yml"):
        return
    if not path.is_file():
        raise ValueError(f"data {text} is not a file here: Ultralytics would take it for a bundled dataset and download "
                         "its images; give the path of a data yaml whose images are on disk, or pass allow_download=true")
    if "download" in (yaml.safe_load(path.read_text()) or {}):
        raise ValueError(f"data {text} has a `download:` key, which Ultralytics runs when its images are missing; "
                         "remove the key if the images are on disk, or pass allow_download=true")


def model_yaml(source: str, role: str) -> dict:
    """A model .yaml's content: a file, or a name Ultralytics finds among its cfg/models (yolo11n.yaml: yolo11.yaml, n)."""
    try:
        return yaml_model_load(source)
    except Exception as exc:  # Ultralytics raises several kinds for a name it cannot find
        raise ValueError(f"{role} {source}: no such model yaml ({type(exc).__name__}); give a file or one of "
                         "Ultralytics' model names such as yolo11n.yaml") from None


def model_task(source: str) -> str:
    """The task of a YOLO model file (.yaml, or a checkpoint read safely), among those the integration distils."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        task = guess_model_task(model_yaml(source, "student"))
    elif not path.is_file():
        raise ValueError(f"student {source} is not a file; give a model .yaml (e.g. yolo11n.yaml) or a local checkpoint "
                         "(a name like yolo11n.pt would be downloaded)")
    else:
        task = checkpoint_model(read_yolo_checkpoint(path, "student")).task
    if task not in TRAINERS:
        raise ValueError(f"student {source} is a {task} model; YOLO distillation covers {', '.join(TRAINERS)}")
    return task


def clone_state(module: nn.Module) -> dict[str, Tensor]:
    """A module's state_dict copied to the CPU (a snapshot that later steps do not change)."""
    return {k: v.detach().cpu().clone() if isinstance(v, Tensor) else v for k, v in module.state_dict().items()}


def read_kd_state(path: Path) -> dict:
    """kd_modules.pt, read with diffkd's safe reader: one line for a missing, damaged or other-version file."""
    return read_state_file(path, STATE_FORMAT, "resuming a distillation run needs the kd modules saved beside "
                                               "last.pt (was this run started by diffkd?)")


def checked_teacher(settings: KDSettings, task: str, data: dict, digest: str | None) -> nn.Module:
    """The teacher of `settings`, refused when its weights' digest is not `digest` (the one a run recorded)."""
    teacher = load_teacher(settings.teacher, task, data)
    found = weights_digest(teacher)
    if digest is not None and found != digest:
        raise ValueError(f"teacher {settings.teacher} has changed since the run started: its weights' digest was "
                         f"{digest[:12]}, it is now {found[:12]}; resume with the teacher the run was trained with, or "
                         "start a new run")
    return teacher


def dataset_info(data: str, task: str, single_class: bool) -> dict:
    """Ultralytics' reading of a data yaml (classes, channels, keypoints), its error in one line."""
    from ultralytics.data.utils import check_det_dataset

    try:
        info = check_det_dataset(data)
    except Exception as exc:  # Ultralytics' messages span several lines
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(f"data {data}: {reason}") from None
    return {**info, "nc": 1} if single_class else info


def model_info(model: nn.Module) -> dict:
    """What the teacher is checked against, read off a (resumed) student: classes, channels, keypoints."""
    head = head_of(model, "student")
    info = {"nc": head.nc, "channels": (getattr(model, "yaml", None) or {}).get("channels", 3)}
    return {**info, "kpt_shape": list(head.kpt_shape)} if hasattr(head, "kpt_shape") else info


def resumed_settings(saved: KDSettings, given: dict[str, Any]) -> None:
    """Refuse kd options given on resume that differ from the run's own, naming each."""
    differing = []
    for key, value in given.items():
        theirs = getattr(saved, key)
        mine = getattr(replace(saved, **{key: value}), key) if key != "teacher" else str(value)
        if mine != theirs:
            differing.append(f"{key} is {theirs!r} there, {value!r} given")
    if differing:
        raise ValueError(f"resume continues the run's own distillation ({'; '.join(differing)}): drop those options, or "
                         "start a new run to change them")


def preflight_resume(last: Path, given: dict[str, Any]) -> tuple[str, Preflight, Path]:
    """Check a run to resume before Ultralytics reads it: (task, what the trainer gets, the run folder)."""
    checkpoint = read_yolo_checkpoint(last, "resumed checkpoint")
    state = read_kd_state(last.parent / STATE_FILE)
    settings = KDSettings(**state["settings"])
    resumed_settings(settings, given)
    if checkpoint.get("epoch", -1) < 0:  # Ultralytics marks a finished run's last.pt so
        raise ValueError(f"the run of {last} is finished (all its epochs are trained): there is nothing to resume; "
                         "start a new run, e.g. from its best.pt, to train further")
    student = checkpoint_model(checkpoint)
    if student.task not in TRAINERS:
        raise ValueError(f"resumed checkpoint {last} is a {student.task} model; YOLO distillation covers {', '.join(TRAINERS)}")
    teacher = checked_teacher(settings, student.task, model_info(student), state["teacher"]["weights_sha256"])
    save_dir = Path(checkpoint.get("train_args", {}).get("save_dir") or last.resolve().parent.parent)  # as Ultralytics
    return student.task, Preflight(settings, teacher, state["teacher"]["weights_sha256"]), save_dir


def preflight_new(student: str, teacher: str | None, data: str | None, given: dict[str, Any], allow_download: bool,
                  train_args: dict[str, Any]) -> tuple[str, Preflight, Path]:
    """Check a new run before Ultralytics creates its folder (its data, files, teacher and maps): (task, what the
    trainer gets, the run folder Ultralytics will make)."""
    from ultralytics.utils.checks import check_imgsz

    if teacher is None:
        raise ValueError("give teacher= (a YOLO checkpoint of the same task and classes, or a model .yaml)")
    if data is None:
        raise ValueError("give data= (an Ultralytics data yaml)")
    if "method" not in given:
        raise ValueError(NO_DEFAULT)
    if not allow_download:
        check_data(data)
    settings = KDSettings(str(teacher), **{k: dict(v) if k == "method_options" else v for k, v in given.items()})
    data = str(data)
    task = model_task(student)
    pretrained = train_args.get("pretrained")
    if isinstance(pretrained, (str, Path)) and str(pretrained).endswith(".pt"):
        read_yolo_checkpoint(pretrained, "pretrained")
    info = dataset_info(data, task, bool(train_args.get("single_cls")))
    teacher = load_teacher(settings.teacher, task, info)
    if Path(student).suffix in (".yaml", ".yml"):
        student_model = build_model(task, student, info)
    else:
        student_model = checkpoint_model(read_yolo_checkpoint(student, "student"))
    args = get_cfg(DEFAULT_CFG, {"model": student, "data": data, **train_args, "task": task, "mode": "train"})
    imgsz = check_imgsz(args.imgsz, stride=32, floor=32, max_dim=1)
    build_levels(student_model, teacher, settings, imgsz, info.get("channels", 3))  # refuses a bad pairing now
    if random_teacher(settings):
        LOGGER.warning(f"diffkd: teacher {settings.teacher} is a model .yaml: the student is distilled from random "
                       "weights, not from a trained teacher")
    return task, Preflight(settings, teacher, weights_digest(teacher)), get_save_dir(args)


def check_train_args(train_args: dict[str, Any]) -> None:
    """Refuse an argument that is neither diffkd's nor Ultralytics', with the closest valid one."""
    unknown = sorted(set(train_args) - set(DEFAULT_CFG_DICT))
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*KD_KEYS, *DEFAULT_CFG_DICT], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown argument {unknown[0]!r}{hint}; give diffkd's ({', '.join(KD_KEYS)}) or "
                         "Ultralytics' train arguments")


def train_locked(task: str, save_dir: Path, overrides: dict[str, Any], events: dict[str, list]) -> Any:
    """Make and run the distillation trainer while holding the lock of its run folder."""
    lock = RunLock(save_dir)
    try:
        lock.acquire()
    except RunDirError as exc:
        raise ValueError(str(exc).replace("output.dir", "name= (or project=)")) from None
    try:
        trainer = TRAINERS[task](overrides=overrides, _callbacks=events)
        trainer.train()
    finally:
        lock.release()
    return trainer


def distill(student: str | None = None, teacher: str | None = None, *, data: str | None = None,
            method: str | None = None, kd_weight: float | str | None = None, kd_latent: int | None = None,
            teacher_layers: tuple[int, ...] | None = None, student_layers: tuple[int, ...] | None = None,
            method_options: dict[str, Any] | None = None, resize_maps: bool | None = None,
            kd_lr_scale: float | None = None, allow_download: bool = False,
            callbacks: dict[str, list[Callable]] | None = None, **train_args: Any) -> Any:
    """Train YOLO `student` (a model .yaml or checkpoint) on `data`, distilled from `teacher`; every other keyword is
    an Ultralytics train argument (epochs, imgsz, batch, device, ...). Returns the finished Ultralytics trainer.

    `resume=path/to/last.pt` (or `resume=True` with `student=` that last.pt) continues a run with its own teacher and
    kd settings (kd options that differ from them are refused). `callbacks` adds Ultralytics callbacks
    ({event: [function(trainer)]}). Every file is checked, and the teacher and maps too, before the run folder is
    made; the folder is locked while the run writes it.
    """
    check_train_args(train_args)
    given = {k: v for k, v in {"method": method, "kd_weight": kd_weight, "kd_latent": kd_latent,
                               "teacher_layers": teacher_layers, "student_layers": student_layers,
                               "method_options": method_options, "resize_maps": resize_maps,
                               "kd_lr_scale": kd_lr_scale}.items() if v is not None}
    resume = train_args.get("resume")
    if isinstance(resume, (str, Path)) and resume:
        student = str(resume)
    elif resume is True and student is not None:  # as Ultralytics' `yolo train resume model=last.pt`
        train_args["resume"] = str(student)
    if student is None:
        raise ValueError("give student= (a model .yaml such as yolo11n.yaml, or a checkpoint)"
                         + ("; to resume, resume=path/to/last.pt" if resume else ""))
    if resume:
        task, preflight, save_dir = preflight_resume(Path(student), {**given, **({"teacher": teacher} if teacher else {})})
    else:
        task, preflight, save_dir = preflight_new(str(student), teacher, data, given, allow_download, train_args)
    events = ultralytics_callbacks.get_default_callbacks()
    for event, functions in (callbacks or {}).items():
        events[event].extend(functions)
    events[SETTINGS_KEY] = [preflight]
    overrides = {"model": str(student), **({"data": str(data)} if data is not None else {}), **train_args}
    if not resume:  # exactly the folder checked and locked (Ultralytics would otherwise pick it again)
        overrides.update(project=str(save_dir.parent), name=save_dir.name, exist_ok=True)
    return train_locked(task, save_dir, overrides, events)


def parse_pairs(pairs: list[str]) -> dict[str, Any]:
    """`key=value` words as Ultralytics' CLI reads them: Python literals (numbers, lists, True/False, None) or text."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{pair!r} is not key=value (e.g. epochs=10)")
        lowered = text.lower()
        if lowered in ("none", "null", ""):
            value: Any = None
        elif lowered in ("true", "false"):
            value = lowered == "true"
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
        parsed[key] = value
    return parsed


def run_cli(pairs: list[str]) -> int:
    """`diffkd yolo key=value ...`: distil and print where the weights are."""
    arguments = parse_pairs(pairs)
    if "model" in arguments:
        raise ValueError("give the student as student=... (model= is Ultralytics' name for it)")
    trainer = distill(**arguments)
    teacher = " (distilled from a random teacher: a model .yaml)" if random_teacher(trainer.kd_settings) else ""
    print(f"yolo distillation done: best {trainer.best}, last {trainer.last} (plain Ultralytics checkpoints){teacher}")
    return 0
