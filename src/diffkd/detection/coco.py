"""COCO-format detection data: a folder of images plus an instances JSON, read with torchvision's CocoDetection.

Items are (float image 3xHxW in [0, 1], target) with target = {"boxes": (n, 4) float xyxy in pixels,
"labels": (n,) int64 in 1..K, "image_id": int64}. Labels are contiguous: the file's categories sorted
by id get 1..K, and 0 is the background, as torchvision's detectors expect.

What counts as bad input, and what happens:
* a missing annotation file or image folder, invalid JSON, or a file without images/annotations/
  categories lists: an error naming the file;
* an annotation whose category or image is not in the file: an error naming the annotation;
* a listed image file that is missing or empty (zero bytes): an error naming the files, raised when
  the split is opened; an image file that cannot be decoded: an error naming it, when it is read;
* images without usable boxes (no annotations, only crowd regions, or only zero-size boxes) are
  skipped for training (they give the detector nothing to learn) and kept for evaluation, where
  detections on them count as false positives, as in the official COCO evaluation.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import CocoDetection
from torchvision.transforms.functional import pil_to_tensor

from ..data.subset import spread_indices

# Split folder names tried in order: COCO 2017's, then plain ones (what the mosaic generator writes).
SPLIT_NAMES = {"train": ("train2017", "train"), "test": ("val2017", "val", "test")}
_SHOWN = 5  # how many offending items an error lists


@dataclass(frozen=True)
class Categories:
    """The categories of an annotation file, sorted by id; label i (1..K) is the i-th of them."""

    ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_coco(cls, categories: list[dict[str, Any]]) -> Categories:
        """From the "categories" list of a COCO file (order of the file does not matter)."""
        ordered = sorted(categories, key=lambda c: c["id"])
        return cls(tuple(c["id"] for c in ordered), tuple(str(c.get("name", c["id"])) for c in ordered))

    @property
    def num_classes(self) -> int:
        """What a torchvision detector's num_classes must be: K categories plus the background."""
        return len(self.ids) + 1

    def labels(self) -> dict[int, int]:
        """category id -> contiguous label 1..K."""
        return {cid: i + 1 for i, cid in enumerate(self.ids)}

    def check_same(self, other: Categories, mine: str, theirs: str) -> None:
        """Raise if two files (train and val) do not list the same categories under the same ids."""
        if self == other:
            return
        a, b = dict(zip(self.ids, self.names)), dict(zip(other.ids, other.names))
        only_a = [f"{i} {a[i]!r}" for i in a if i not in b]
        only_b = [f"{i} {b[i]!r}" for i in b if i not in a]
        renamed = [f"{i}: {a[i]!r} vs {b[i]!r}" for i in a if i in b and a[i] != b[i]]
        raise ValueError(
            f"category ids do not match between {mine} and {theirs}: only in the first "
            f"{_listed(only_a)}; only in the second {_listed(only_b)}; renamed {_listed(renamed)}. "
            "Train and test annotation files must list the same categories (same ids and names)"
        )


def _listed(items: list[str]) -> str:
    """The first few items and the count, or 'none'."""
    if not items:
        return "none"
    more = f", ... ({len(items)} in all)" if len(items) > _SHOWN else ""
    return "[" + ", ".join(items[:_SHOWN]) + more + "]"


def find_split(root: str | Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of a split: root/<name>/ and root/annotations/instances_<name>.json."""
    root = Path(root).expanduser()
    if split not in SPLIT_NAMES:
        raise ValueError(f"unknown detection split {split!r}; expected one of {', '.join(SPLIT_NAMES)}")
    tried = []
    for name in SPLIT_NAMES[split]:
        annotations = root / "annotations" / f"instances_{name}.json"
        tried.append(str(annotations))
        if annotations.is_file():
            images = root / name
            if not images.is_dir():
                raise FileNotFoundError(f"{annotations} exists but its image folder {images} does not")
            return images, annotations
    raise FileNotFoundError(
        f"no annotation file for the {split} split of the COCO-format folder {root}; looked for "
        f"{', '.join(tried)} (layout: <root>/annotations/instances_<split>.json and images in <root>/<split>/)"
    )


def _check_annotations(data: Any, path: Path) -> None:
    """Refuse a COCO file whose lists are missing or whose annotations point at unknown categories/images."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a COCO annotation file holds a JSON object, got {type(data).__name__}")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise ValueError(f"{path}: not a COCO instances file, it has no {' / '.join(missing)} list")
    if not data["categories"]:
        raise ValueError(f"{path}: the categories list is empty")
    categories = [c.get("id") for c in data["categories"]]
    if len(set(categories)) != len(categories) or not all(isinstance(c, int) for c in categories):
        raise ValueError(f"{path}: category ids must be distinct integers, got {categories}")
    known, images = set(categories), {img.get("id") for img in data["images"]}
    bad_category = [a for a in data["annotations"] if a.get("category_id") not in known]
    if bad_category:
        shown = [f"annotation {a.get('id')} (image {a.get('image_id')}): category_id {a.get('category_id')}" for a in bad_category]
        raise ValueError(
            f"{path}: {len(bad_category)} annotation(s) name a category that is not in the file's categories "
            f"{sorted(known)}: {_listed(shown)}"
        )
    orphans = [f"annotation {a.get('id')}: image_id {a.get('image_id')}" for a in data["annotations"] if a.get("image_id") not in images]
    if orphans:
        raise ValueError(f"{path}: {len(orphans)} annotation(s) name an image that is not in the file: {_listed(orphans)}")
    bad_box = [
        f"annotation {a.get('id')}: bbox {a.get('bbox')!r}" for a in data["annotations"]
        if not (isinstance(a.get("bbox"), list) and len(a["bbox"]) == 4)
    ]
    if bad_box:
        raise ValueError(f"{path}: bbox must be [x, y, width, height]: {_listed(bad_box)}")


