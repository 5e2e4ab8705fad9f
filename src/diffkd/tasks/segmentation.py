"""Semantic segmentation: per-pixel cross-entropy (+ 0.4 x auxiliary head), mIoU from a confusion matrix.

Datasets come from `diffkd.segmentation.catalog` (Cityscapes, Fashion-MNIST mosaics), models from
`diffkd.segmentation.models`; the config's `segmentation` section sets crop, scale range, flip, the
aux weight and a width multiplier for CPU-sized runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..config import Config, ConfigError, ModelConfig, TeacherConfig
from ..models import Taps
from ..segmentation import catalog
from ..segmentation import models as seg_models
from ..segmentation.labels import IGNORE
from ..segmentation.miou import confusion_matrix, iou_per_class, metric_key
from .base import Metrics, Reduce, Task


PROBE_SIZE = (64, 64)  # input size for probing tap shapes (a multiple of the output stride, 8)


class MeanIoU(Metrics):
    """mIoU, pixel accuracy and per-class IoU (in %) of the argmax of the "out" logits.

    The confusion matrix is summed over batches here and over processes by `reduce`, so the
    result is exactly that of the whole split.
    """

    def __init__(self, classes: Sequence[str], ignore_index: int = IGNORE) -> None:
        self.classes = list(classes)
        self.ignore_index = ignore_index
        self.matrix: Tensor | None = None

    def update(self, outputs: Any, targets: Tensor) -> None:
        """Add one batch: outputs {"out": (B,K,H,W), ...} or the logits, targets (B,H,W) train ids."""
        logits = outputs["out"] if isinstance(outputs, dict) else outputs
        batch = confusion_matrix(logits.detach().argmax(1), targets, len(self.classes), self.ignore_index)
        self.matrix = batch if self.matrix is None else self.matrix + batch

    def compute(self, reduce: Reduce) -> dict[str, float]:
        """{"miou", "pixel_acc", "iou_<class>" ...} over all processes (nan before any update)."""
        if self.matrix is None:
            return {"miou": float("nan"), "pixel_acc": float("nan")}
        matrix = reduce(self.matrix)
        iou = iou_per_class(matrix)
        total = matrix.sum().item()
        result = {
            "miou": 100.0 * float(iou.nanmean()),
            "pixel_acc": 100.0 * matrix.diagonal().sum().item() / total if total else float("nan"),
        }
        result.update({metric_key(name): 100.0 * value for name, value in zip(self.classes, iou.tolist())})
        return result


class SegmentationTask(Task):
    """Segment images of a Cityscapes-format dataset; the best run has the best validation mIoU."""

    main_metric = "miou"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.data = catalog.dataset_spec(cfg.data.name)
        self.settings = cfg.segmentation

    @property
    def input_shape(self) -> tuple[int, ...]:
        """A 64x64 probe: fully convolutional nets have the same channels at any size, and it is cheap on a CPU."""
        return (self.data.channels, *PROBE_SIZE)

    def build_dataset(self, split: str, *, limit: int | None = None) -> Dataset:
        d, s = self.cfg.data, self.settings
        augment = (d.augment is not False) if split == "train" else False
        return catalog.build_dataset(
            d.name, split, d.root, augment=augment, crop_size=tuple(s.crop_size), scale_range=tuple(s.scale_range),
            flip=s.flip, limit=limit,
        )  # fmt: skip

    def build_model(self, spec: ModelConfig | TeacherConfig) -> nn.Module:
        """A network of `diffkd.segmentation.models`; a teacher always has its aux head (as it was trained with)."""
        if spec.options:
            raise ConfigError(
                f"options of {spec.name!r}: segmentation models take no builder options (set segmentation.width_mult "
                "and friends instead); drop options"
            )
        teacher = isinstance(spec, TeacherConfig)
        width = self.settings.width_mult
        if teacher and self.settings.teacher_width_mult is not None:
            width = self.settings.teacher_width_mult
        return seg_models.create(
            spec.name, num_classes=spec.num_classes or self.data.num_classes, in_channels=self.data.channels,
            width_mult=width, aux=teacher or self.settings.aux_weight > 0, pretrained_backbone=spec.pretrained,
        )  # fmt: skip

    def default_taps(self, name: str, model: nn.Module) -> Taps:
        """For "@logits" the logits map before upsampling (`classifier`), for "@feature" the backbone's last map."""
        return seg_models.default_taps(name)

    def loss(self, outputs: dict[str, Tensor], targets: Tensor) -> Tensor:
        """CE(out) + aux_weight * CE(aux), pixels labelled IGNORE left out."""
        loss = F.cross_entropy(outputs["out"].float(), targets, ignore_index=IGNORE)
        if "aux" in outputs and self.settings.aux_weight > 0:
            loss = loss + self.settings.aux_weight * F.cross_entropy(
                outputs["aux"].float(), targets, ignore_index=IGNORE
            )
        return loss

    def metrics(self) -> Metrics:
        return MeanIoU(self.data.classes)
