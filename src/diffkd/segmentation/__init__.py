"""Semantic segmentation for distillation: dilated DeepLabV3 / PSPNet networks, Cityscapes-format data,
Fashion-MNIST mosaics as an offline stand-in, and IoU from a confusion matrix.

The task plug-in that puts these together for the engine is `diffkd.tasks.segmentation`.
"""

from .catalog import DATASETS, build_dataset, dataset_spec
from .miou import confusion_matrix, iou_per_class
from .models import SegmentationModel, available, create, default_taps

__all__ = [
    "DATASETS",
    "SegmentationModel",
    "available",
    "build_dataset",
    "confusion_matrix",
    "create",
    "dataset_spec",
    "default_taps",
    "iou_per_class",
]
