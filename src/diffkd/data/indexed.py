"""Each item with its dataset index, for methods that keep per-sample state (CRD's memory bank)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset


class WithIndices(Dataset):
    """Items (item, index) of any dataset; batched fetching (`__getitems__`) is kept when the dataset has it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.dataset[index], index

    def __getitems__(self, indices: list[int]) -> list[tuple[Any, int]]:
        fetch = getattr(self.dataset, "__getitems__", None)
        items = fetch(indices) if fetch is not None else [self.dataset[i] for i in indices]
        return list(zip(items, indices, strict=True))


class IndexedCollate:
    """Collate (item, index) pairs: the items with the task's collate function, the indices as a (B,) tensor."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, batch: list[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
        items, indices = zip(*batch, strict=True)
        return self.collate(list(items)), torch.tensor(indices, dtype=torch.long)
