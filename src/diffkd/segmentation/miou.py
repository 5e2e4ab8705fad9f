"""Intersection-over-union from a confusion matrix (summed over batches and processes by the task's metric).

IoU_c = TP_c / (TP_c + FP_c + FN_c) with rows = ground truth, columns = prediction, ignored pixels
left out. A class that appears in neither the labels nor the predictions has no IoU (NaN) and is
left out of the mean, as the Cityscapes evaluation does.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from .labels import IGNORE


def confusion_matrix(prediction: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE) -> Tensor:
    """(K, K) int64 counts: entry [t, p] is the number of pixels of class t predicted as p."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} shapes differ")
    keep = target != ignore_index
    t, p = target[keep].long(), prediction[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"target holds classes outside 0..{num_classes - 1} (and ignore {ignore_index})")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).view(num_classes, num_classes)


def iou_per_class(matrix: Tensor) -> Tensor:
    """IoU of every class (float64), NaN where the class is in neither labels nor predictions."""
    m = matrix.double()
    tp = m.diagonal()
    union = m.sum(0) + m.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def metric_key(name: str) -> str:
    """A class name as a metric key: 'traffic light' -> 'iou_traffic_light', 'T-shirt/top' -> 'iou_t_shirt_top'."""
    return "iou_" + re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")
