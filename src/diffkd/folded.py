"""The fast path of a DiffKD level (docs/design.md §4): the reference maths of module.py and
diffusion.py in fewer passes.

Chosen once, when a level is built (`DiffKD(fast=True)`, the default). Three folds, each held to the
reference by tests (outputs, gradients and BatchNorm statistics; tests/test_module.py, test_variants.py,
test_sequences.py):
- maps are channels-last: the chain's small convs and BatchNorms get faster CPU kernels;
- the chain's state carries the time embedding of the step it goes to, h = x + emb_t, so no
  evaluation adds its embedding in a pass of its own (nor does the noising of the diffusion loss);
- each update x_next = a x + b eps + c (x0_hat - x0_hat_prev) (the sampler's steps as a linear recurrence,
  `linear_steps`) folds b and the embedding shift into the noise predictor's last layer (`scaled_last`:
  its BatchNorm or 1x1 conv with scale and shift in the affine); one in-place add finishes the step.
These forms are the fast path's own, so they live here, not in the reference networks and samplers.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .diffusion import DDIM, DPMSolver2M, NoisePredictor, NoiseSchedule, PointwiseConv, VectorBatchNorm


class LinearStep(NamedTuple):
    """One sampler step as a linear recurrence: x_next = a x + b eps + c (x0_hat - x0_hat_prev), with
    x0_hat = (x - sigma eps) / alpha at timestep t."""

    t: int
    a: float
    b: float
    c: float
    alpha: float
    sigma: float


def linear_steps(sampler: DDIM) -> list[LinearStep]:
    """The sampler's update as x_prev = a x + b eps (+ c (x0_hat - x0_hat_prev)).

    DDIM: a = sqrt(abar_prev / abar_t), b = sqrt(1 - abar_prev) - sqrt(abar_prev (1 - abar_t) / abar_t), c = 0.
    DPM-Solver++(2M): DDIM's steps plus c = -alpha_i (e^-h - 1) / 2r on the steps between the first and the last.
    """
    out = []
    for t, abar_t, abar_prev in zip(sampler.timesteps, sampler.abar, sampler.abar_prev):
        a = math.sqrt(abar_prev / abar_t)
        b = math.sqrt(1.0 - abar_prev) - math.sqrt(abar_prev * (1.0 - abar_t) / abar_t)
        out.append(LinearStep(t, a, b, 0.0, math.sqrt(abar_t), math.sqrt(1.0 - abar_t)))
    if isinstance(sampler, DPMSolver2M):
        lam = sampler.lam
        for i in range(1, len(out) - 1):
            h = lam[i + 1] - lam[i]
            r = (lam[i] - lam[i - 1]) / h
            out[i] = out[i]._replace(c=-sampler.alpha[i + 1] * math.expm1(-h) / (2.0 * r))
    return out


def batch_norm_with(bn: nn.BatchNorm2d, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """BatchNorm2d's forward (statistics, running-buffer updates, train/eval rules) with another affine."""
    bn._check_input_dim(x)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    use_buffers = not bn.training or bn.track_running_stats
    return F.batch_norm(x, bn.running_mean if use_buffers else None, bn.running_var if use_buffers else None,
                        weight, bias, batch_stats, factor, bn.eps)


def scaled_last(last: nn.Module, x: Tensor, scale: float, shift: Tensor) -> Tensor:
    """scale * last(x) + shift, in one pass where the last layer allows: float32 through our BatchNorm (scale and
    shift folded into its affine) or our 1x1 conv on vectors (one matrix product); otherwise (autocast,
    SyncBatchNorm, ...) applied after it."""
    if isinstance(last, VectorBatchNorm) and x.dtype == torch.float32 and last.affine:
        return batch_norm_with(last, x, scale * last.weight, torch.add(shift.flatten(), last.bias, alpha=scale))
    if isinstance(last, PointwiseConv) and x.dim() == 2 and x.dtype == torch.float32:
        return torch.addmm(torch.add(shift, last.bias, alpha=scale), x, last.weight.flatten(1).t(), alpha=scale)
    return torch.add(shift, last(x), alpha=scale)


