"""A DataLoader whose shuffling and worker seeds follow one integer seed."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    workers: int = 0,
    sampler: Sampler | None = None,
    seed: int = 0,
    drop_last: bool | None = None,
) -> DataLoader:
    """Training shuffles (unless a sampler is given) and drops the last partial batch.

    Order and worker RNG seeds come from a generator seeded with `seed`; workers persist across
    epochs. With workers=0 augmentation draws from the global torch RNG: torch.manual_seed that too.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=torch.cuda.is_available(),
        drop_last=train if drop_last is None else drop_last,
        generator=torch.Generator().manual_seed(seed),
    )
