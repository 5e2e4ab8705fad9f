"""Image classification: cross-entropy with label smoothing (soft targets under mixup/cutmix), top-1/top-5."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .. import data, models
from ..config import Config, ConfigError, ModelConfig, TeacherConfig
from ..methods import METHODS
from .base import Metrics, Reduce, Task


class TopK(Metrics):
    """Top-1 and top-5 accuracy (in %) from counts, so sums over processes give the exact global value.

    Soft targets (B, K) from mixup/cutmix count as their largest class.
    """

    def __init__(self, ks: tuple[int, ...] = (1, 5)) -> None:
        self.ks = ks
        self.correct: Tensor | None = None
        self.count: Tensor | None = None

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        """Count the samples whose target is among the k highest logits, for each k."""
        logits = outputs.detach()
        labels = targets.argmax(dim=1) if targets.ndim == 2 else targets
        top = logits.topk(min(max(self.ks), logits.shape[1]), dim=1).indices
        hits = top.eq(labels.view(-1, 1))
        correct = torch.stack([hits[:, :k].any(dim=1).sum() for k in self.ks]).double()
        count = torch.tensor(float(len(labels)), dtype=torch.float64, device=logits.device)
        self.correct = correct if self.correct is None else self.correct + correct
        self.count = count if self.count is None else self.count + count

    def compute(self, reduce: Reduce) -> dict[str, float]:
        """{"top1": %, "top5": %} over all processes (nan before any update)."""
        if self.correct is None or self.count is None:
            return {f"top{k}": float("nan") for k in self.ks}
        totals = reduce(torch.cat([self.correct, self.count.view(1)])).tolist()
        return {f"top{k}": 100.0 * c / max(totals[-1], 1.0) for k, c in zip(self.ks, totals[:-1])}


class ClassificationTask(Task):
    """Classify images from `diffkd.data` with models from `diffkd.models`; the best run has the best top-1."""

    main_metric = "top1"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.info = data.dataset_info(cfg.data.name)
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
        return models.create(spec.name, num_classes=classes, pretrained=spec.pretrained)

    def augment_batch(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return self.mixer(inputs, targets) if self.mixer.enabled else (inputs, targets)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs.float(), targets, label_smoothing=self.cfg.train.label_smoothing)

    def metrics(self) -> Metrics:
        return TopK()
