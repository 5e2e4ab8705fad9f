"""Fashion-MNIST mosaics: a small, deterministic, offline detection dataset in COCO format.

Each image is a square canvas (black, or a random texture with `background="texture"`) with a few
Fashion-MNIST items pasted at random scales and places (train items from Fashion-MNIST's train split, val items from its test split). An item's box
is the extent of its nonzero pixels after scaling; its category is its Fashion-MNIST class (ids 1..10).
Boxes overlap at most `max_overlap` IoU; where items touch, the brighter pixel wins. `classes` keeps
some Fashion-MNIST classes only (numbered 1..k in the order given), so two specs with disjoint
classes make a source and a target task. The same spec always writes the same files, so the whole
detection pipeline can run and be tested without COCO.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.ops import box_iou

from ..data import build_dataset
from ..data.fashion_mnist import CLASSES

ITEM_SIZE = 28  # Fashion-MNIST items are 28x28
SPLITS = {"train": "train", "val": "test"}  # mosaic split -> Fashion-MNIST split its items come from
SPEC_FILE = "mosaics.json"
BACKGROUNDS = ("black", "texture")
TEXTURE_MAX = 110  # the brightest background pixel: items (up to 255) stay the brightest things on the canvas


@dataclass(frozen=True)
class MosaicSpec:
    """Everything that determines the generated files."""

    canvas: int = 128
    train_images: int = 1000
    val_images: int = 250
    min_items: int = 1
    max_items: int = 4
    min_scale: float = 1.0  # item side = 28 * scale pixels
    max_scale: float = 2.5
    max_overlap: float = 0.3
    seed: int = 0
    classes: tuple[int, ...] | None = None  # Fashion-MNIST class indices to draw from (None: all ten)
    background: str = "black"  # or "texture": smooth random shading plus pixel noise, up to TEXTURE_MAX

    def __post_init__(self) -> None:
        """Reject specs that cannot produce an image."""
        if not 1 <= self.min_items <= self.max_items:
            raise ValueError(f"mosaics need 1 <= min_items <= max_items, got {self.min_items}, {self.max_items}")
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"mosaics need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}")
        if round(ITEM_SIZE * self.max_scale) > self.canvas:
            raise ValueError(f"items of up to {ITEM_SIZE * self.max_scale:.0f} px do not fit a {self.canvas} px canvas")
        if self.train_images < 1 or self.val_images < 1:
            raise ValueError("mosaics need at least one train and one val image")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"mosaic background must be one of {', '.join(BACKGROUNDS)}, got {self.background!r}")
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))
            if not self.classes or len(set(self.classes)) != len(self.classes) or not all(
                    isinstance(c, int) and 0 <= c < len(CLASSES) for c in self.classes):
                raise ValueError(f"mosaic classes must be distinct Fashion-MNIST class indices 0..{len(CLASSES) - 1}, "
                                 f"got {self.classes!r}")


def scaled_item(item: Tensor, side: int) -> tuple[Tensor, Tensor] | None:
    """Resize a (28, 28) uint8 item to side x side; return it and its nonzero extent (x0, y0, x1, y1), or None if blank."""
    resized = F.interpolate(item[None, None].float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    pixels = resized[0, 0].round().clamp(0, 255).to(torch.uint8)
    rows, cols = pixels.any(dim=1).nonzero(), pixels.any(dim=0).nonzero()
    if len(rows) == 0:
        return None
    extent = torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)
    return pixels, extent


def background(spec: MosaicSpec, generator: torch.Generator) -> Tensor:
    """The empty canvas (uint8): black, or a texture: an 8 x 8 grid of random shades smoothly upsampled, plus
    pixel noise, within 0..TEXTURE_MAX."""
    if spec.background == "black":
        return torch.zeros(spec.canvas, spec.canvas, dtype=torch.uint8)
    shades = torch.rand(1, 1, 8, 8, generator=generator)
    smooth = F.interpolate(shades, size=(spec.canvas, spec.canvas), mode="bicubic", align_corners=False)[0, 0]
    noise = torch.randn(spec.canvas, spec.canvas, generator=generator) * 0.08
    return ((smooth + noise).clamp(0, 1) * TEXTURE_MAX).round().to(torch.uint8)


def compose(items: Tensor, labels: Tensor, spec: MosaicSpec, generator: torch.Generator) -> tuple[Tensor, list[tuple[list[float], int]]]:
    """One canvas (uint8, canvas x canvas) and its [(xywh box, class index)], drawing from `generator`."""
    canvas = background(spec, generator)
    boxes = torch.zeros(0, 4)
    placed: list[tuple[list[float], int]] = []
    count = int(torch.randint(spec.min_items, spec.max_items + 1, (), generator=generator))
    for _ in range(count):
        index = int(torch.randint(len(items), (), generator=generator))
        scale = spec.min_scale + (spec.max_scale - spec.min_scale) * float(torch.rand((), generator=generator))
        side = round(ITEM_SIZE * scale)
        result = scaled_item(items[index, 0], side)
        if result is None:
            continue
        pixels, extent = result
        for _attempt in range(20):
            x, y = (int(v) for v in torch.randint(spec.canvas - side + 1, (2,), generator=generator))
            box = extent + torch.tensor([x, y, x, y], dtype=torch.float32)
            if len(boxes) == 0 or box_iou(box[None], boxes).max() <= spec.max_overlap:
                break
        else:
            continue  # no free place for this item
        region = canvas[y : y + side, x : x + side]
        torch.maximum(region, pixels, out=region)
        boxes = torch.cat([boxes, box[None]])
        x0, y0, x1, y1 = box.tolist()
        placed.append(([x0, y0, x1 - x0, y1 - y0], int(labels[index])))
    return canvas, placed


def write_split(folder: Path, split: str, spec: MosaicSpec, source_root: str | Path | None = None) -> None:
    """Write folder/<split>/*.png and folder/annotations/instances_<split>.json."""
    source = build_dataset("fashion_mnist", SPLITS[split], source_root, augment=False)
    items, labels = source.images, source.targets
    kept = spec.classes or tuple(range(len(CLASSES)))
    if spec.classes is not None:  # keep those classes' items, labelled by their position in `classes`
        chosen = torch.isin(labels, torch.tensor(kept))
        items, labels = items[chosen], torch.tensor([kept.index(int(c)) for c in labels[chosen]])
    count = spec.train_images if split == "train" else spec.val_images
    generator = torch.Generator().manual_seed(spec.seed * 2 + (split == "val"))
    (folder / split).mkdir(parents=True)
    (folder / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        canvas, placed = compose(items, labels, spec, generator)
        name = f"{image_id:06d}.png"
        Image.fromarray(canvas.numpy(), mode="L").save(folder / split / name)
        images.append({"id": image_id, "file_name": name, "width": spec.canvas, "height": spec.canvas})
        for box, cls in placed:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cls + 1, "bbox": box,
                "area": box[2] * box[3], "iscrowd": 0,
            })  # fmt: skip
    categories = [{"id": i + 1, "name": CLASSES[c], "supercategory": "fashion"} for i, c in enumerate(kept)]
    document = {"images": images, "annotations": annotations, "categories": categories}
    (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))


def ensure_mosaics(root: str | Path, spec: MosaicSpec = MosaicSpec(), source_root: str | Path | None = None) -> Path:
    """The mosaic folder for `spec` at root, generated first if absent; refuses a folder made with another spec.

    Generation writes into a temporary folder beside root and renames it, so an interrupted run never
    leaves half a dataset behind, and processes generating at once (DDP) all end up with one folder.
    """
    root = Path(root).expanduser()
    if not (root / SPEC_FILE).is_file() and root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} exists, is not empty and holds no {SPEC_FILE}; choose an empty or new folder for the mosaics")
    if not (root / SPEC_FILE).is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
        try:
            for split in SPLITS:
                write_split(tmp, split, spec, source_root)
            (tmp / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=1))
            tmp.rename(root)  # replaces an empty folder; fails if another process got there first
        except OSError:
            if not (root / SPEC_FILE).is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _check_spec(root, spec)
    return root


def _check_spec(root: Path, spec: MosaicSpec) -> None:
    """Refuse a mosaic folder generated from another spec."""
    found, wanted = json.loads((root / SPEC_FILE).read_text()), json.loads(json.dumps(asdict(spec)))
    changed = ", ".join(f"{k}: {found.get(k)!r} there, {v!r} asked" for k, v in wanted.items() if found.get(k) != v)
    if changed:  # a folder written before a field existed holds that field's default
        raise ValueError(f"{root} holds mosaics of another spec ({changed}); use another data.root or delete it")
