"""Datasets for classification distillation (Fashion-MNIST, CIFAR-100, ImageNet), a loader and batch mixing."""

from .catalog import DatasetInfo, available, build_dataset, dataset_info
from .imagenet import Policies
from .indexed import IndexedCollate, WithIndices
from .loader import build_loader
from .mixing import BatchMixer

__all__ = [
    "BatchMixer", "DatasetInfo", "IndexedCollate", "Policies", "WithIndices", "available", "build_dataset", "build_loader",
    "dataset_info",
]
