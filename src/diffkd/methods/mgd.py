"""MGD: masked generative distillation of one feature map.

Yang et al., "Masked Generative Distillation", ECCV 2022. A random spatial mask drops a share of the
(aligned) student map's positions; a small generator (3x3 conv, ReLU, 3x3 conv at the teacher's width)
must rebuild the teacher's whole map from what is left. Loss: the summed squared error over the map,
divided by the batch: `sum (G(M * align(s)) - t)^2 / B`, times alpha. The authors' detection setting
(RetinaNet and others on FPN levels): alpha 2e-5, masked share 0.65 (docs/design.md §5).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import Method, MethodOutput, require_maps


class MGD(Method):
    """alpha * sum((generator(mask * align(student)) - teacher)^2) / B, with a fresh mask every call.

    The mask keeps each position of the map (the same for every channel) with probability 1 - mask_ratio.
    `align` is a 1x1 conv (with bias) where the widths differ; the maps must have the same size.
    """

    layouts = frozenset({"map"})

    def __init__(self, student_channels: int, teacher_channels: int, mask_ratio: float = 0.65, alpha: float = 2e-5):
        super().__init__()
        if not 0 <= mask_ratio < 1:
            raise ValueError(f"mgd: mask_ratio is the share of positions masked, in [0, 1), got {mask_ratio!r}")
        if not alpha >= 0:
            raise ValueError(f"mgd: alpha must be >= 0, got {alpha!r}")
        self.mask_ratio = mask_ratio
        self.term_weights = {"mgd": alpha}
        self.align = nn.Conv2d(student_channels, teacher_channels, 1) if student_channels != teacher_channels else None
        self.generator = nn.Sequential(
            nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(teacher_channels, teacher_channels, 3, padding=1),
        )

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, *, mask_ratio: float = 0.65,
              alpha: float = 2e-5) -> "MGD":
        require_maps("mgd", "student", [student_shape])
        require_maps("mgd", "teacher", [teacher_shape])
        if student_shape[-2:] != teacher_shape[-2:]:
            raise ValueError(f"mgd rebuilds the teacher map from the student map of the same size, got student "
                             f"{tuple(student_shape)} and teacher {tuple(teacher_shape)} (tap the same level of both)")
        return cls(student_shape[1], teacher_shape[1], mask_ratio, alpha)

    def random_mask(self, like: Tensor) -> Tensor:
        """(B,1,H,W): 0 at a masked position (probability mask_ratio), else 1."""
        b, _, h, w = like.shape
        return (torch.rand(b, 1, h, w, device=like.device) >= self.mask_ratio).to(like.dtype)

    def forward(self, student: Tensor, teacher: Tensor, targets: Any = None, *, mask: Tensor | None = None) -> MethodOutput:
        """`mask` may be given (B,1,H,W) for testing; by default a fresh one is drawn."""
        aligned = self.align(student) if self.align is not None else student
        mask = self.random_mask(aligned) if mask is None else mask.to(aligned.dtype)
        rebuilt = self.generator(aligned * mask)
        loss = (rebuilt.float() - teacher.float()).pow(2).sum() / teacher.shape[0]
        return MethodOutput({"mgd": loss})
