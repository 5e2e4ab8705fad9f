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
    """Shuffle (unless a sampler is given) and drop the last partial batch when training; workers persist.

    The order and the workers' RNG seeds come from a generator seeded with seed. With workers=0 the
    augmentation draws from the global torch RNG, so seed that too (torch.manual_seed) to replay a run.
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
