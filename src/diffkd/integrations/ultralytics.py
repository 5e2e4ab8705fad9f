"""DiffKD and its baselines inside Ultralytics' own YOLO trainers: detect, segment, pose and obb.

One distillation module per neck level (the maps the YOLO head reads) adds its terms to the student's
loss. The student's maps come from its head's training output, the teacher's from running the frozen
teacher's layers up to those maps. The student gets no hook and no extra module: the distillation
modules and the teacher belong to the trainer, so the EMA, best.pt and last.pt are plain Ultralytics
checkpoints that `YOLO(path)` loads without diffkd. The distillation modules are a param group of
Ultralytics' optimizer (so their optimizer state is in last.pt's) and are saved beside last.pt in
`weights/kd_modules.pt` (settings, epoch, plain state_dicts of the modules and of their loss weights);
`resume=True` restores both. Every kd weight is applied by `diffkd.weighting.LossWeights` (`kd_weight`: a number,
or "auto" against Ultralytics' per-image task loss).
"""
from __future__ import annotations

import ast
import difflib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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
from ultralytics.nn.modules.head import Detect
from ultralytics.nn.tasks import guess_model_task, load_checkpoint, yaml_model_load
from ultralytics.utils import DEFAULT_CFG, DEFAULT_CFG_DICT
from ultralytics.utils import callbacks as ultralytics_callbacks
from ultralytics.utils.torch_utils import unwrap_model

from ..atomic import save_atomic
from ..methods import MethodOutput, build_method, method_class
from ..weighting import LossWeights, term_key, weight_spec

SUPPORTED_METHODS = ("diffkd", "mse", "cwd", "fgd", "mgd", "pkd")
# Each method's options on YOLO neck maps. diffkd: the paper's detection setting (attention-weighted MSE, tau 0.5,
# kd term x5, diffusion x1, no autoencoder); fgd: the authors' one-stage (FCOS) weights; cwd, mgd, pkd: their defaults
# (mgd and pkd: the authors' FPN settings).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "diffkd": {"distance": "attention_mse", "tau": 0.5, "kd_weight": 5.0},
    "mse": {},
    "cwd": {},
    "fgd": {"family": "fcos"},
    "mgd": {},
    "pkd": {},
}
KD_KEYS = ("teacher", "method", "kd_weight", "kd_latent", "teacher_layers", "student_layers", "method_options",
           "allow_download")
STATE_FILE = "kd_modules.pt"  # beside last.pt; not named last*.pt, which Ultralytics' resume=True searches for
SETTINGS_KEY = "diffkd_settings"  # the trainer.callbacks entry that carries the settings into Ultralytics' DDP workers
SHORT_TERMS = {"diffusion": "diff", "attention": "att", "global": "glob"}  # progress-bar columns are 11 wide


@dataclass(frozen=True)
class KDSettings:
    """What to distil: the teacher (YOLO checkpoint or model .yaml), the method, its level weight and options."""

    teacher: str
    method: str = "diffkd"
    kd_weight: float | str = 1.0  # every level's weight: a number, or "auto" (diffkd.weighting, against the task loss)
    kd_latent: int | None = None  # diffkd only: an autoencoder with this many latent channels (at most the teacher's)
    teacher_layers: tuple[int, ...] | None = None  # default: the inputs of the teacher's head
    student_layers: tuple[int, ...] | None = None  # default: the inputs of the student's head (only those can be read)
    method_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in SUPPORTED_METHODS:
            raise ValueError(unsupported_method(self.method))
        try:
            weight_spec(self.kd_weight)
        except ValueError:
            raise ValueError(f"kd_weight must be a number >= 0 or 'auto', got {self.kd_weight!r}") from None
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
    """Why method `name` cannot distil YOLO neck maps (an unknown name gets the registry's closest match)."""
    cls = method_class(name)
    if cls.needs_indices:
        why = "needs each image's index in the training set (a memory bank), which Ultralytics' batches do not carry"
    elif cls.takes_tap_lists:
        why = "pairs lists of taps (a backbone's stages), not one neck map with one neck map"
    else:
        why = "compares class scores or pooled vectors, which YOLO's per-anchor outputs are not"
    return f"method {name!r} {why}; YOLO distillation takes one of {', '.join(SUPPORTED_METHODS)}"


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


