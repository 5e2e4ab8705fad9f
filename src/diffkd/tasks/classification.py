"""Image classification: cross-entropy with label smoothing (soft targets under mixup/cutmix), top-1/top-5.

A model may return its logits or an output holding them as `.logits` (transformers' ModelOutput).
An image folder's class names are kept in the run directory (classes.json) and checked against the
data of every later use of the run (resume, eval, visualize).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .. import data, models
from ..atomic import write_atomic
from ..config import Config, ConfigError, ModelConfig, TeacherConfig
from ..methods import METHODS
from .base import Metrics, Reduce, Task


CLASSES_FILE = "classes.json"


def logits_of(outputs: Any) -> Tensor:
    """A classifier's logits: its output, or the `.logits` of a transformers ModelOutput."""
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise ValueError(
        f"a classifier must return its logits (a tensor) or an output with a .logits tensor; the model returned "
        f"a {type(outputs).__name__}"
    )


class TopK(Metrics):
    """Top-k accuracy (in %) for each k in ks (default top-1 and top-5) from counts, so sums over processes
    give the exact global value.

    Soft targets (B, K) from mixup/cutmix count as their largest class.
    """

    def __init__(self, ks: tuple[int, ...] = (1, 5)) -> None:
        self.ks = ks
        self.correct: Tensor | None = None
        self.count: Tensor | None = None

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        """Count the samples whose target is among the k highest logits, for each k."""
        logits = logits_of(outputs).detach()
        labels = targets.argmax(dim=1) if targets.ndim == 2 else targets
        top = logits.topk(min(max(self.ks), logits.shape[1]), dim=1).indices
        hits = top.eq(labels.view(-1, 1))
        correct = torch.stack([hits[:, :k].any(dim=1).sum() for k in self.ks]).double()
        count = torch.tensor(float(len(labels)), dtype=torch.float64, device=logits.device)
        self.correct = correct if self.correct is None else self.correct + correct
        self.count = count if self.count is None else self.count + count

    def compute(self, reduce: Reduce) -> dict[str, float]:
        """{"top1": %, "top5": %, ...} for each k over all processes (nan before any update)."""
        if self.correct is None or self.count is None:
            return {f"top{k}": float("nan") for k in self.ks}
        totals = reduce(torch.cat([self.correct, self.count.view(1)])).tolist()
        return {f"top{k}": 100.0 * c / max(totals[-1], 1.0) for k, c in zip(self.ks, totals[:-1])}


class ClassificationTask(Task):
    """Classify images from `diffkd.data` with models from `diffkd.models`; the best run has the best top-1."""

    main_metric = "top1"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.info = data.dataset_info(cfg.data.name, cfg.data.root)
        d = cfg.data
        self.policies = data.Policies(d.randaugment, d.color_jitter, d.random_erasing)
        self.mixer = data.BatchMixer(self.info.num_classes, d.mixup, d.cutmix)
        hard = [lv.method for lv in cfg.levels if lv.method in METHODS and METHODS[lv.method].needs_targets]
        if self.mixer.enabled and hard:
            raise ConfigError(
                f"data.mixup / data.cutmix give soft targets, but method {hard[0]!r} needs class labels; "
                "turn mixing off (data.mixup=0 data.cutmix=0) or use another method"
            )

    @property
    def input_shape(self) -> tuple[int, ...]:
        channels, height, width = self.info.input_size
        size = self.cfg.data.image_size
        return (channels, size, size) if size else (channels, height, width)

    def build_dataset(self, split: str, *, limit: int | None = None) -> Dataset:
        d = self.cfg.data
        train = split == "train"
        return data.build_dataset(
            d.name,
            split,
            d.root,
            download=d.download,
            augment=d.augment if train else False,
            limit=limit,
            image_size=d.image_size,
            policies=self.policies if train else data.Policies(),
        )

    def build_model(self, spec: ModelConfig | TeacherConfig) -> nn.Module:
        classes = spec.num_classes or self.info.num_classes
        return models.create(spec.name, num_classes=classes, pretrained=spec.pretrained, **spec.options)

    @property
    def class_names(self) -> list[str] | None:
        return list(self.info.classes) if self.info.classes is not None else None

    def record_run(self, run_dir: Path) -> None:
        """Save the image folder's class names in the run directory (classes.json)."""
        if self.info.classes is not None:
            write_atomic((json.dumps(list(self.info.classes), indent=1) + "\n").encode(), run_dir / CLASSES_FILE)

    def check_run(self, run_dir: Path, *, role: str = "run") -> None:
        """Refuse data whose class folders differ from those the run (or the teacher's run) was trained on
        (classes.json); a teacher's folder without classes.json has no names to check."""
        if self.info.classes is None:
            return
        path = Path(run_dir) / CLASSES_FILE
        if not path.is_file():
            if role == "teacher":
                return
            raise ConfigError(f"{path} not found: the run's class names are needed to check data.root {self.cfg.data.root!r}")
        saved = json.loads(path.read_text())
        if saved != list(self.info.classes):
            owner = "the teacher's run" if role == "teacher" else "the run"
            missing, extra = sorted(set(saved) - set(self.info.classes)), sorted(set(self.info.classes) - set(saved))
            detail = (f"missing {missing or 'none'}, not in {owner} {extra or 'none'}" if missing or extra
                      else "same names in another order, so the labels disagree")
            fix = "; distil on the classes the teacher was trained on" if role == "teacher" else ""
            raise ConfigError(
                f"data.root {self.cfg.data.root!r} has other classes than {owner} in {Path(run_dir)} "
                f"({detail}); its {len(saved)} classes are listed in {path}{fix}"
            )

    def augment_batch(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return self.mixer(inputs, targets) if self.mixer.enabled else (inputs, targets)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(logits_of(outputs).float(), targets, label_smoothing=self.cfg.train.label_smoothing)

    def metrics(self) -> Metrics:
        """Top-1, and top-5 where there are more than 5 classes (with 5 or fewer it is always 100)."""
        return TopK(tuple(k for k in (1, 5) if k == 1 or k < self.info.num_classes))
