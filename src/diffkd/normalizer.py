"""Distances measured after a normalisation of both sides: DiffKD's `normalize_target` (per-channel
statistics of the teacher target) and `standardize` (z-scored logits) as wrappers around a distance."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .losses import Distance, NamedDistance, as_rows, compares_distributions, resolve_distance, standardize_logits


class TargetNormalizer(nn.Module):
    """A BatchNorm without affine whose statistics come from the (detached) teacher target alone.

    `forward(denoised, target)` maps both with the target's per-channel mean and std, so a distance
    between them no longer depends on the feature's magnitude. Training uses the batch's statistics
    (so the distance is scale-free from the first step, when running statistics are still at their
    start values) and updates the running ones (momentum 0.1, unbiased variance, as BatchNorm does);
    eval uses the running ones. No parameters, no gradient into the statistics: the student side
    gets its gradient through the denoised map only. Statistics are buffers, so they are checkpointed.
    """

    running_mean: Tensor
    running_var: Tensor

    def __init__(self, channels: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def statistics(self, target: Tensor) -> tuple[Tensor, Tensor]:
        """Per-channel (mean, std) to normalise with, broadcastable to the target; updates the running ones in training."""
        shape = (1, -1) + (1,) * (target.dim() - 2)
        if not self.training:
            return self.running_mean.float().view(shape), (self.running_var.float() + self.eps).sqrt().view(shape)
        with torch.no_grad():
            t = target.detach().float()
            dims = [0, *range(2, t.dim())]
            var, mean = torch.var_mean(t, dim=dims, correction=0)
            n = t.numel() // t.shape[1]
            unbiased = var * (n / max(n - 1, 1))
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        return mean.view(shape), (var + self.eps).sqrt().view(shape)

    def forward(self, denoised: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(denoised, target), each as (x - mean) / std with the target's statistics, in float32."""
        mean, std = self.statistics(target)
        return (denoised.float() - mean) / std, (target.detach().float() - mean) / std

    def extra_repr(self) -> str:
        return f"{self.running_mean.numel()}, momentum={self.momentum}, eps={self.eps}"


class NormalizedDistance(nn.Module):
    """distance(*normalizer(denoised, target)): a distance free of the feature's per-channel scale.

    A module: its running statistics are the buffers of its `normalizer` (a `TargetNormalizer` over `channels`),
    so a level that holds this distance checkpoints them.
    """

    def __init__(self, distance: str | Distance, channels: int):
        distance = resolve_distance(distance)
        if compares_distributions(distance):
            raise ValueError(
                f"normalize_target=True rescales each channel, which changes the class distributions {distance!r} "
                "compares; use it with a feature distance ('mse', 'attention_mse') or set normalize_target=False"
            )
        super().__init__()
        self.distance, self.normalizer = distance, TargetNormalizer(channels)

    def forward(self, denoised: Tensor, target: Tensor) -> Tensor:
        return self.distance(*self.normalizer(denoised, target))


class StandardizedDistance:
    """The KL on logits z-scored per sample over the classes (logit standardization, `standardize_logits`)."""

    compares_distributions = True

    def __init__(self, distance: str | Distance = "kl"):
        distance = resolve_distance(distance)
        if not (isinstance(distance, NamedDistance) and distance.name == "kl"):
            raise ValueError(f"standardize=True z-scores logits before the KL: it needs distance='kl', got {distance!r}")
        self.distance = distance

    def __call__(self, student: Tensor, teacher: Tensor) -> Tensor:
        return self.distance(standardize_logits(as_rows(student)), standardize_logits(as_rows(teacher)))

    def __repr__(self) -> str:
        return f"StandardizedDistance({self.distance!r})"
