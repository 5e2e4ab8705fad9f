"""DiffKD as a distillation method: one DiffKD module per level, sized from the taps."""
from __future__ import annotations

import inspect

import torch
from torch import Tensor

from ..losses import compares_distributions
from ..module import DiffKD as DiffKDModule
from .base import Method, MethodOutput, require_same_shape

_MEANT = (
    "check the taps and num_classes, or pass allow_class_mismatch=True if mapping one class set onto the other is meant"
)


class DiffKD(Method):
    """Maps (B,C,H,W) get the conv kind with MSE, sequences (B,C,L) its 1-D form; vectors (B,K) the
    mlp kind with KL (at the distance's own temperature, 1, unless tau is given).

    A level whose distance compares softmaxes (kl, dist; the default for vectors) holds logits, so
    student and teacher must have the same class count, as for kd: a projector from 10 classes to 5
    is almost always a wrong tap or num_classes, and is refused unless allow_class_mismatch=True.
    A level with a feature distance (mse, attention_mse, a callable) holds features, whose widths
    may differ: the projector maps one onto the other.
    """

    calibrated_terms = ("kd",)  # weight auto scales the distillation term; the diffusion model and AE learn as given

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
        allowed = options.pop("allow_class_mismatch", False)
        distance = options["distance"]
        if compares_distributions(distance) and student_shape[1] != teacher_shape[1] and not allowed:
            if not spatial:
                require_same_shape("diffkd", student_shape, teacher_shape, _MEANT)
            raise ValueError(
                f"diffkd compares class scores (distance {distance!r}): student {student_shape[1]}, teacher "
                f"{teacher_shape[1]} classes, shapes {tuple(student_shape)} and {tuple(teacher_shape)} ({_MEANT})"
            )
        return cls(DiffKDModule(student_shape[1], teacher_shape[1], **options))

    @classmethod
    def option_names(cls) -> list[str]:
        sized = ("self", "student_channels", "teacher_channels")  # from the taps
        return [p for p in inspect.signature(DiffKDModule.__init__).parameters if p not in sized] + [
            "allow_class_mismatch"
        ]

    def set_progress(self, epoch: float, epochs: int) -> None:
        self.diffkd.set_progress(epoch, epochs)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> MethodOutput:
        out = self.diffkd(student, teacher)
        terms = {"kd": out.kd_loss, "diffusion": out.diffusion_loss}
        weights = {"kd": self.diffkd.current_kd_weight(), "diffusion": self.diffkd.diffusion_weight}
        if out.ae_loss is not None:
            terms["ae"], weights["ae"] = out.ae_loss, self.diffkd.ae_weight
        stats = {"gamma": out.gamma.detach().mean()} if out.gamma is not None else {}
        return MethodOutput(terms, stats, weights)
