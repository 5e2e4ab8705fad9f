"""The fast path of a DiffKD level (docs/design.md §4): the reference maths of module.py and
diffusion.py in fewer passes.

Chosen once, when a level is built (`DiffKD(fast=True)`, the default). Three folds, each held to the
reference by tests (outputs, gradients and BatchNorm statistics; tests/test_module.py, test_variants.py,
test_sequences.py):
- maps are channels-last: the chain's small convs and BatchNorms get faster CPU kernels;
- the chain's state carries the time embedding of the step it goes to, h = x + emb_t, so no
  evaluation adds its embedding in a pass of its own (nor does the noising of the diffusion loss);
- each update x_next = a x + b eps + c (x0_hat - x0_hat_prev) (a sampler's `linear_steps`) folds b
  and the embedding shift into the noise predictor's last layer (`scaled_forward` of its BatchNorm or
  1x1 conv); one in-place add finishes the step.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .diffusion import DDIM, LinearStep, NoisePredictor, NoiseSchedule


class FoldedPath:
    """Start, chain and noise prediction of a level, folded; maps channels-last (conv kind, dims=2)."""

    def __init__(self, sampler: DDIM, kind: str, dims: int):
        self.steps = sampler.linear_steps()
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
    """The network with scale and shift folded into its last layer where that layer can take them
    (float32 through our BatchNorm or 1x1 conv); otherwise (autocast, SyncBatchNorm, ...) applied after it."""
    y, last = layers[:-1](h), layers[-1]
    shift = shift.float()
    if hasattr(last, "scaled_forward"):
        return last.scaled_forward(y, scale, shift)
    return torch.add(shift, last(y), alpha=scale)