def load_teacher(source: str, task: str, data: dict, build: Callable[..., nn.Module]) -> nn.Module:
    """The frozen teacher in eval mode, BatchNorm fused: a YOLO checkpoint of the student's task and class count, or a
    model .yaml (random weights; for tests) built by `build` for the data."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        found = guess_model_task(model_yaml(source, "teacher"))
        if found != task:
            raise ValueError(f"teacher {source} is a {found} model but the student is a {task} model; distil within a task")
        teacher = build(cfg=str(path), weights=None, verbose=False)
    else:
        if not path.is_file():
            raise ValueError(f"teacher {source} is not a file; give a YOLO checkpoint (.pt) or a model .yaml")
        try:
            teacher = load_checkpoint(path)[0]
        except Exception as exc:  # anything torch.load or Ultralytics' checks raise: the file is not a YOLO checkpoint
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"teacher {source} is not an Ultralytics YOLO checkpoint ({reason}); give a best.pt or "
                             "last.pt written by Ultralytics, or a model .yaml") from None
        found = getattr(teacher, "task", None) or guess_model_task(teacher)
        if found != task:
            raise ValueError(f"teacher {source} is a {found} model but the student is a {task} model; distil within a task")
    head = head_of(teacher, "teacher")
    if head.nc != data["nc"]:
        raise ValueError(f"teacher {source} predicts {head.nc} classes but the data has {data['nc']}; use a teacher "
                         "trained on these classes")
    if task == "pose" and tuple(getattr(head, "kpt_shape", ())) != tuple(data.get("kpt_shape", ())):
        raise ValueError(f"teacher {source} predicts keypoints {tuple(head.kpt_shape)} but the data has "
                         f"{tuple(data.get('kpt_shape', ()))}; use a teacher trained on this keypoint layout")
    teacher = teacher.float().fuse(verbose=False).eval()
    return teacher.requires_grad_(False)


class Projected(nn.Module):
    """A 1x1 conv from the student's width to the teacher's, then `method` (CWD compares maps of equal widths)."""

    def __init__(self, student_channels: int, teacher_channels: int, method: nn.Module):
        super().__init__()
        self.projector = nn.Conv2d(student_channels, teacher_channels, 1)
        self.method = method
        self.calibrated_terms = method.calibrated_terms

    def set_progress(self, epoch: float, epochs: int) -> None:
        self.method.set_progress(epoch, epochs)

    def forward(self, student: Tensor, teacher: Tensor, targets: Any = None) -> MethodOutput:
        return self.method(self.projector(student), teacher, targets)


@dataclass(frozen=True)
class NeckLevel:
    """One distilled pair: the column prefix, the student map's position among its head's inputs, the teacher layer."""

    name: str
    student_position: int
    teacher_layer: int


def build_levels(student: nn.Module, teacher: nn.Module, settings: KDSettings, imgsz: int,
                 channels: int) -> tuple[nn.ModuleDict, list[NeckLevel], LossWeights]:
    """One method per neck level, sized from the maps of a probe forward (both models in eval mode), and the
    weights of every level (kd_weight: a number, or auto)."""
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
    if max(teacher_layers) >= len(teacher.model):
        raise ValueError(f"teacher_layers {teacher_layers}: the teacher has layers 0..{len(teacher.model) - 1}")
    device = next(student.parameters()).device
    probe = torch.zeros(2, channels, imgsz, imgsz, device=device)
    was_training = student.training
    with torch.no_grad():
        student_maps = layer_outputs(student.eval(), probe, set(chosen))
        teacher_maps = layer_outputs(teacher, probe, set(teacher_layers))
    student.train(was_training)
    modules, levels = nn.ModuleDict(), []
    for student_layer, teacher_layer in zip(chosen, teacher_layers):
        s, t = student_maps[student_layer].shape, teacher_maps[teacher_layer].shape
        name = f"p{round(math.log2(imgsz / s[-1]))}"
        name = name if name not in modules else f"{name}l{student_layer}"
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
    weights = LossWeights({lv.name: spec for lv in levels}, {n: m.calibrated_terms for n, m in modules.items()})
    return modules.to(device).train(), levels, weights.to(device).train()


def batch_boxes(batch: dict, oriented: bool) -> tuple[Any, list[dict[str, Tensor]]]:
    """The batch's boxes as FGD reads a detector's transform output: (ImageList of the batch, [{"boxes": x1y1x2y2}]) in
    pixels of the batch's images; oriented boxes (cx, cy, w, h, angle) become the axis-aligned boxes around them."""
    from torchvision.models.detection.image_list import ImageList

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
    per_image = [{"boxes": corners[index == i]} for i in range(images.shape[0])]
    return ImageList(images, [(height, width)] * images.shape[0]), per_image


