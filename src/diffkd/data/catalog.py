"""The datasets by name: their shapes (DatasetInfo) and one `build_dataset` entry point."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from . import cifar100, fashion_mnist, imagenet


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: class count and the (C,H,W) it is fed."""

    name: str
    num_classes: int
    input_size: tuple[int, int, int]


@dataclass(frozen=True)
class _Entry:
    """One catalog row: shapes, accepted splits, builder, and whether image_size and Policies apply."""

    info: DatasetInfo
    splits: tuple[str, ...]
    build: Callable[..., Dataset]
    resizable: bool = False
    policies: bool = False


_CATALOG = {
    "fashion_mnist": _Entry(
        DatasetInfo("fashion_mnist", 10, (1, 28, 28)), ("train", "test"), fashion_mnist.build
    ),
    "cifar100": _Entry(
        DatasetInfo("cifar100", 100, (3, 32, 32)), ("train", "test"), cifar100.build
    ),
    "imagenet": _Entry(
        DatasetInfo("imagenet", 1000, (3, 224, 224)), ("train", "test", "val"), imagenet.build, True, True
    ),
}


def _choose(kind: str, value: str, valid: list[str] | tuple[str, ...]) -> str:
    """Return value if valid, else raise ValueError listing the valid ones and the closest match."""
    if value in valid:
        return value
    close = difflib.get_close_matches(str(value), valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}.{hint}")


def available() -> list[str]:
    """Names accepted by dataset_info and build_dataset."""
    return list(_CATALOG)


def dataset_info(name: str) -> DatasetInfo:
    """Class count and model input size (C,H,W) of a dataset, without touching its files."""
    return _CATALOG[_choose("dataset", name, available())].info


def build_dataset(
    name: str,
    split: str,
    root: str | Path | None = None,
    *,
    download: bool = False,
    augment: bool | None = None,
    limit: int | None = None,
    image_size: int | None = None,
    policies: imagenet.Policies | None = None,
) -> Dataset:
    """One split as a map-style dataset of (normalized float image, int label).

    augment defaults to split == "train". limit=n keeps n items evenly spaced over the split
    (indices i * N // n), so class-sorted splits keep every class; None keeps all. image_size
    (imagenet only) sets the crop size, default 224; policies (imagenet only) add RandAugment,
    colour jitter and random erasing to the training transform.
    """
    entry = _CATALOG[_choose("dataset", name, available())]
    split = _choose(f"{name} split", split, entry.splits)
    options = {"download": download, "augment": split == "train" if augment is None else augment}
    if image_size is not None and entry.resizable:
        options["image_size"] = image_size
    elif image_size not in (None, entry.info.input_size[-1]):
        raise ValueError(
            f"{name} images are always {entry.info.input_size[-1]}px; image_size={image_size}"
        )
    if entry.policies:
        options["policies"] = policies or imagenet.Policies()
    elif policies not in (None, imagenet.Policies()):
        raise ValueError(f"{name} has no randaugment / color_jitter / random_erasing; they apply to imagenet")
    return entry.build(split, root, limit=limit, **options)
