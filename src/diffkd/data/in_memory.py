"""A split held in memory as one uint8 tensor, served with batched tensor augmentation."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .augment import normalize, random_crop_flip
from .subset import spread_indices


class InMemoryImages(Dataset):
    """Items: (normalized float CxHxW image, int label); raw `.images` (N,C,H,W uint8), `.targets`.

    The DataLoader fetches whole batches through `__getitems__`, so crop, flip and normalization run
    once per batch as tensor ops (cheap on a couple of CPU cores). `limit` keeps that many items,
    evenly spaced over the split, copied out of the full tensors.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        padding: int,
        augment: bool,
        classes: list[str],
        limit: int | None = None,
    ) -> None:
        keep = spread_indices(len(images), limit)
        self.images = images if keep is None else images[keep]
        self.targets = targets if keep is None else targets[keep]
        self.mean = torch.tensor(mean)
        self.std = torch.tensor(std)
        self.padding = padding
        self.augment = augment
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([range(len(self))[index]])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        where = torch.as_tensor(indices, dtype=torch.long)
        batch = self.images.index_select(0, where)
        if self.augment:
            batch = random_crop_flip(batch, self.padding)
        images = normalize(batch, self.mean, self.std)
        labels = self.targets.index_select(0, where).tolist()
        return list(zip(images.unbind(0), labels, strict=True))
