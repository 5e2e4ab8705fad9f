"""Image classification: cross-entropy with label smoothing, top-1/top-5 accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .. import data, models
from ..config import ModelConfig, TeacherConfig
from .base import Metrics, Reduce, Task


class TopK(Metrics):
    """Top-1 and top-5 accuracy (in %) from counts, so sums over processes give the exact global value."""

    def __init__(self, ks: tuple[int, ...] = (1, 5)) -> None:
        self.ks = ks
        self.correct: Tensor | None = None
        self.count: Tensor | None = None

    def update(self, outputs: Tensor, targets: Tensor) -> None:
        """Count the samples whose target is among the k highest logits, for each k."""
        logits = outputs.detach()
        top = logits.topk(min(max(self.ks), logits.shape[1]), dim=1).indices
        hits = top.eq(targets.view(-1, 1))
        correct = torch.stack([hits[:, :k].any(dim=1).sum() for k in self.ks]).double()
        count = torch.tensor(float(len(targets)), dtype=torch.float64, device=logits.device)
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

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.info = data.dataset_info(cfg.data.name)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.info.input_size)

    def build_dataset(self, split: str, *, limit: int | None = None) -> Dataset:
        d = self.cfg.data
        augment = d.augment if split == "train" else False
        return data.build_dataset(d.name, split, d.root, download=d.download, augment=augment, limit=limit)

    def build_model(self, spec: ModelConfig | TeacherConfig) -> nn.Module:
        classes = spec.num_classes or self.info.num_classes
        return models.create(spec.name, num_classes=classes, pretrained=spec.pretrained)

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs.float(), targets, label_smoothing=self.cfg.train.label_smoothing)

    def metrics(self) -> Metrics:
        return TopK()
