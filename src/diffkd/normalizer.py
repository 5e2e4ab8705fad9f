"""Scale-free distillation targets: per-channel statistics of the teacher target, applied to both sides."""
from __future__ import annotations

import torch
from torch import Tensor, nn


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
