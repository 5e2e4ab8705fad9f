"""The Cityscapes folder format: leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_gtFine_<kind>.png.

`kind` is "labelIds" (the 34 Cityscapes ids, mapped to the 19 train ids here) or "labelTrainIds"
(train ids already, as Cityscapes' own scripts and our mosaic generator write them). Pairs and image
sizes are checked when the dataset is built, label values when an item is read, each with the file
named in the error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..data.subset import spread_indices
from .labels import apply_table
from .transforms import train_transform

IMAGE_DIR, LABEL_DIR = "leftImg8bit", "gtFine"
IMAGE_SUFFIX = "_leftImg8bit.png"


@dataclass(frozen=True)
class Pair:
    """One image file and its label file."""

    image: Path
    label: Path


def label_path(root: Path, image: Path, split: str, kind: str) -> Path:
    """The label file that belongs to an image: same city and stem, under gtFine, suffix _gtFine_<kind>.png."""
    stem = image.name[: -len(IMAGE_SUFFIX)]
    return root / LABEL_DIR / split / image.parent.name / f"{stem}_gtFine_{kind}.png"


def find_pairs(root: str | Path, split: str, kind: str) -> list[Pair]:
    """Every (image, label) pair of a split, sorted; raises if the folder is empty or a label is missing."""
    root = Path(root).expanduser()
    folder = root / IMAGE_DIR / split
    images = sorted(folder.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise FileNotFoundError(
            f"no images found in {folder} (expected {IMAGE_DIR}/{split}/<city>/<name>{IMAGE_SUFFIX} under "
            f"data.root={root})"
        )
    pairs = [Pair(image, label_path(root, image, split, kind)) for image in images]
    missing = [p for p in pairs if not p.label.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(pairs)} {split} images have no label file, e.g. {missing[0].image} needs "
            f"{missing[0].label}"
        )
    return pairs


def check_sizes(pairs: Sequence[Pair]) -> None:
    """Image and label of every pair must have the same width and height (read from the PNG headers)."""
    for pair in pairs:
        with Image.open(pair.image) as image, Image.open(pair.label) as label:
            if image.size != label.size:
                raise ValueError(
                    f"image {pair.image} is {image.size[0]}x{image.size[1]} but its label {pair.label} is "
                    f"{label.size[0]}x{label.size[1]} (width x height); they must match"
                )


def read_image(path: Path, mode: str) -> Tensor:
    """A PNG as a (C,H,W) uint8 tensor in PIL mode "RGB" or "L"."""
    with Image.open(path) as image:
        array = np.asarray(image.convert(mode))
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()


def read_label(path: Path) -> Tensor:
    """A label PNG as an (H,W) uint8 tensor of its raw values (must be a single-channel image)."""
    with Image.open(path) as label:
        if label.mode not in ("L", "P", "I;16", "I"):
            raise ValueError(f"label file {path} has PIL mode {label.mode}; expected a single-channel PNG of ids")
        array = np.asarray(label)
    if array.max(initial=0) > 255:
        raise ValueError(f"label file {path} holds values above 255 ({int(array.max())}); expected ids in one byte")
    return torch.from_numpy(array.astype(np.uint8))


class CityscapesFolder(Dataset):
    """Items: (normalized float (C,H,W) image, int64 (H,W) train-id label; IGNORE where not evaluated).

    With augment, each item is randomly scaled, padded, cropped to `crop_size` and flipped; without,
    it is returned at full resolution (single-scale evaluation).
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        kind: str,
        table: Tensor,
        table_what: str,
        mode: str,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = False,
        crop_size: tuple[int, int] = (512, 1024),
        scale_range: tuple[float, float] = (0.5, 2.0),
        flip: bool = True,
        limit: int | None = None,
    ) -> None:
        pairs = find_pairs(root, split, kind)
        keep = spread_indices(len(pairs), limit)
        self.pairs = pairs if keep is None else [pairs[i] for i in keep]
        check_sizes(self.pairs)
        self.table, self.table_what, self.mode = table, table_what, mode
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.augment, self.crop_size, self.scale_range, self.flip = augment, tuple(crop_size), tuple(scale_range), flip

    def __len__(self) -> int:
        return len(self.pairs)

    def label(self, index: int) -> Tensor:
        """The train-id label map of an item, unaugmented."""
        pair = self.pairs[index]
        return apply_table(read_label(pair.label), self.table, f"label file {pair.label}", self.table_what)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        pair = self.pairs[index]
        image = (read_image(pair.image, self.mode).float() / 255 - self.mean) / self.std
        label = self.label(index)
        if self.augment:
            image, label = train_transform(image, label, self.crop_size, self.scale_range, self.flip)
        return image, label
