"""The user's own images: `root/train/<class>/*` and `root/val/<class>/*`, any format PIL reads.

Class names are the sub-folder names (sorted), and train and val must have the same ones. Every
file in a class folder is an image (hidden files, starting with ".", are skipped); one PIL cannot
read is an error naming it, found when the split is built (each file's header is read), not in the
middle of training. Transforms are ImageNet's (`imagenet.make_transform`): image_size and the
training policies apply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from .imagenet import FOLDERS, Policies, make_transform
from .subset import spread_indices

LAYOUT = "<root>/train/<class>/<image> and <root>/val/<class>/<image>"


def _visible(folder: Path) -> list[Path]:
    """The entries of a folder that are not hidden, sorted by name."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _split_folder(root: str | Path | None, split: str) -> Path:
    """root/train or root/val, or a FileNotFoundError saying what data.root must hold."""
    if root is None:
        raise FileNotFoundError(f"data.root: required for data.name=image_folder (a folder laid out as {LAYOUT})")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"data.root {str(base)!r} (data.name=image_folder) not found; it must be laid out as {LAYOUT}")
    folder = base / FOLDERS[split]
    if not folder.is_dir():
        raise FileNotFoundError(f"data.root {str(base)!r} has no {FOLDERS[split]}/ folder; it must be laid out as {LAYOUT}")
    return folder


def _class_names(folder: Path) -> list[str]:
    return [p.name for p in _visible(folder) if p.is_dir()]


def read_classes(root: str | Path | None) -> list[str]:
    """The class names (sorted sub-folders of train/), checked to be the same as those of val/."""
    train, val = (_class_names(_split_folder(root, split)) for split in ("train", "val"))
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        raise ValueError(
            f"image folder {str(root)!r}: train/ and val/ have different class folders (only in train: "
            f"{only_train or 'none'}; only in val: {only_val or 'none'}); both need the same classes"
        )
    if not train:
        raise ValueError(f"image folder {str(root)!r}: train/ holds no class folders; lay it out as {LAYOUT}")
    return train


def _check_readable(path: Path) -> None:
    """Read the file's header, so a file PIL cannot open fails now, by name."""
    try:
        with Image.open(path) as image:
            image.size
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{path} is not an image PIL can read ({type(err).__name__}); remove it or replace it") from err


class ImageFolderSet(Dataset):
    """(image tensor, class index) pairs of one split; class index = position in the sorted class names."""

    def __init__(self, folder: Path, classes: list[str], transform: Callable[[Image.Image], Tensor],
                 limit: int | None = None) -> None:
        samples: list[tuple[Path, int]] = []
        for index, name in enumerate(classes):
            files = [p for p in _visible(folder / name) if p.is_file()]
            if not files:
                raise ValueError(f"class folder {folder / name} holds no images; add some or remove the folder "
                                 "(from train/ and val/)")
            samples += [(path, index) for path in files]
        keep = spread_indices(len(samples), limit)
        self.samples = samples if keep is None else [samples[i] for i in keep]
        for path, _ in self.samples:
            _check_readable(path)
        self.classes = list(classes)
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"{path} is not an image PIL can read ({type(err).__name__}: {err})") from err
        return self.transform(rgb), label


def build(
    split: str,
    root: str | Path | None = None,
    *,
    download: bool = False,
    augment: bool = False,
    limit: int | None = None,
    image_size: int = 224,
    policies: Policies = Policies(),
) -> ImageFolderSet:
    """One split ("val" and "test" both read val/) with ImageNet's transforms at image_size."""
    if download:
        raise ValueError("data.download does not apply to data.name=image_folder (it reads your own folder)")
    classes = read_classes(root)
    return ImageFolderSet(_split_folder(root, split), classes, make_transform(image_size, augment, policies), limit)
