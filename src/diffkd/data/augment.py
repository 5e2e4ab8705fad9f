"""Batched tensor transforms for uint8 image batches: padded random crop, flip, normalization."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(
    images: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad each (B,C,H,W) image, crop it back to HxW at a random offset and flip half of them.

    Same distribution as torchvision's RandomCrop(size, padding) + RandomHorizontalFlip, but the
    whole batch is cropped and flipped by one gather over the flattened padded images, so the cost
    per item is a few array elements, not a few ops.
    """
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding)).flatten(2)
    offsets = torch.randint(0, 2 * padding + 1, (b, 2), generator=generator, device=device)
    flips = torch.randint(0, 2, (b, 1), generator=generator, device=device).bool()
    rows = offsets[:, :1] + torch.arange(h, device=device)
    steps = torch.arange(w, device=device)
    cols = offsets[:, 1:] + torch.where(flips, steps.flip(0), steps)
    where = rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]
    return padded.gather(2, where.view(b, 1, h * w).expand(b, c, h * w)).view(b, c, h, w)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images to float (x / 255 - mean) / std per channel, exactly as ToTensor + Normalize."""
    shape = (-1, 1, 1)
    return images.float().div_(255).sub_(mean.view(shape)).div_(std.view(shape))