class DistillationCriterion:
    """The student's own criterion plus every neck level's kd terms, each logged as its own loss item.

    Not an nn.Module, so setting it as the student's `criterion` registers nothing in the student; a deep copy of the
    student (Ultralytics' EMA) gets None in its place and builds its own plain criterion.
    """

    def __init__(self, base: Any, teacher: nn.Module, modules: nn.ModuleDict, levels: list[NeckLevel],
                 weights: LossWeights, oriented: bool, progress: Callable[[], tuple[float, int]], columns: set[str]):
        self.base, self.teacher, self.modules, self.levels = base, teacher, modules, levels
        self.weights, self.oriented, self.progress, self.columns = weights, oriented, progress, columns
        # The one extra input a method here may declare (FGD's): the batch's boxes, in the frame of its images.
        self.needs_boxes = any("boxes" in getattr(m, "extra_inputs", {}) for m in modules.values())

    def __deepcopy__(self, memo: dict) -> None:
        return None

    def __getattr__(self, name: str) -> Any:  # the base criterion's own attributes (update(), updates, ...)
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def update(self) -> None:
        """Called by Ultralytics at every epoch's end: fix auto weights whose window outlasted the first epoch."""
        self.weights.end_windows()
        if hasattr(self.base, "update"):
            self.base.update()

    def __call__(self, preds: Any, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        loss, items = self.base(preds, batch)
        student_maps = head_inputs(preds)
        with torch.no_grad():
            teacher_maps = layer_outputs(self.teacher, batch["img"], {lv.teacher_layer for lv in self.levels})
        boxes = batch_boxes(batch, self.oriented) if self.needs_boxes else None
        epoch, epochs = self.progress()
        outputs = {}
        for level in self.levels:
            method = self.modules[level.name]
            method.set_progress(epoch, epochs)
            extra = {"boxes": boxes} if "boxes" in getattr(method, "extra_inputs", {}) else {}
            outputs[level.name] = method(student_maps[level.student_position], teacher_maps[level.teacher_layer], **extra)
        images = batch["img"].shape[0]
        # Ultralytics' loss vector holds batch sums (mean x batch size): the task loss auto weights compare with is
        # its per-image sum, and the weighted kd sum joins the vector scaled the same way.
        weighted = self.weights(outputs, loss.detach().sum() / images).weighted
        total = loss.new_zeros(())
        for name, output in outputs.items():
            for term in output.terms:
                value = weighted[term_key(name, term, output.terms)]
                column = f"{name}_{SHORT_TERMS.get(term, term)}"
                self.columns.add(column)
                items[column] = value.detach()
                total = total + value.float()
        for name, factor in self.weights.current().items():  # auto weights: 0 until calibrated
            self.columns.add(f"{name}_w")
            items[f"{name}_w"] = loss.new_tensor(factor)
        return torch.cat([loss.reshape(-1), (total * images).reshape(1).to(loss.dtype)]), items


def average_gradients(parameters: list[nn.Parameter], world_size: int) -> None:
    """Average the gradients over DDP ranks as DDP averages the student's (a parameter without one counts as zero)."""
    import torch.distributed as dist

    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world_size)


