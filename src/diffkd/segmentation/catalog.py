"""Segmentation datasets by name: Cityscapes (19 classes) and the Fashion-MNIST mosaics (11 classes).

Both are read from the Cityscapes folder format; an entry says how many classes and channels the
set has, how its label files are named and mapped, how it is normalized, and where it lives by default.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ..data.cache import cache_dir
from ..data.fashion_mnist import MEAN as FMNIST_MEAN
from ..data.fashion_mnist import STD as FMNIST_STD
from . import labels, mosaic
from .cityscapes import CityscapesFolder

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPLITS = {"train": "train", "val": "val", "test": "val"}  # Cityscapes test labels are not public: test = val


@dataclass(frozen=True)
class SegmentationData:
    """What a segmentation dataset is: classes, image mode, label files and their mapping, normalization, root."""

    name: str
    classes: tuple[str, ...]
    mode: str  # PIL mode of the images: "RGB" or "L"
    kind: str  # label files are *_gtFine_<kind>.png
    table: Callable[[], Tensor]  # raw label byte -> train id
    table_what: str  # what valid label values are, for error messages
    mean: tuple[float, ...]
    std: tuple[float, ...]
    prepare: Callable[[str | None], Path]  # data.root (or None) -> the folder, created if the set can be

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return len(self.mode)


def _cityscapes_root(root: str | None) -> Path:
    """Cityscapes cannot be downloaded without an account: data.root must point at it."""
    if root is None:
        raise FileNotFoundError(
            "Cityscapes needs data.root=/path/to/cityscapes (the folder holding leftImg8bit/ and gtFine/; "
            "register and download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from cityscapes-dataset.com)"
        )
    return Path(root).expanduser()


def _mosaic_root(root: str | None) -> Path:
    """The mosaic set at data.root (default ~/.cache/diffkd/fmnist-mosaic), generated if missing."""
    return mosaic.ensure(root if root is not None else cache_dir("fmnist-mosaic"))


DATASETS: dict[str, SegmentationData] = {
    "cityscapes": SegmentationData(
        "cityscapes", labels.CLASSES, "RGB", "labelIds", labels.id_to_train_id,
        "Cityscapes labelIds are 0..33 (see diffkd.segmentation.labels.LABELS)",
        IMAGENET_MEAN, IMAGENET_STD, _cityscapes_root,
    ),
    "fmnist_mosaic": SegmentationData(
        "fmnist_mosaic", mosaic.CLASSES, "L", mosaic.KIND, lambda: labels.train_id_identity(len(mosaic.CLASSES)),
        f"mosaic train ids are 0..{len(mosaic.CLASSES) - 1} and {labels.IGNORE} (ignore)",
        FMNIST_MEAN, FMNIST_STD, _mosaic_root,
    ),
}  # fmt: skip


def dataset_spec(name: str) -> SegmentationData:
    """The catalog entry of a segmentation dataset name."""
    if name not in DATASETS:
        close = difflib.get_close_matches(name, list(DATASETS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown segmentation dataset {name!r}.{hint} Available: {', '.join(DATASETS)}")
    return DATASETS[name]


def build_dataset(
    name: str,
    split: str,
    root: str | None = None,
    *,
    augment: bool | None = None,
    crop_size: tuple[int, int] = (512, 1024),
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip: bool = True,
    limit: int | None = None,
) -> CityscapesFolder:
    """One split ("train", "val"; "test" reads val) of a segmentation dataset; augment defaults to split == "train"."""
    spec = dataset_spec(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for {name}; valid: {', '.join(SPLITS)}")
    return CityscapesFolder(
        spec.prepare(root), SPLITS[split], kind=spec.kind, table=spec.table(), table_what=spec.table_what,
        mode=spec.mode, mean=spec.mean, std=spec.std, augment=split == "train" if augment is None else augment,
        crop_size=crop_size, scale_range=scale_range, flip=flip, limit=limit,
    )  # fmt: skip
