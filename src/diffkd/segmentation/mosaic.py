"""Fashion-MNIST mosaics as an offline segmentation set, written in the Cityscapes folder format.

A canvas is a grid of cells; each cell holds a Fashion-MNIST item (with probability `fill`) at a
random offset. A pixel's class is 1 + the item's class where the item's pixel is nonzero, and 0
(background) elsewhere: 11 classes. Train canvases draw items from Fashion-MNIST train, val canvases
from its test split. The generator is deterministic (one seeded torch.Generator per split), and
writes `leftImg8bit/{train,val}/fashion/*_leftImg8bit.png` (grey) with
`gtFine/{train,val}/fashion/*_gtFine_labelTrainIds.png`, plus `mosaic.json` describing the set.

    python -m diffkd.segmentation.mosaic OUT_DIR [--grid 2 --cell 32 --train 6000 --val 1000 --seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from ..data import fashion_mnist
from .cityscapes import IMAGE_DIR, IMAGE_SUFFIX, LABEL_DIR

CLASSES: tuple[str, ...] = ("background", *fashion_mnist.CLASSES)
CITY = "fashion"
KIND = "labelTrainIds"
ITEM = 28  # Fashion-MNIST items are 28x28
SOURCE_SPLIT = {"train": "train", "val": "test"}


@dataclass(frozen=True)
class MosaicSpec:
    """The size of the set: grid x grid cells of `cell` pixels, image counts per split, fill rate, seed."""

    grid: int = 2
    cell: int = 32
    train: int = 6000
    val: int = 1000
    fill: float = 0.75
    seed: int = 0

    @property
    def canvas(self) -> int:
        """Side of a square canvas in pixels."""
        return self.grid * self.cell

    def check(self) -> None:
        """Raise ValueError for sizes that cannot make a mosaic."""
        if self.cell < ITEM:
            raise ValueError(f"cell must be at least {ITEM} pixels (an item), got {self.cell}")
        if self.grid < 1 or self.train < 1 or self.val < 1:
            raise ValueError(f"grid, train and val must be at least 1, got {self.grid}, {self.train}, {self.val}")
        if not 0 < self.fill <= 1:
            raise ValueError(f"fill must be in (0, 1], got {self.fill}")


def compose(items: Tensor, classes: Tensor, spec: MosaicSpec, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One canvas and its label map ((H,W) uint8 each) from source items (N,28,28) and their classes (N,)."""
    image = torch.zeros(spec.canvas, spec.canvas, dtype=torch.uint8)
    label = torch.zeros_like(image)
    cells = spec.grid * spec.grid
    occupied = torch.rand(cells, generator=generator) < spec.fill
    picks = torch.randint(0, len(items), (cells,), generator=generator)
    offsets = torch.randint(0, spec.cell - ITEM + 1, (cells, 2), generator=generator)
    for cell in occupied.nonzero().flatten().tolist():
        top = (cell // spec.grid) * spec.cell + int(offsets[cell, 0])
        left = (cell % spec.grid) * spec.cell + int(offsets[cell, 1])
        item = items[picks[cell]]
        window = (slice(top, top + ITEM), slice(left, left + ITEM))
        image[window] = item
        label[window] = torch.where(item > 0, int(classes[picks[cell]]) + 1, 0).to(torch.uint8)
    return image, label


def _write_split(out: Path, split: str, count: int, spec: MosaicSpec, source_root: str | Path | None) -> None:
    """Render `count` canvases of one split into out/leftImg8bit/<split>/fashion and out/gtFine/<split>/fashion."""
    images, classes = fashion_mnist.load(*fashion_mnist.locate(SOURCE_SPLIT[split], source_root, download=False))
    items = images[:, 0]
    generator = torch.Generator().manual_seed(spec.seed * 1000 + list(SOURCE_SPLIT).index(split))
    image_dir, label_dir = out / IMAGE_DIR / split / CITY, out / LABEL_DIR / split / CITY
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    for i in range(count):
        image, label = compose(items, classes, spec, generator)
        stem = f"{CITY}_{i:06d}_000000"
        Image.fromarray(image.numpy()).save(image_dir / f"{stem}{IMAGE_SUFFIX}")
        Image.fromarray(label.numpy()).save(label_dir / f"{stem}_gtFine_{KIND}.png")


def generate(out: str | Path, spec: MosaicSpec = MosaicSpec(), source_root: str | Path | None = None) -> Path:
    """Write the mosaic set to `out` (which must not exist); built in a temporary folder, then renamed."""
    spec.check()
    out = Path(out).expanduser()
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another folder for the mosaic set")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for split in SOURCE_SPLIT:
            _write_split(tmp, split, getattr(spec, split), spec, source_root)
        (tmp / "mosaic.json").write_text(json.dumps({"spec": asdict(spec), "classes": CLASSES}, indent=1))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure(root: str | Path, spec: MosaicSpec = MosaicSpec(), source_root: str | Path | None = None) -> Path:
    """The mosaic set at `root`, generated first if the folder does not exist yet."""
    root = Path(root).expanduser()
    if root.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        return generate(root, spec, source_root)
    except OSError:
        if (root / "mosaic.json").is_file():  # another process finished the same set first
            return root
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write a mosaic set of the given size."""
    parser = argparse.ArgumentParser(prog="python -m diffkd.segmentation.mosaic", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to create")
    defaults = MosaicSpec()
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field}", type=type(value), default=value, help=f"default {value}")
    parser.add_argument("--fmnist-root", help="Fashion-MNIST folder (default: Debian's dataset-fashion-mnist)")
    args = parser.parse_args(argv)
    spec = MosaicSpec(**{k: getattr(args, k) for k in asdict(defaults)})
    path = generate(args.out, spec, args.fmnist_root)
    print(f"wrote {spec.train} train and {spec.val} val {spec.canvas}x{spec.canvas} mosaics to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
