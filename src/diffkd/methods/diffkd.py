"""DiffKD as a distillation method: one DiffKD module per level, sized from the taps."""
from __future__ import annotations

import torch
from torch import Tensor

from ..module import DiffKD as DiffKDModule
from .base import Method, MethodOutput


class DiffKD(Method):
    """Maps (B,C,H,W) get the conv kind with MSE, sequences (B,C,L) its 1-D form; vectors (B,K) the
    mlp kind with KL (tau 1)."""

    def __init__(self, module: DiffKDModule):
        super().__init__()
        self.diffkd = module

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, **options) -> "DiffKD":
        ranks = (len(student_shape), len(teacher_shape))
        if ranks not in ((4, 4), (3, 3), (2, 2)):
            raise ValueError(
                f"diffkd needs two maps (B,C,H,W), two sequences (B,C,L) or two vectors (B,K), got student "
                f"{tuple(student_shape)} and teacher {tuple(teacher_shape)}"
            )
        spatial = ranks[0] - 2  # 2: maps, 1: sequences, 0: vectors
        options.setdefault("kind", "conv" if spatial else "mlp")
        options.setdefault("distance", "mse" if spatial else "kl")
        if spatial and options["kind"] == "conv":
            options.setdefault("dims", spatial)
        return cls(DiffKDModule(student_shape[1], teacher_shape[1], **options))

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> MethodOutput:
        out = self.diffkd(student, teacher)
        terms = {"kd": self.diffkd.kd_weight * out.kd_loss, "diffusion": self.diffkd.diffusion_weight * out.diffusion_loss}
        if out.ae_loss is not None:
            terms["ae"] = self.diffkd.ae_weight * out.ae_loss
        stats = {"gamma": out.gamma.detach().mean()} if out.gamma is not None else {}
        return MethodOutput(terms, stats)
