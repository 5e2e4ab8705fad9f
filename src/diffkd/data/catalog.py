"""The datasets by name: their shapes (DatasetInfo) and one `build_dataset` entry point."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from . import cifar100, fashion_mnist, image_folder, imagenet


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: class count, the (C,H,W) it is fed, and the class
    names where they come from the data (an image folder's sub-folders)."""

    name: str
    num_classes: int
    input_size: tuple[int, int, int]
    classes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class _Entry:
    """One catalog row: shapes, accepted splits, builder, and whether image_size and Policies apply.

    read_info, where set, reads the shapes from data.root instead (the classes of an image folder).
    """

    info: DatasetInfo
    splits: tuple[str, ...]
    build: Callable[..., Dataset]
    resizable: bool = False
    policies: bool = False
    read_info: Callable[[str | Path | None], DatasetInfo] | None = None


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
    "image_folder": _Entry(
        DatasetInfo("image_folder", 0, (3, 224, 224)), ("train", "test", "val"), image_folder.build, True, True,
        read_info=lambda root: _folder_info(image_folder.read_classes(root)),
    ),
}


def _folder_info(classes: list[str]) -> DatasetInfo:
    return DatasetInfo("image_folder", len(classes), (3, 224, 224), tuple(classes))


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


def dataset_info(name: str, root: str | Path | None = None) -> DatasetInfo:
    """Class count and model input size (C,H,W) of a dataset; only an image folder's are read from `root`."""
    entry = _CATALOG[_choose("dataset", name, available())]
    return entry.info if entry.read_info is None else entry.read_info(root)


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
    (imagenet and image_folder) sets the crop size, default 224; policies (the same two) add
    RandAugment, colour jitter and random erasing to the training transform.
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
        raise ValueError(f"{name} has no randaugment / color_jitter / random_erasing; they apply to imagenet and image_folder")
    return entry.build(split, root, limit=limit, **options)
