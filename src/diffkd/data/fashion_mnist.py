"""Fashion-MNIST from idx files: Debian's dataset-fashion-mnist, a given folder, or a download."""

from __future__ import annotations

from pathlib import Path

import torch

from .cache import cache_dir
from .idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from .in_memory import InMemoryImages

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = (0.2860,), (0.3530,)
CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
PREFIX = {"train": "train", "test": "t10k"}


def _file_names(split: str) -> tuple[str, str]:
    """Base names (no .gz) of the image and label files of a split."""
    return f"{PREFIX[split]}-images-idx3-ubyte", f"{PREFIX[split]}-labels-idx1-ubyte"


def _find(folder: Path, split: str) -> tuple[Path, Path] | None:
    """The split's (images, labels) files in folder, or in folder/FashionMNIST/raw (torchvision)."""
    for place in (folder, folder / "FashionMNIST" / "raw"):
        found = [next((p for p in (place / n, place / f"{n}.gz") if p.is_file()), None)
                 for n in _file_names(split)]  # fmt: skip
        if all(found):
            return found[0], found[1]
    return None


def _not_found(split: str, looked: list[Path], target: Path) -> FileNotFoundError:
    """The error for a missing split, spelling out the three ways to get the files."""
    images, labels = _file_names(split)
    every = ", ".join(f"{n}.gz" for s in PREFIX for n in _file_names(s))
    return FileNotFoundError(
        f"Fashion-MNIST {split} files ({images}[.gz], {labels}[.gz]) not found in: "
        f"{', '.join(map(str, looked))}. Get them one of these ways:\n"
        f"  sudo apt-get install dataset-fashion-mnist   (installs them into {DEBIAN_DIR})\n"
        f"  data.root=/path/to/folder   (a folder holding {every}; .gz or unpacked)\n"
        f"  data.download=true   (torchvision downloads them into {target})"
    )


def locate(split: str, root: str | Path | None, download: bool) -> tuple[Path, Path]:
    """The split's files: in root if given, else the Debian folder, else downloaded if asked."""
    target = Path(root).expanduser() if root is not None else cache_dir("fashion-mnist")
    looked = [target] if root is not None else [DEBIAN_DIR, target]
    for folder in looked:
        if (found := _find(folder, split)) is not None:
            return found
    if not download:
        raise _not_found(split, looked, target)
    from torchvision.datasets import FashionMNIST

    FashionMNIST(root=str(target), train=split == "train", download=True)
    if (found := _find(target, split)) is None:
        raise _not_found(split, [target], target)
    return found


def load(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and cross-check one split: (N,1,28,28) uint8 images and (N,) int64 labels in 0..9."""
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: images are {tuple(images.shape[1:])}, expected 28x28")
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels"
        )
    if len(labels) and int(labels.max()) >= len(CLASSES):
        raise ValueError(f"{labels_path}: label {int(labels.max())} outside 0..{len(CLASSES) - 1}")
    return images.unsqueeze(1), labels.long()


def build(
    split: str,
    root: str | Path | None = None,
    *,
    download: bool = False,
    augment: bool = False,
    limit: int | None = None,
) -> InMemoryImages:
    """The split as 1x28x28 normalized images; augmentation: random crop 28 (padding 2) + flip."""
    images, labels = load(*locate(split, root, download))
    return InMemoryImages(
        images, labels, mean=MEAN, std=STD, padding=2, augment=augment, classes=CLASSES, limit=limit
    )
