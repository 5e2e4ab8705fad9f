"""ImageNet (or any ImageNet-style tree) from class folders through torchvision's ImageFolder."""

from __future__ import annotations

from pathlib import Path

from torchvision import transforms
from torchvision.datasets import ImageFolder

from .subset import spread_indices

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FOLDERS = {"train": "train", "val": "val", "test": "val"}


def make_transform(image_size: int, augment: bool) -> transforms.Compose:
    """Train: RandomResizedCrop + flip; eval: resize to size/0.875 (256 for 224), center crop."""
    if augment:
        steps = [transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip()]
    else:
        steps = [transforms.Resize(round(image_size / 0.875)), transforms.CenterCrop(image_size)]
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def build(
    split: str,
    root: str | Path | None = None,
    *,
    download: bool = False,
    augment: bool = False,
    limit: int | None = None,
    image_size: int = 224,
) -> ImageFolder:
    """The split ("val" and "test" both read val/); `limit` keeps evenly spaced images."""
    folder = Path(root).expanduser() / FOLDERS[split] if root is not None else None
    if folder is None or not folder.is_dir():
        raise FileNotFoundError(
            f"ImageNet {split} folder {folder or '<data.root>/' + FOLDERS[split]} not found. Pass "
            f"data.root=/path/to/imagenet laid out as <root>/train/<wnid>/*.JPEG and "
            f"<root>/val/<wnid>/*.JPEG. The val images must be sorted into one folder per class "
            f"(the official val archive is flat; sort it with the devkit's ground-truth labels). "
            f"ImageNet cannot be downloaded automatically"
            + (" (data.download=true does not apply)." if download else ".")
        )
    dataset = ImageFolder(str(folder), transform=make_transform(image_size, augment))
    keep = spread_indices(len(dataset), limit)
    if keep is not None:
        dataset.samples = dataset.imgs = [dataset.samples[i] for i in keep]
        dataset.targets = [target for _, target in dataset.samples]
    return dataset
