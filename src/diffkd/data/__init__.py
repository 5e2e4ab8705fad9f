"""Datasets for classification distillation (Fashion-MNIST, CIFAR-100, ImageNet) and a loader."""

from .catalog import DatasetInfo, available, build_dataset, dataset_info
from .loader import build_loader

__all__ = ["DatasetInfo", "available", "build_dataset", "build_loader", "dataset_info"]
