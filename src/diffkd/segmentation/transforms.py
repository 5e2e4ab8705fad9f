"""Joint image/label transforms for training: random scale, pad, random crop, horizontal flip.

Images are float (C,H,W) tensors (already normalized, so zero padding is the mean colour); labels are
(H,W) int64 train ids, resized by nearest neighbour and padded with IGNORE. Randomness comes from
torch's global RNG, which the engine seeds per process and the DataLoader per worker.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .labels import IGNORE


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def random_scale(image: Tensor, label: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """Resize both by one factor drawn from U[low, high]: bilinear image, nearest-neighbour label."""
    factor = _uniform(low, high)
    h, w = label.shape
    size = (max(1, round(h * factor)), max(1, round(w * factor)))
    if size == (h, w):
        return image, label
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return image, label


def pad_to(image: Tensor, label: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Pad bottom and right up to at least `size`: zeros for the image, IGNORE for the label."""
    h, w = label.shape
    dh, dw = max(0, size[0] - h), max(0, size[1] - w)
    if dh == dw == 0:
        return image, label
    return F.pad(image, (0, dw, 0, dh)), F.pad(label, (0, dw, 0, dh), value=IGNORE)


def random_crop(image: Tensor, label: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """A window of `size` at a uniformly random position (the input must be at least that large)."""
    h, w = label.shape
    top = int(torch.randint(0, h - size[0] + 1, ()))
    left = int(torch.randint(0, w - size[1] + 1, ()))
    window = (slice(top, top + size[0]), slice(left, left + size[1]))
    return image[(slice(None), *window)], label[window]


def random_flip(image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
    """Mirror both left-right with probability 1/2."""
    if bool(torch.rand(()) < 0.5):
        return image.flip(-1), label.flip(-1)
    return image, label


def train_transform(
    image: Tensor, label: Tensor, crop: tuple[int, int], scale: tuple[float, float], flip: bool
) -> tuple[Tensor, Tensor]:
    """Random scale in [scale[0], scale[1]], pad to `crop`, random crop, then flip if asked."""
    image, label = random_scale(image, label, *scale)
    image, label = random_crop(*pad_to(image, label, crop), crop)
    return random_flip(image, label) if flip else (image, label)
