"""DiffKD as a distillation method: one DiffKD module per level, sized from the taps."""
from __future__ import annotations

import torch
from torch import Tensor

from ..losses import Distance, compares_distributions, resolve_distance
from ..module import DiffKD as DiffKDModule
from ..normalizer import NormalizedDistance, StandardizedDistance
from ..weighting import Warmup, check_schedule_epochs
from .base import Method, MethodOutput, require_same_shape

_MEANT = (
    "check the taps and num_classes, or pass allow_class_mismatch=True if mapping one class set onto the other is meant"
)


def level_distance(distance: str | Distance, tau: float | None = None, normalize_target: bool = False,
                   standardize: bool = False, channels: int | None = None) -> Distance:
    """The distance object of a level: a name at temperature `tau` (None: its own) or a callable, wrapped by the
    normalisations asked (standardized logits; target statistics over `channels`, the latent width)."""
    measure = resolve_distance(distance, tau)
    if standardize:
        measure = StandardizedDistance(measure)
    if normalize_target:
        measure = NormalizedDistance(measure, channels)
    return measure


class DiffKD(Method):
    """Maps (B,C,H,W) get the conv kind with MSE, sequences (B,C,L) its 1-D form; vectors (B,K) the
    mlp kind with KL (at the distance's own temperature, 1, unless tau is given).

    A level whose distance compares softmaxes (kl, dist; the default for vectors) holds logits, so
    student and teacher must have the same class count, as for kd: a projector from 10 classes to 5
    is almost always a wrong tap or num_classes, and is refused unless allow_class_mismatch=True.
    A level with a feature distance (mse, attention_mse, a callable) holds features, whose widths
    may differ: the projector maps one onto the other.

    Its terms' weights (kd_weight, diffusion_weight, ae_weight: 1, the paper's) and the kd term's
    warm-up (kd_warmup_epochs: its weight rises linearly from 0, every step) are the weighting's data.
    normalize_target and standardize wrap the distance (normalizer.py).
    """

    calibrated_terms = ("kd",)  # weight auto scales the distillation term; the diffusion model and AE learn as given

    def __init__(self, module: DiffKDModule, kd_weight: float = 1.0, diffusion_weight: float = 1.0,
                 ae_weight: float = 1.0, kd_warmup_epochs: float = 0.0):
        super().__init__()
        self.diffkd = module
        self.term_weights = {"kd": kd_weight, "diffusion": diffusion_weight, "ae": ae_weight}
        warmup = check_schedule_epochs("kd_warmup_epochs", kd_warmup_epochs)
        self.schedules = {"kd": Warmup(warmup)} if warmup > 0 else {}

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, *, latent_channels: int | None = None,
              kind: str | None = None, inference_steps: int = 5, adaptive_noise: bool = True,
              distance: str | Distance | None = None, tau: float | None = None, normalize_target: bool = False,
              standardize: bool = False, sampler: str = "ddim", num_train_timesteps: int = 1000, fast: bool = True,
              recompute: bool = False, kd_weight: float = 1.0, diffusion_weight: float = 1.0, ae_weight: float = 1.0,
              kd_warmup_epochs: float = 0.0, allow_class_mismatch: bool = False) -> "DiffKD":
        ranks = (len(student_shape), len(teacher_shape))
        if ranks not in ((4, 4), (3, 3), (2, 2)):
            raise ValueError(
                f"diffkd needs two maps (B,C,H,W), two sequences (B,C,L) or two vectors (B,K), got student "
                f"{tuple(student_shape)} and teacher {tuple(teacher_shape)}"
            )
        spatial = ranks[0] - 2  # 2: maps, 1: sequences, 0: vectors
        kind = kind or ("conv" if spatial else "mlp")
        distance = distance if distance is not None else ("mse" if spatial else "kl")
        if compares_distributions(distance) and student_shape[1] != teacher_shape[1] and not allow_class_mismatch:
            if not spatial:
                require_same_shape("diffkd", student_shape, teacher_shape, _MEANT)
            raise ValueError(
                f"diffkd compares class scores (distance {distance!r}): student {student_shape[1]}, teacher "
                f"{teacher_shape[1]} classes, shapes {tuple(student_shape)} and {tuple(teacher_shape)} ({_MEANT})"
            )
        measure = level_distance(distance, tau, normalize_target, standardize, latent_channels or teacher_shape[1])
        module = DiffKDModule(student_shape[1], teacher_shape[1], latent_channels, kind=kind,
                              dims=spatial if kind == "conv" and spatial else 2, inference_steps=inference_steps,
                              adaptive_noise=adaptive_noise, distance=measure, sampler=sampler,
                              num_train_timesteps=num_train_timesteps, fast=fast, recompute=recompute)
        return cls(module, kd_weight, diffusion_weight, ae_weight, kd_warmup_epochs)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> MethodOutput:
        out = self.diffkd(student, teacher)
        stats = {"gamma": out.gamma.detach().mean()} if out.gamma is not None else {}
        return MethodOutput(out.terms, stats)
