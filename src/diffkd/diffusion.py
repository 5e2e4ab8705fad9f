"""The diffusion half of DiffKD: noise schedule, denoising chains (DDIM, DPM-Solver++(2M)) and noise predictors.

All schedule arithmetic is float32 (the chain coefficients are float64 Python scalars), so it
survives bf16/fp16 autocast, where the official release's `1 - abar_0` rounds to 0 and NaNs.
"""
from __future__ import annotations

import difflib
import math
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

NUM_TRAIN_TIMESTEPS = 1000
TIME_EMBEDDING_ROWS = 1280  # the official release's table size, kept for checkpoint compatibility
SAMPLERS = ("ddim", "dpm_solver++")  # the denoising chain's update rule; both take one evaluation per step


def check_sampler(sampler: str) -> str:
    """The sampler's name, or a one-line error naming the closest known one."""
    if sampler not in SAMPLERS:
        close = difflib.get_close_matches(str(sampler), SAMPLERS, n=1, cutoff=0.3)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown sampler {sampler!r}{hint}; expected one of {list(SAMPLERS)}")
    return sampler


class SolverStep(NamedTuple):
    """One step of DPM-Solver++(2M) written as DDIM plus a correction (see `dpm_solver_coefficients`):
    x_next = a x + b eps + c (x0_hat - x0_hat_prev), x0_hat = (x - sigma eps) / alpha at timestep t."""

    t: int
    a: float
    b: float
    c: float
    alpha: float
    sigma: float


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
        self.abar_values: list[float] = abar.double().tolist()  # host copy for the chain's scalars

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        super()._apply(fn, *args, **kwargs)
        if self.alphas_cumprod.dtype != torch.float32:  # rebuilt from the exact host copy
            device = self.alphas_cumprod.device
            self.alphas_cumprod = torch.tensor(self.abar_values, dtype=torch.float32, device=device)
        return self

    def add_noise(self, x0: Tensor, noise: Tensor, timesteps: Tensor, offset: Tensor | None = None) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per sample t, in float32.

        `offset` (broadcastable, e.g. the time embedding) is added in the same two passes.
        """
        abar = self.alphas_cumprod.to(x0.device)[timesteps].view(-1, *([1] * (x0.dim() - 1)))
        noised = (1.0 - abar).sqrt() * noise.float() if offset is None else torch.addcmul(offset.float(), noise.float(), (1.0 - abar).sqrt())
        return torch.addcmul(noised, x0.float(), abar.sqrt())

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

    def ddim_coefficients(self, steps: int) -> list[tuple[int, float, float]]:
        """(t, a, b) per step so that x_prev = a * x + b * eps_hat (deterministic DDIM, eta = 0).

        From x0_hat = (x - sqrt(1-abar_t) e) / sqrt(abar_t) and
        x_prev = sqrt(abar_prev) x0_hat + sqrt(1-abar_prev) e, with abar_prev = 1 after t = 0.
        """
        timesteps = self.inference_timesteps(steps)
        stride = self.num_train_timesteps // (2 * steps)
        out = []
        for t in timesteps:
            abar_t = self.abar_values[t]
            abar_prev = self.abar_values[t - stride] if t - stride >= 0 else 1.0
            a = math.sqrt(abar_prev / abar_t)
            b = math.sqrt(1.0 - abar_prev) - math.sqrt(abar_prev * (1.0 - abar_t) / abar_t)
            out.append((t, a, b))
        return out

    def dpm_solver_coefficients(self, steps: int) -> list[SolverStep]:
        """DPM-Solver++(2M) over the DDIM chain's timesteps, one evaluation per step (DESIGN.md 4c).

        Its step i >= 2 is (sigma_i / sigma_{i-1}) x - alpha_i (e^-h - 1) [(1 + 1/2r) x0_{i-1} - x0_{i-2} / 2r]
        = the DDIM step + c (x0_{i-1} - x0_{i-2}) with c = -alpha_i (e^-h - 1) / 2r, h = lambda_i - lambda_{i-1},
        r = (lambda_{i-1} - lambda_{i-2}) / h, lambda = log(alpha / sigma). The first step is DDIM (c = 0);
        so is the last, to sigma = 0, where the update is the data prediction itself. So with 1 or 2
        steps the chain is DDIM's exactly.
        """
        ddim = self.ddim_coefficients(steps)
        alphas = [math.sqrt(self.abar_values[t]) for t, _, _ in ddim]
        sigmas = [math.sqrt(1.0 - self.abar_values[t]) for t, _, _ in ddim]
        lambdas = [math.log(a / s) for a, s in zip(alphas, sigmas)]
        out = []
        for i, (t, a, b) in enumerate(ddim):
            c = 0.0
            if 0 < i < len(ddim) - 1:
                h = lambdas[i + 1] - lambdas[i]
                r = (lambdas[i] - lambdas[i - 1]) / h
                c = -alphas[i + 1] * math.expm1(-h) / (2.0 * r)
            out.append(SolverStep(t, a, b, c, alphas[i], sigmas[i]))
        return out


def ddim_step(x: Tensor, eps_hat: Tensor, abar_t: float, abar_prev: float) -> Tensor:
    """One deterministic DDIM update written the textbook way (reference for the fused form)."""
    x0_hat = (x - math.sqrt(1.0 - abar_t) * eps_hat) / math.sqrt(abar_t)
    return math.sqrt(abar_prev) * x0_hat + math.sqrt(1.0 - abar_prev) * eps_hat


def denoise(
    x: Tensor, noise_predictor: Callable[[Tensor, int], Tensor], coefficients: list[tuple[int, float, float]]
) -> Tensor:
    """Run the DDIM chain from x (float32 state); gradients flow through every step (the reference)."""
    x = x.float()
    for t, a, b in coefficients:
        x = a * x + b * noise_predictor(x, t).float()
    return x


def denoise_folded(h: Tensor, noise_predictor: NoisePredictor, coefficients: list[tuple[int, float, float]]) -> Tensor:
    """The chain of `denoise` in fewer passes over the maps; h = x + the first step's time embedding.

    The state carries the next step's embedding, so x_prev + emb_prev = a * (x + emb_t) + b * eps
    + (emb_prev - a * emb_t): the scale b and that per-channel shift fold into the predictor's
    last layer, and one in-place add finishes the step (no embedding add, no separate DDIM update).
    """
    h = h.float()
    for i, (t, a, b) in enumerate(coefficients):
        shift = -a * noise_predictor.embed(t, h.dim())
        if i + 1 < len(coefficients):
            shift = shift + noise_predictor.embed(coefficients[i + 1][0], h.dim())
        h = noise_predictor.scaled_output(h, b, shift).add_(h, alpha=a)
    return h


def needs_data_prediction(steps: list[SolverStep], i: int) -> bool:
    """Whether step i's x0_hat enters a correction (its own or the next step's)."""
    return bool(steps[i].c or (i + 1 < len(steps) and steps[i + 1].c))


def denoise_multistep(x: Tensor, noise_predictor: Callable[[Tensor, int], Tensor], steps: list[SolverStep]) -> Tensor:
    """The DPM-Solver++(2M) chain from x (float32 state): DDIM's update plus the correction, on
    plain tensors (the reference; tests hold it to DESIGN.md 4c's form)."""
    x, x0_prev = x.float(), None
    for i, step in enumerate(steps):
        eps = noise_predictor(x, step.t).float()
        x0 = (x - step.sigma * eps) / step.alpha if needs_data_prediction(steps, i) else None
        x_next = step.a * x + step.b * eps
        if step.c:
            x_next = x_next + step.c * (x0 - x0_prev)
        x, x0_prev = x_next, x0
    return x


def denoise_multistep_folded(h: Tensor, noise_predictor: NoisePredictor, steps: list[SolverStep]) -> Tensor:
    """The chain of `denoise_multistep` on the fast path's state h = x + the step's time embedding.

    The DDIM part folds as in `denoise_folded`: y = b eps + shift comes out of the last layer and
    h_next = y + a h. The data prediction is read off y before that in-place add:
    x0_hat = (x - sigma eps) / alpha = (h - emb_t - (sigma / b) (y - shift)) / alpha; the correction
    c (x0_hat - x0_hat_prev) is added after.
    """
    h, x0_prev = h.float(), None
    for i, step in enumerate(steps):
        emb = noise_predictor.embed(step.t, h.dim())
        shift = -step.a * emb
        if i + 1 < len(steps):
            shift = shift + noise_predictor.embed(steps[i + 1].t, h.dim())
        y = noise_predictor.scaled_output(h, step.b, shift)
        x0 = None
        if needs_data_prediction(steps, i):
            k = step.sigma / step.b
            x0 = torch.add(h, y, alpha=-k).add_((k * shift - emb).float()).div_(step.alpha)
        h = y.add_(h, alpha=step.a)
        if step.c:
            h = h.add_(x0, alpha=step.c).add_(x0_prev, alpha=-step.c)
        x0_prev = x0
    return h


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
    (B,C,L) sequences (statistics over batch and length), and can apply another affine than its own
    (`normalize`), so a caller can fold a scale into it."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"expected a (B,C), (B,C,L) or (B,C,H,W) input, got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        return self.normalize(x, self.weight, self.bias)

    def normalize(self, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        """BatchNorm2d's forward (statistics, running-buffer updates, train/eval rules) with this affine."""
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_buffers = not self.training or self.track_running_stats
        return F.batch_norm(
            x, self.running_mean if use_buffers else None, self.running_var if use_buffers else None,
            weight, bias, batch_stats, factor, self.eps,
        )


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

    The conv kind takes (B,C,H,W) maps, or (B,C,L) sequences when built with dims=1. The mlp kind takes (B,C) vectors (or (B,C,1,1) maps: same weights, same result). With
    `recompute` set, each evaluation keeps only its input for backward and is run again there
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
        return self.predict(x + self.embed(t, x.dim()))

    def predict(self, h: Tensor) -> Tensor:
        """The network on an input that already holds the time embedding."""
        return self.evaluate(self.layers, h)

    def scaled_output(self, h: Tensor, scale: float, shift: Tensor) -> Tensor:
        """scale * predict(h) + shift, in float32.

        In float32 the scale and shift fold into the last layer's affine (BatchNorm) or bias (linear),
        saving two passes; otherwise (autocast, SyncBatchNorm, ...) they are applied after it.
        """
        return self.evaluate(self._scaled_output, h, scale, shift)

    def evaluate(self, fn: Callable[..., Tensor], *args) -> Tensor:
        """fn(*args), recomputed in backward when `recompute` is set. The recomputation's BatchNorm
        updates are undone, so running statistics move once per evaluation, as without it."""
        if not (self.recompute and torch.is_grad_enabled()):
            return fn(*args)
        if torch.compiler.is_compiling():  # compiled, the rerun recomputes values but not buffer updates
            return checkpoint(fn, *args, use_reentrant=False)
        return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), buffers_restored(self)))

    def _scaled_output(self, h: Tensor, scale: float, shift: Tensor) -> Tensor:
        body, last = self.layers[:-1], self.layers[-1]
        y = body(h)
        shift = shift.float()
        if y.dtype == torch.float32 and type(last) is VectorBatchNorm and last.affine:
            return last.normalize(y, scale * last.weight, torch.add(shift.flatten(), last.bias, alpha=scale))
        if y.dtype == torch.float32 and type(last) is PointwiseConv and y.dim() == 2:
            return torch.addmm(torch.add(shift, last.bias, alpha=scale), y, last.weight.flatten(1).t(), alpha=scale)
        return torch.add(shift, last(y), alpha=scale)


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
