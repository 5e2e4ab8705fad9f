"""RKD: relational KD on the distances and angles between the samples of a batch.

Park, Kim, Lu and Cho, "Relational Knowledge Distillation", CVPR 2019. Computed as the reference
code (RepDistiller) does; docs/design.md §5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Method, MethodOutput, float32_math, pooled_vector, require_per_sample_channels


def _distances(e: Tensor) -> Tensor:
    """Pairwise Euclidean distances (diagonal 0), divided by the mean of the off-diagonal ones."""
    square = e.pow(2).sum(1)
    d = (square[:, None] + square[None, :] - 2 * e @ e.t()).clamp(min=1e-12).sqrt()
    d = d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))
    return d / d[d > 0].mean()


def _angles(e: Tensor) -> Tensor:
    """A[i, j, k] = <u_ij, u_ik> with u_ij the unit vector from e_i to e_j, over all ordered triplets."""
    u = F.normalize(e[None, :, :] - e[:, None, :], p=2, dim=2, eps=1e-12)
    return torch.bmm(u, u.transpose(1, 2))


class RKD(Method):
    """distance_weight * L_distance + angle_weight * L_angle (25 and 50, the paper's), smooth-L1 (beta 1).

    Accepts any (B,C,...) tap on each side (vectors, sequences, maps: pooled over every dim after C);
    needs no learned module and a batch of at least 2. The teacher side carries no gradient.
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__()
        self.term_weights = {"distance": distance_weight, "angle": angle_weight}

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, **options) -> "RKD":
        for shape in (student_shape, teacher_shape):
            require_per_sample_channels("rkd", shape)
        return cls(**options)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> MethodOutput:
        if len(student) < 2:
            raise ValueError(f"rkd relates the samples of a batch, so it needs at least 2, got a batch of {len(student)}")
        with float32_math(student):
            s = pooled_vector("rkd", student)
            with torch.no_grad():
                t = pooled_vector("rkd", teacher)
                t_distances, t_angles = _distances(t), _angles(t)
            distance = F.smooth_l1_loss(_distances(s), t_distances)
            angle = F.smooth_l1_loss(_angles(s), t_angles)
        return MethodOutput({"distance": distance, "angle": angle})
