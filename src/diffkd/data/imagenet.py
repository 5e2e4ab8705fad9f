"""ImageNet (or any ImageNet-style tree) from class folders through torchvision's ImageFolder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torchvision import transforms
from torchvision.datasets import ImageFolder

from .subset import spread_indices

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FOLDERS = {"train": "train", "val": "val", "test": "val"}


@dataclass(frozen=True)
class Policies:
    """Extra training augmentation of the stronger strategies (B2, B3); the defaults turn each off.

    color_jitter: brightness, contrast and saturation strength; randaugment: 2 ops at magnitude 9;
    random_erasing: probability of erasing one box (filled with normal noise) of the normalized image.
    """

    randaugment: bool = False
    color_jitter: float = 0.0
    random_erasing: float = 0.0


def make_transform(image_size: int, augment: bool, policies: Policies = Policies()) -> transforms.Compose:
    """Train: RandomResizedCrop + flip (+ policies); eval: resize to size/0.875 (256 for 224), center crop."""
    if not augment:
        steps = [transforms.Resize(round(image_size / 0.875)), transforms.CenterCrop(image_size)]
        return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    c = policies.color_jitter
    steps = [
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        *([transforms.ColorJitter(brightness=c, contrast=c, saturation=c)] if c > 0 else []),
        *([transforms.RandAugment(num_ops=2, magnitude=9)] if policies.randaugment else []),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
        *([transforms.RandomErasing(p=policies.random_erasing, value="random")] if policies.random_erasing > 0 else []),
    ]
    return transforms.Compose(steps)


def build(
    split: str,
    root: str | Path | None = None,
    *,
    download: bool = False,
    augment: bool = False,
    limit: int | None = None,
    image_size: int = 224,
    policies: Policies = Policies(),
) -> ImageFolder:
    """The split ("val" and "test" both read val/); `limit` keeps evenly spaced images; policies apply with augment."""
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
    dataset = ImageFolder(str(folder), transform=make_transform(image_size, augment, policies))
    keep = spread_indices(len(dataset), limit)
    if keep is not None:
        dataset.samples = dataset.imgs = [dataset.samples[i] for i in keep]
        dataset.targets = [target for _, target in dataset.samples]
    return dataset
