"""Mixup and CutMix on a training batch, with soft targets (the B3 strategy's batch-level augmentation).

Each image is mixed with its mirror in the batch (image i with image B-1-i) by one lambda per
batch drawn from Beta(alpha, alpha); the targets become lambda * onehot(y_i) + (1 - lambda) *
onehot(y_{B-1-i}). With both on, CutMix is chosen with probability `switch_prob`. Draws use the
global torch RNG, so a seeded run mixes identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class BatchMixer:
    """Mixup (alpha `mixup`) and/or CutMix (alpha `cutmix`) over (B,C,H,W) images and (B,) labels; 0 turns one off."""

    num_classes: int
    mixup: float = 0.0
    cutmix: float = 0.0
    switch_prob: float = 0.5

    @property
    def enabled(self) -> bool:
        """Whether any mixing happens."""
        return self.mixup > 0 or self.cutmix > 0

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The mixed images and their soft targets (B, num_classes), rows summing to 1."""
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or torch.rand(()).item() < self.switch_prob)
        alpha = self.cutmix if use_cutmix else self.mixup
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        partner = images.flip(0)
        if use_cutmix:
            mixed, lam = cutmix(images, partner, lam)
        else:
            mixed = images * lam + partner * (1.0 - lam)
        onehot = F.one_hot(labels, self.num_classes).float()
        return mixed, onehot * lam + onehot.flip(0) * (1.0 - lam)


def cut_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """A random box (top, bottom, left, right) covering about 1 - lam of the image, clipped at the borders."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(torch.randint(0, height, ())), int(torch.randint(0, width, ()))
    return (max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height), max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width))


def cutmix(images: Tensor, partner: Tensor, lam: float) -> tuple[Tensor, float]:
    """Paste a box of `partner` into `images`; returns them and lambda corrected to the box's true area."""
    height, width = images.shape[-2:]
    top, bottom, left, right = cut_box(height, width, lam)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
    return mixed, 1.0 - (bottom - top) * (right - left) / (height * width)
