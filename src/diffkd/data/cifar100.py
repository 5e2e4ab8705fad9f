"""CIFAR-100 from torchvision's on-disk pickles, read with no checksum and no code run."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from .cache import cache_dir
from .in_memory import InMemoryImages

FOLDER = "cifar-100-python"
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
NUM_CLASSES = 100
# The only globals a CIFAR pickle needs: numpy's array and dtype builders, and (protocol 2 written
# by Python 3) the codec call that turns bytes back into bytes. Anything else is refused, so loading
# a file cannot run code.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers and refuses every other global."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    """Load one pickle (bytes keys, as Python 2 wrote them) or raise ValueError naming the file."""
    with open(path, "rb") as f:
        try:
            content = _ArrayUnpickler(f, encoding="bytes").load()
        except Exception as err:  # whatever a damaged stream makes the unpickler raise
            raise ValueError(f"{path}: not a valid CIFAR-100 pickle ({err})") from err
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a dict, found {type(content).__name__}")
    return content


def _folder(root: Path) -> Path:
    """The folder holding train/test/meta: root/cifar-100-python, or root if it is that folder."""
    return root if (root / "meta").is_file() and not (root / FOLDER).is_dir() else root / FOLDER


def locate(split: str, root: str | Path | None, download: bool) -> Path:
    """The dataset folder under root (default ~/.cache/diffkd/cifar100); downloads it if asked."""
    root = Path(root).expanduser() if root is not None else cache_dir("cifar100")
    folder = _folder(root)
    if not (folder / split).is_file() and download:
        from torchvision.datasets import CIFAR100

        CIFAR100(root=str(root), train=split == "train", download=True)
        folder = root / FOLDER
    for name in (split, "meta"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"CIFAR-100 file {folder / name} not found. Either pass data.download=true "
                f"(torchvision fetches it into {root}), or download "
                f"https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, extract it and pass "
                f"data.root=/path/to/folder holding the extracted {FOLDER}/ (train, test, meta)"
            )
    return folder


def load(folder: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read one split: (N,3,32,32) uint8 images, (N,) int64 fine labels and the 100 class names."""
    path = folder / split
    content = _unpickle(path)
    data, labels = content.get(b"data"), content.get(b"fine_labels")
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        shown = getattr(data, "shape", type(data).__name__)
        raise ValueError(f"{path}: b'data' must be an N x 3072 uint8 array, found {shown}")
    if labels is None or len(labels) != len(data):
        raise ValueError(f"{path}: b'fine_labels' must hold one label per image ({len(data)})")
    targets = torch.tensor(list(labels), dtype=torch.long)
    if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < NUM_CLASSES:
        raise ValueError(f"{path}: fine labels must lie in 0..{NUM_CLASSES - 1}")
    names = _unpickle(folder / "meta").get(b"fine_label_names")
    if names is None or len(names) != NUM_CLASSES:
        raise ValueError(f"{folder / 'meta'}: b'fine_label_names' must list {NUM_CLASSES} names")
    images = torch.from_numpy(np.array(data)).view(
        -1, 3, 32, 32
    )  # rows are channel-major R, G, B planes
    return images, targets, [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def build(
    split: str,
    root: str | Path | None = None,
    *,
    download: bool = False,
    augment: bool = False,
    limit: int | None = None,
) -> InMemoryImages:
    """The split as 3x32x32 normalized images; augmentation: random crop 32 (padding 4) + flip."""
    images, targets, classes = load(locate(split, root, download), split)
    return InMemoryImages(
        images,
        targets,
        mean=MEAN,
        std=STD,
        padding=4,
        augment=augment,
        classes=classes,
        limit=limit,
    )
