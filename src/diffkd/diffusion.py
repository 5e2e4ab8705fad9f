"""The diffusion half of DiffKD: noise schedule, samplers (DDIM, DPM-Solver++(2M)) and the networks.

Every formula here is the reference form (docs/design.md §1 and §3); the folded
fast path (folded.py) computes the same in fewer passes. All schedule arithmetic is float32 (sampler
coefficients are float64 Python scalars), so it survives bf16/fp16 autocast, where the official
release's `1 - abar_0` rounds to 0 and NaNs.
"""
from __future__ import annotations

import difflib
import math
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

NUM_TRAIN_TIMESTEPS = 1000
TIME_EMBEDDING_ROWS = 1280  # the official release's table size, kept for checkpoint compatibility
NoiseModel = Callable[[Tensor, int], Tensor]  # eps(x, t)


class NoiseSchedule(nn.Module):
    """Linear-beta DDPM schedule (beta 1e-4 -> 0.02 over T steps) with `add_noise` for training.

    `alphas_cumprod` is a non-persistent buffer: it follows `.to(device)` but stays out of the
    state dict, and it is kept in float32 even if the module is cast to half precision.
    """

    alphas_cumprod: Tensor

    def __init__(self, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__()
        self.num_train_timesteps = num_train_timesteps
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        abar = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("alphas_cumprod", abar, persistent=False)
        self.abar_values: list[float] = abar.double().tolist()  # host copy for the samplers' scalars

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        super()._apply(fn, *args, **kwargs)
        if self.alphas_cumprod.dtype != torch.float32:  # rebuilt from the exact host copy
            device = self.alphas_cumprod.device
            self.alphas_cumprod = torch.tensor(self.abar_values, dtype=torch.float32, device=device)
        return self

    def abar(self, timesteps: Tensor, like: Tensor) -> Tensor:
        """abar_t per sample (float32) on `like`'s device, shaped to broadcast over it."""
        return self.alphas_cumprod.to(like.device)[timesteps].view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per sample t, in float32."""
        abar = self.abar(timesteps, x0)
        return abar.sqrt() * x0.float() + (1.0 - abar).sqrt() * noise.float()

    def inference_timesteps(self, steps: int) -> list[int]:
        """The last `steps` timesteps of a 2*steps DDIM schedule of stride T // (2*steps).

        steps=5 gives 400, 300, 200, 100, 0: the paper's chain and its NFE ablation rule.
        """
        if steps < 1:
            raise ValueError(f"inference_steps must be >= 1, got {steps}")
        stride = self.num_train_timesteps // (2 * steps)
        if stride < 1:
            raise ValueError(f"inference_steps={steps} is too many for {self.num_train_timesteps} timesteps")
        return [(steps - 1 - i) * stride for i in range(steps)]


# ----------------------------------------------------------------------------- samplers
class DDIM:
    """Deterministic DDIM (eta = 0): the paper's denoising chain, one evaluation per timestep.

    x0_hat = (x - sqrt(1 - abar_t) eps(x, t)) / sqrt(abar_t); x <- sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps,
    where abar_prev is abar one stride earlier, and 1 after t = 0 (the chain ends on x0_hat).
    """

    name = "ddim"

    def __init__(self, schedule: NoiseSchedule, steps: int):
        self.timesteps = schedule.inference_timesteps(steps)
        stride = schedule.num_train_timesteps // (2 * steps)
        abar = schedule.abar_values
        self.abar = [abar[t] for t in self.timesteps]
        self.abar_prev = [abar[t - stride] if t - stride >= 0 else 1.0 for t in self.timesteps]

    def __call__(self, x: Tensor, eps_model: NoiseModel) -> Tensor:
        """The chain from x (float32 state); gradients flow through every step."""
        x = x.float()
        for t, abar_t, abar_prev in zip(self.timesteps, self.abar, self.abar_prev):
            eps = eps_model(x, t).float()
            x0_hat = (x - math.sqrt(1.0 - abar_t) * eps) / math.sqrt(abar_t)
            x = math.sqrt(abar_prev) * x0_hat + math.sqrt(1.0 - abar_prev) * eps
        return x


class DPMSolver2M(DDIM):
    """DPM-Solver++(2M) over DDIM's timesteps, one evaluation per step (docs/design.md §3).

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma) and the data prediction
    x0_hat = (x - sigma eps) / alpha: the first step is DDIM; step i >= 2, with h = lambda_i - lambda_{i-1}
    and r = (lambda_{i-1} - lambda_{i-2}) / h, is
    x_i = (sigma_i / sigma_{i-1}) x - alpha_i (e^-h - 1) [(1 + 1/2r) x0_hat_{i-1} - (1/2r) x0_hat_{i-2}];
    the last step, to sigma = 0, returns the data prediction itself. With 1 or 2 steps it is DDIM.
    """

    name = "dpm_solver++"

    def __init__(self, schedule: NoiseSchedule, steps: int):
        super().__init__(schedule, steps)
        self.alpha = [math.sqrt(a) for a in self.abar] + [1.0]  # the chain ends at sigma = 0
        self.sigma = [math.sqrt(1.0 - a) for a in self.abar] + [0.0]
        self.lam = [math.log(a / s) for a, s in zip(self.alpha[:-1], self.sigma[:-1])]

    def __call__(self, x: Tensor, eps_model: NoiseModel) -> Tensor:
        x, x0_prev = x.float(), None
        for i in range(len(self.timesteps) - 1):
            x0_hat = self.data_prediction(x, eps_model, i)
            h = self.lam[i + 1] - self.lam[i]
            if x0_prev is None:
                data = x0_hat
            else:
                r = (self.lam[i] - self.lam[i - 1]) / h
                data = (1.0 + 1.0 / (2.0 * r)) * x0_hat - (1.0 / (2.0 * r)) * x0_prev
            x = (self.sigma[i + 1] / self.sigma[i]) * x - self.alpha[i + 1] * math.expm1(-h) * data
            x0_prev = x0_hat
        return self.data_prediction(x, eps_model, len(self.timesteps) - 1)  # the last step, to sigma = 0

    def data_prediction(self, x: Tensor, eps_model: NoiseModel, i: int) -> Tensor:
        """x0_hat = (x - sigma eps(x, t)) / alpha at step i."""
        return (x - self.sigma[i] * eps_model(x, self.timesteps[i]).float()) / self.alpha[i]


SAMPLERS: dict[str, type[DDIM]] = {"ddim": DDIM, "dpm_solver++": DPMSolver2M}


def make_sampler(name: str, schedule: NoiseSchedule, steps: int) -> DDIM:
    """The sampler called `name` over `steps` timesteps, or a one-line error naming the closest known one."""
    if name not in SAMPLERS:
        close = difflib.get_close_matches(str(name), SAMPLERS, n=1, cutoff=0.3)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown sampler {name!r}{hint}; expected one of {list(SAMPLERS)}")
    return SAMPLERS[name](schedule, steps)


# ----------------------------------------------------------------------------- networks
class PointwiseConv(nn.Conv2d):
    """1x1 conv (with bias) that also takes (B,C) vectors, as one matrix product, and (B,C,L) sequences.

    Same weights and maths as on (B,C,1,1) maps, but far fewer and cheaper kernels for the mlp kind;
    one class for both spatial ranks keeps the 1-D conv kind's parameter names those of the 2-D kind.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            return F.linear(x, self.weight.flatten(1), self.bias)
        if x.dim() == 3:
            return F.conv1d(x, self.weight.flatten(2), self.bias)
        return super().forward(x)


class VectorBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d that also normalises (B,C) vectors (the same statistics as (B,C,1,1) maps) and
    (B,C,L) sequences (statistics over batch and length)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"expected a (B,C), (B,C,L) or (B,C,H,W) input, got shape {tuple(x.shape)}")


def conv_bn(cin: int, cout: int, kernel: int = 1, dims: int = 2) -> list[nn.Module]:
    """Conv (with bias, 'same' padding) followed by BatchNorm: the unit every box is made of.

    dims is the spatial rank: 2 for (B,C,H,W) maps, 1 for (B,C,L) sequences (only a kernel > 1 differs).
    """
    if kernel == 1:
        return [PointwiseConv(cin, cout), VectorBatchNorm(cout)]
    if dims == 1:
        return [nn.Conv1d(cin, cout, kernel, padding=kernel // 2), nn.BatchNorm1d(cout)]
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.BatchNorm2d(cout)]


def check_dims(dims: int) -> None:
    """The conv kind's spatial rank: 2 (maps) or 1 (sequences)."""
    if dims not in (1, 2):
        raise ValueError(f"dims must be 2 ((B,C,H,W) maps) or 1 ((B,C,L) sequences), got {dims!r}")


class Bottleneck(nn.Module):
    """Residual bottleneck: 1x1 C->C/r, 3x3 C/r->C/r, 1x1 C/r->C (BN, ReLU between), plus input.

    With dims=1 (sequences) the 3x3 conv is a kernel-3 conv along L (padding 1).
    """

    def __init__(self, channels: int, reduction: int = 4, dims: int = 2):
        super().__init__()
        check_dims(dims)
        mid = max(1, channels // reduction)  # tiny widths keep one channel instead of none
        self.block = nn.Sequential(
            *conv_bn(channels, mid), nn.ReLU(inplace=True),
            *conv_bn(mid, mid, 3, dims), nn.ReLU(inplace=True),
            *conv_bn(mid, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)  # a fresh BatchNorm output nothing else holds: add the residual in place
        return out.add_(x) if out.dtype == x.dtype else out + x


@contextmanager
def buffers_restored(module: nn.Module) -> Iterator[None]:
    """Put the module's buffers (BatchNorm running statistics and batch counters) back on exit."""
    kept = [(buffer, buffer.clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in kept:
                buffer.copy_(value)


class NoisePredictor(nn.Module):
    """eps(x, t): a learned time embedding added to x, then a conv ("conv") or 1x1 MLP ("mlp") net.

    The conv kind takes (B,C,H,W) maps, or (B,C,L) sequences when built with dims=1. The mlp kind
    takes (B,C) vectors (or (B,C,1,1) maps: same weights, same result). With `recompute` set, each evaluation keeps only its input for backward and is run again there
    (activation checkpointing): the same gradients for about a third more compute, and a fraction
    of the memory, since six evaluations per step otherwise hold all their activations.
    """

    def __init__(self, channels: int, kind: str = "conv", recompute: bool = False, dims: int = 2):
        super().__init__()
        self.recompute = recompute
        self.time_embedding = nn.Embedding(TIME_EMBEDDING_ROWS, channels)
        if kind == "conv":
            layers = [Bottleneck(channels, dims=dims), Bottleneck(channels, dims=dims), *conv_bn(channels, channels)]
        elif kind == "mlp":
            wide = 4 * channels
            layers = [
                *conv_bn(channels, wide), nn.ReLU(inplace=True),
                *conv_bn(wide, channels),
                *conv_bn(channels, wide), nn.ReLU(inplace=True),
                PointwiseConv(wide, channels),
            ]
        else:
            raise ValueError(f"unknown noise predictor kind {kind!r}; expected 'conv' or 'mlp'")
        self.layers = nn.Sequential(*layers)

    def embed(self, t: int | Tensor, rank: int) -> Tensor:
        """Time embedding of one step (int) or per sample (B,), shaped to broadcast over a rank-`rank` input."""
        trailing = [1] * (rank - 2)  # broadcast over space for maps; nothing for vectors
        if isinstance(t, int):
            return self.time_embedding.weight[t].view(1, -1, *trailing)
        return self.time_embedding(t.long()).view(t.shape[0], -1, *trailing)

    def forward(self, x: Tensor, t: int | Tensor) -> Tensor:
        """eps_hat(x, t)."""
        return self.predict(x + self.embed(t, x.dim()))

    def predict(self, h: Tensor) -> Tensor:
        """The network on an input that already holds the time embedding."""
        return self.evaluate(self.layers, h)

    def evaluate(self, fn: Callable[..., Tensor], *args) -> Tensor:
        """fn(*args), recomputed in backward when `recompute` is set. The recomputation's BatchNorm
        updates are undone, so running statistics move once per evaluation, as without it."""
        if not (self.recompute and torch.is_grad_enabled()):
            return fn(*args)
        if torch.compiler.is_compiling():  # compiled, the rerun recomputes values but not buffer updates
            return checkpoint(fn, *args, use_reentrant=False)
        return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), buffers_restored(self)))


class AdaptiveNoiseMatcher(nn.Module):
    """ANM: predicts per sample how much Gaussian noise to mix into the student latent (gamma)."""

    def __init__(self, channels: int, kind: str = "conv", dims: int = 2):
        super().__init__()
        if kind == "conv":
            pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)  # global average over space
            self.features = nn.Sequential(Bottleneck(channels, reduction=8, dims=dims), pool)
        elif kind == "mlp":
            self.features = nn.Sequential(
                *conv_bn(channels, 2 * channels), nn.ReLU(inplace=True), *conv_bn(2 * channels, channels)
            )
        else:
            raise ValueError(f"unknown noise matcher kind {kind!r}; expected 'conv' or 'mlp'")
        self.head = nn.Linear(channels, 2)

    def forward(self, z: Tensor) -> Tensor:
        """gamma in (0, 1), shape (B,): column 0 of a 2-way softmax."""
        return self.head(self.features(z).flatten(1)).float().softmax(dim=1)[:, 0]
