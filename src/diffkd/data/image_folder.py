"""The user's own images: `root/train/<class>/*` and `root/val/<class>/*`, any format PIL reads.

Class names are the sub-folder names (sorted), and train and val must have the same ones (a folder
with val/ alone can be evaluated). The images of a class folder are its files with an image extension
(IMAGE_EXTENSIONS); other files (a README.md, notes.txt) and hidden files are skipped, and the number
skipped is logged. A file with an image extension that PIL cannot read is an error naming it, found
when the split is built (each file's header is read), not in the middle of training. Transforms are
ImageNet's (`imagenet.make_transform`): image_size and the training policies apply.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from .imagenet import FOLDERS, Policies, make_transform
from .subset import spread_indices

LAYOUT = "<root>/train/<class>/<image> and <root>/val/<class>/<image>"
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)  # compared lower-case

log = logging.getLogger("diffkd")


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
    """The class names (sorted sub-folders of train/), checked to be the same as those of val/; a root with
    val/ and no train/ (a test set alone, for `diffkd eval`) gives val/'s."""
    val = _class_names(_split_folder(root, "val"))
    if not (Path(root).expanduser() / FOLDERS["train"]).is_dir():
        if not val:
            raise ValueError(f"image folder {str(root)!r}: val/ holds no class folders; lay it out as {LAYOUT}")
        return val
    train = _class_names(_split_folder(root, "train"))
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


def _images(folder: Path) -> tuple[list[Path], list[Path]]:
    """A class folder's visible files: (those with an image extension, the others)."""
    files = [p for p in _visible(folder) if p.is_file()]
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    return images, [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]


class ImageFolderSet(Dataset):
    """(image tensor, class index) pairs of one split; class index = position in the sorted class names."""

    def __init__(self, folder: Path, classes: list[str], transform: Callable[[Image.Image], Tensor],
                 limit: int | None = None) -> None:
        samples: list[tuple[Path, int]] = []
        skipped: list[Path] = []
        for index, name in enumerate(classes):
            files, others = _images(folder / name)
            skipped += others
            if not files:
                raise ValueError(f"class folder {folder / name} holds no images (files with an image extension: "
                                 f"{', '.join(sorted(IMAGE_EXTENSIONS))}); add some or remove the folder "
                                 "(from train/ and val/)")
            samples += [(path, index) for path in files]
        if skipped:
            shown = ", ".join(str(p.relative_to(folder)) for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
            log.info("image folder %s: skipped %d file(s) without an image extension (%s)", folder, len(skipped), shown)
        self.folder = folder
        keep = spread_indices(len(samples), limit)
        self.samples = samples if keep is None else [samples[i] for i in keep]
        for path, _ in self.samples:
            _check_readable(path)
        self.classes = list(classes)
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def file_list_digest(self) -> str:
        """sha256 of the sorted relative paths and labels of the split's images: the same after the folder moved."""
        lines = sorted(f"{path.relative_to(self.folder).as_posix()}\t{label}" for path, label in self.samples)
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

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