class FoldedPath:
    """Start, chain and noise prediction of a level, folded; maps channels-last (conv kind, dims=2)."""

    def __init__(self, sampler: DDIM, kind: str, dims: int):
        self.steps = linear_steps(sampler)
        self.memory_format = torch.channels_last if kind == "conv" and dims == 2 else torch.contiguous_format

    def denoise(self, predictor: NoisePredictor, z_s: Tensor, gamma: Tensor | None, noise: Tensor | None) -> Tensor:
        """The chain from the ANM start, returning x0 (before the output projection)."""
        h = start_with_embedding(z_s, gamma, noise, predictor.embed(self.steps[0].t, z_s.dim()))
        return folded_chain(h, predictor, self.steps)

    def predict_noise(self, predictor: NoisePredictor, schedule: NoiseSchedule, z_t: Tensor, noise: Tensor,
                      timesteps: Tensor) -> Tensor:
        """eps_hat(x_t, t) with x_t = sqrt(abar_t) z_t + sqrt(1 - abar_t) eps and the time embedding in the same passes."""
        abar = schedule.abar(timesteps, z_t)
        embedding = predictor.embed(timesteps, z_t.dim()).float()
        h = torch.addcmul(torch.addcmul(embedding, noise.float(), (1.0 - abar).sqrt()), z_t.float(), abar.sqrt())
        return predictor.predict(h)


def start_with_embedding(z_s: Tensor, gamma: Tensor | None, noise: Tensor | None, embedding: Tensor) -> Tensor:
    """gamma z_s + (1 - gamma) eps + emb (z_s + emb without ANM), in two fused passes."""
    if gamma is None:
        return z_s.float() + embedding.float()
    g = gamma.view(-1, *([1] * (z_s.dim() - 1)))
    return torch.addcmul(torch.addcmul(embedding.float(), noise.float(), 1.0 - g), z_s.float(), g)


def folded_chain(h: Tensor, predictor: NoisePredictor, steps: list[LinearStep]) -> Tensor:
    """The sampler's chain on the state h = x + emb_t; returns x0 (the last step carries no embedding).

    x_next + emb_next = b eps + (emb_next - a emb_t) + a (x + emb_t): y = b eps + shift comes out of the
    last layer, then one in-place add. Where a correction follows, the data prediction is read off y first:
    x0_hat = (x - sigma eps) / alpha = (h - emb_t - (sigma / b) (y - shift)) / alpha.
    """
    h, x0_prev = h.float(), None
    for i, step in enumerate(steps):
        embedding = predictor.embed(step.t, h.dim())
        shift = -step.a * embedding
        if i + 1 < len(steps):
            shift = shift + predictor.embed(steps[i + 1].t, h.dim())
        y = scaled_prediction(predictor, h, step.b, shift)
        x0 = None
        if step.c or (i + 1 < len(steps) and steps[i + 1].c):  # this step's or the next one's correction needs it
            k = step.sigma / step.b
            x0 = torch.add(h, y, alpha=-k).add_((k * shift - embedding).float()).div_(step.alpha)
        h = y.add_(h, alpha=step.a)
        if step.c:
            h = h.add_(x0, alpha=step.c).add_(x0_prev, alpha=-step.c)
        x0_prev = x0
    return h


def scaled_prediction(predictor: NoisePredictor, h: Tensor, scale: float, shift: Tensor) -> Tensor:
    """scale * predictor.predict(h) + shift, in float32, recomputed in backward like any evaluation."""
    return predictor.evaluate(_scaled_layers, predictor.layers, h, scale, shift)


def _scaled_layers(layers: nn.Sequential, h: Tensor, scale: float, shift: Tensor) -> Tensor:
    """The network with scale and shift folded into its last layer (`scaled_last`)."""
    return scaled_last(layers[-1], layers[:-1](h), scale, shift.float())