class CocoImages(CocoDetection):
    """torchvision's CocoDetection with errors that name the image file when it cannot be read."""

    def __init__(self, root: str | Path, annotation_file: str | Path) -> None:
        super().__init__(str(root), str(annotation_file))
        self.annotation_file = Path(annotation_file)

    def _load_image(self, id: int) -> Image.Image:  # noqa: A002 (torchvision's signature)
        path = Path(self.root) / self.coco.loadImgs(id)[0]["file_name"]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(f"image file {path} (image id {id}) does not exist") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"image file {path} (image id {id}) cannot be read as an image: {err}") from err


def open_coco(images: str | Path, annotations: str | Path) -> CocoImages:
    """Parse an annotation file with pycocotools (quietly), with errors naming the file."""
    images, annotations = Path(images), Path(annotations)
    if not annotations.is_file():
        raise FileNotFoundError(f"annotation file {annotations} does not exist")
    if not images.is_dir():
        raise FileNotFoundError(f"image folder {images} does not exist")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = CocoImages(str(images), str(annotations))
    except json.JSONDecodeError as err:
        raise ValueError(f"{annotations} is not valid JSON: {err}") from err
    except (KeyError, TypeError, AssertionError) as err:
        raise ValueError(f"{annotations} is not a COCO instances file (pycocotools: {type(err).__name__} {err})") from err
    _check_annotations(coco.coco.dataset, annotations)
    return coco


def open_split(root: str | Path, split: str) -> CocoImages:
    """The "train" or "test" split of a COCO-format folder (see `find_split`)."""
    return open_coco(*find_split(root, split))


def usable(annotation: dict[str, Any]) -> bool:
    """A box a detector can learn from: not a crowd region and of positive width and height."""
    _, _, w, h = annotation["bbox"]
    return not annotation.get("iscrowd", 0) and w > 0 and h > 0


def to_target(annotations: list[dict[str, Any]], labels: dict[int, int], image_id: int, width: int, height: int) -> dict[str, Tensor]:
    """COCO annotations of one image -> boxes xyxy (clipped to the image), labels 1..K and the image id."""
    kept = [a for a in annotations if usable(a)]
    boxes = torch.tensor([a["bbox"] for a in kept], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    classes = torch.tensor([labels[a["category_id"]] for a in kept], dtype=torch.int64)
    return {"boxes": boxes[keep], "labels": classes[keep], "image_id": torch.tensor(image_id, dtype=torch.int64)}


def hflip(image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Mirror an image and its boxes left to right."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes}


class CocoDetectionSet(Dataset):
    """One split of a COCO-format folder as (image, target) pairs; `.coco` is the pycocotools ground truth.

    train=True keeps only images with usable boxes; augment flips half the images left to right
    (drawn from the global torch RNG). limit keeps that many images, evenly spaced by image id.
    """

    def __init__(self, source: CocoImages, *, train: bool, augment: bool = False, limit: int | None = None):
        self.source, self.coco = source, source.coco
        self.images, self.annotations = Path(source.root), source.annotation_file
        self.categories = Categories.from_coco(self.coco.dataset["categories"])
        self.labels = self.categories.labels()
        ids = list(self.source.ids)
        if train:
            ids = [i for i in ids if any(usable(a) for a in self.coco.imgToAnns.get(i, []))]
            if not ids:
                raise ValueError(f"{self.annotations}: no image has a usable box (non-crowd, positive size) to train on")
        keep = spread_indices(len(ids), limit)
        self.ids = ids if keep is None else [ids[i] for i in keep]
        self.augment = augment
        self._check_files()

    def _check_files(self) -> None:
        """Fail now, naming them, if listed image files are missing or empty (zero bytes)."""
        missing, empty = [], []
        for image_id in self.ids:
            path = self.images / self.coco.imgs[image_id]["file_name"]
            if not path.is_file():
                missing.append(str(path))
            elif path.stat().st_size == 0:
                empty.append(str(path))
        if missing:
            raise FileNotFoundError(f"{len(missing)} image file(s) listed in {self.annotations} do not exist: {_listed(missing)}")
        if empty:
            raise ValueError(f"{len(empty)} image file(s) listed in {self.annotations} are empty (0 bytes): {_listed(empty)}")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        image_id = self.ids[index]
        image = pil_to_tensor(self.source._load_image(image_id)).float().div_(255)
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
        target = to_target(annotations, self.labels, image_id, image.shape[-1], image.shape[-2])
        if self.augment and torch.rand(()) < 0.5:
            image, target = hflip(image, target)
        return image, target


def collate(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Keep a batch as lists: images of different sizes and targets with different box counts."""
    images, targets = zip(*batch)
    return list(images), list(targets)
