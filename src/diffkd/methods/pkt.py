"""PKT: probabilistic knowledge transfer, matching the cosine-similarity kernels of the batch.

Passalis and Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018.
Computed as the reference code (RepDistiller) does; docs/design.md §5.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Method, MethodOutput, float32_math, pooled_vector, require_per_sample_channels

EPS = 1e-7


def _conditional(x: Tensor) -> Tensor:
    """Rows normalised (x / (|x| + eps), NaN -> 0), kernel (cos + 1) / 2, each row divided by its sum."""
    x = x / (x.norm(dim=1, keepdim=True) + EPS)
    x = torch.nan_to_num(x, nan=0.0)
    kernel = (x @ x.t() + 1.0) / 2.0
    return kernel / kernel.sum(dim=1, keepdim=True)


class PKT(Method):
    """mean over all N^2 entries of P_t log((P_t + eps) / (P_s + eps)); the recipes weight it 30000.

    Accepts any (B,C,...) tap on each side (vectors, sequences, maps: pooled over every dim after C);
    no learned module, and the channel counts may differ. The teacher side carries no gradient.
    """

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, **options) -> "PKT":
        for shape in (student_shape, teacher_shape):
            require_per_sample_channels("pkt", shape)
        return cls(**options)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> MethodOutput:
        with float32_math(student):
            p_s = _conditional(pooled_vector("pkt", student))
            with torch.no_grad():
                p_t = _conditional(pooled_vector("pkt", teacher))
            loss = (p_t * torch.log((p_t + EPS) / (p_s + EPS))).mean()
        return MethodOutput({"pkt": loss})