# ----------------------------------------------------------------------------------------------- the trainers
class DistillationTrainerMixin:
    """Mixed in before an Ultralytics task trainer: builds the teacher and the kd modules, adds them to the optimizer,
    the loss, gradient clipping, DDP averaging, last.pt's companion file and resume."""

    def __init__(self, cfg: Any = DEFAULT_CFG, overrides: dict | None = None, _callbacks: dict | None = None):
        super().__init__(cfg, overrides, _callbacks)
        given = (self.callbacks.get(SETTINGS_KEY) or [None])[0]
        settings = self.saved_settings(given) if self.resume else given
        if settings is None:
            raise ValueError("no distillation settings: start the run with diffkd.integrations.ultralytics.distill() or "
                             "`diffkd yolo`, which give the teacher and method")
        self.kd_settings: KDSettings = settings
        self.callbacks[SETTINGS_KEY] = [settings]
        self.kd_teacher: nn.Module | None = None
        self.kd_modules: nn.ModuleDict | None = None
        self.kd_weights: LossWeights | None = None
        self.kd_levels: list[NeckLevel] = []
        self.kd_columns: set[str] = set()

    # ---------------------------------------------------------------- the kd state beside last.pt
    @property
    def kd_state_path(self) -> Path:
        return Path(self.args.resume if self.resume else self.last).parent / STATE_FILE

    def saved_state(self) -> dict:
        path = self.kd_state_path
        if not path.is_file():
            raise ValueError(f"{path} is missing: resuming a distillation run needs the kd modules saved beside last.pt "
                             "(was this run started by diffkd?)")
        return torch.load(path, map_location="cpu", weights_only=True)

    def saved_settings(self, given: KDSettings | None) -> KDSettings:
        stored = KDSettings(**self.saved_state()["settings"])
        if given is not None and given != stored:
            raise ValueError(f"resume continues the run's distillation ({stored}); drop the teacher and kd options, or "
                             "start a new run to change them")
        return stored

    def save_model(self) -> bool:
        saved = super().save_model()
        state = {"settings": asdict(self.kd_settings), "epoch": self.epoch, "modules": self.kd_modules.state_dict(),
                 "weights": self.kd_weights.state_dict()}
        save_atomic(state, self.wdir / STATE_FILE)
        return saved

    def resume_training(self, ckpt: dict | None) -> None:
        if ckpt is not None and self.resume:
            state = self.saved_state()
            if state["epoch"] != ckpt.get("epoch"):
                raise ValueError(f"{self.kd_state_path} is from epoch {state['epoch'] + 1} but last.pt from epoch "
                                 f"{ckpt.get('epoch', -1) + 1}; they must come from the same save")
            self.kd_modules.load_state_dict(state["modules"])
            self.kd_weights.load_state_dict(state["weights"])
        super().resume_training(ckpt)

    def _handle_nan_recovery(self, epoch: int) -> bool:
        """Ultralytics reloads the student (and the optimizer) from last.pt after a NaN epoch; the kd modules too."""
        recovered = super()._handle_nan_recovery(epoch)
        if recovered:
            state = torch.load(self.wdir / STATE_FILE, map_location="cpu", weights_only=True)
            self.kd_modules.load_state_dict(state["modules"])
            self.kd_weights.load_state_dict(state["weights"])
        return recovered

    # ---------------------------------------------------------------- building, optimizing, the loss
    def build_optimizer(self, model: nn.Module, name: str = "auto", lr: float = 0.001, momentum: float = 0.9,
                        decay: float = 1e-5, iterations: float = 1e5) -> torch.optim.Optimizer:
        optimizer = super().build_optimizer(model, name, lr, momentum, decay, iterations)
        if self.kd_modules is None:
            student = unwrap_model(model)
            self.kd_teacher = load_teacher(self.kd_settings.teacher, self.args.task, self.data, self.get_model)
            self.kd_teacher.to(self.device)
            self.kd_modules, self.kd_levels, self.kd_weights = build_levels(
                student, self.kd_teacher, self.kd_settings, self.args.imgsz, self.data["channels"])
        template = next(g for g in optimizer.param_groups if g.get("param_group") in ("weight", "muon"))
        hyper = {k: v for k, v in template.items() if k not in ("params", "param_group")}
        hyper["lr"] = self.args.lr0  # the chosen rate (MuSGD raises some groups' rates)
        if "use_muon" in hyper:
            hyper["use_muon"] = False
        optimizer.add_param_group({**hyper, "params": list(self.kd_modules.parameters()), "param_group": "kd"})
        return optimizer

    def _setup_train(self) -> None:
        super()._setup_train()
        student = unwrap_model(self.model)
        base = getattr(student, "criterion", None) or student.init_criterion()
        student.criterion = DistillationCriterion(
            base, self.kd_teacher, self.kd_modules, self.kd_levels, self.kd_weights,
            self.args.task == "obb", lambda: (self.epoch, self.epochs), self.kd_columns)

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
        kd_parameters = list(self.kd_modules.parameters())
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
    """The task of a YOLO model file (.yaml or checkpoint), among those the integration distils."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml"):
        task = guess_model_task(model_yaml(source, "student"))
    elif not path.is_file():
        raise ValueError(f"student {source} is not a file; give a model .yaml (e.g. yolo11n.yaml) or a local checkpoint "
                         "(a name like yolo11n.pt would be downloaded)")
    else:
        task = getattr(load_checkpoint(path)[0], "task", None)
    if task not in TRAINERS:
        raise ValueError(f"student {source} is a {task} model; YOLO distillation covers {', '.join(TRAINERS)}")
    return task


def distill(student: str | None = None, teacher: str | None = None, *, data: str | None = None, method: str = "diffkd",
            kd_weight: float | str = 1.0, kd_latent: int | None = None, teacher_layers: tuple[int, ...] | None = None,
            student_layers: tuple[int, ...] | None = None, method_options: dict[str, Any] | None = None,
            allow_download: bool = False, callbacks: dict[str, list[Callable]] | None = None, **train_args: Any) -> Any:
    """Train YOLO `student` (a model .yaml or checkpoint) on `data`, distilled from `teacher`; every other keyword is
    an Ultralytics train argument (epochs, imgsz, batch, device, ...). Returns the finished Ultralytics trainer.

    `resume=path/to/last.pt` (or `resume=True` with `student=` that last.pt) continues a run with its own teacher and
    kd settings. `callbacks` adds Ultralytics callbacks ({event: [function(trainer)]}).
    """
    unknown = sorted(set(train_args) - set(DEFAULT_CFG_DICT))
    if unknown:
        valid = [*KD_KEYS, *DEFAULT_CFG_DICT]
        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown argument {unknown[0]!r}{hint}; give diffkd's ({', '.join(KD_KEYS)}) or "
                         "Ultralytics' train arguments")
    resume = train_args.get("resume")
    if isinstance(resume, (str, Path)) and resume:
        student = str(resume)
    elif resume is True and student is not None:  # as Ultralytics' `yolo train resume model=last.pt`
        train_args["resume"] = str(student)
    settings = None
    if teacher is not None or not resume:
        if teacher is None:
            raise ValueError("give teacher= (a YOLO checkpoint of the same task and classes, or a model .yaml)")
        settings = KDSettings(str(teacher), method, kd_weight, kd_latent, teacher_layers, student_layers,
                              dict(method_options or {}))
    if student is None:
        raise ValueError("give student= (a model .yaml such as yolo11n.yaml, or a checkpoint)")
    if not resume:
        if data is None:
            raise ValueError("give data= (an Ultralytics data yaml)")
        if not allow_download:
            check_data(data)
    events = ultralytics_callbacks.get_default_callbacks()
    for event, functions in (callbacks or {}).items():
        events[event].extend(functions)
    events[SETTINGS_KEY] = [settings]
    overrides = {"model": str(student), **({"data": str(data)} if data is not None else {}), **train_args}
    trainer = TRAINERS[model_task(str(student))](overrides=overrides, _callbacks=events)
    trainer.train()
    return trainer


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
    print(f"yolo distillation done: best {trainer.best}, last {trainer.last} (plain Ultralytics checkpoints)")
    return 0
