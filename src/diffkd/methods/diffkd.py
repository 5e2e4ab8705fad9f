"""DiffKD as a distillation method: one DiffKD module per level, sized from the taps."""
from __future__ import annotations

import torch
from torch import Tensor

from ..module import DiffKD as DiffKDModule
from .base import Method, MethodOutput


class DiffKD(Method):
    """Maps (B,C,H,W) get the conv kind with MSE; vectors (B,K) the mlp kind with KL (tau 1)."""

    def __init__(self, module: DiffKDModule):
        super().__init__()
        self.diffkd = module

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, **options) -> "DiffKD":
        ranks = (len(student_shape), len(teacher_shape))
        if ranks not in ((4, 4), (2, 2)):
            raise ValueError(
                f"diffkd needs two maps (B,C,H,W) or two vectors (B,K), got student {tuple(student_shape)} "
                f"and teacher {tuple(teacher_shape)}"
            )
        maps = ranks == (4, 4)
        options.setdefault("kind", "conv" if maps else "mlp")
        options.setdefault("distance", "mse" if maps else "kl")
        return cls(DiffKDModule(student_shape[1], teacher_shape[1], **options))

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> MethodOutput:
        out = self.diffkd(student, teacher)
        terms = {"kd": self.diffkd.kd_weight * out.kd_loss, "diffusion": self.diffkd.diffusion_weight * out.diffusion_loss}
        if out.ae_loss is not None:
            terms["ae"] = self.diffkd.ae_weight * out.ae_loss
        stats = {"gamma": out.gamma.detach().mean()} if out.gamma is not None else {}
        return MethodOutput(terms, stats)
