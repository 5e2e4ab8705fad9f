"""DiffKD for one distilled feature pair ("a level"): the boxes of the paper's Fig. 3 in one module.

`DiffKD.forward` reads as the method does (docs/design.md §1): projector -> autoencoder ->
adaptive noise matching start (Eq. 8) -> denoising chain (a sampler from diffusion.py) -> output
projection -> L_kd, L_diff, L_ae. Each step is a method written as its formula; the folded fast
path (folded.py) replaces the chain and the noise prediction as a whole, chosen once at construction.
Beyond the paper, off by default: the DPM-Solver++(2M) sampler, and distances wrapped by a
normalisation (normalizer.py: scale-free targets, logit standardization). The terms' weights are not
the level's: whoever trains it weighs them (diffkd.weighting); `DiffKDOutput.loss` sums them as the
paper does (all weights 1).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .diffusion import (
    DDIM,
    AdaptiveNoiseMatcher,
    NoisePredictor,
    NoiseSchedule,
    PointwiseConv,
    check_dims,
    conv_bn,
    make_sampler,
)
from .folded import FoldedPath
from .losses import Distance, resolve_distance


@dataclass
class DiffKDOutput:
    """What one DiffKD level returns: the denoised student feature, its target, the three terms unweighted
    (a Distiller weighs them in diffkd.weighting) and ANM's gamma."""

    denoised: Tensor
    target: Tensor
    kd_loss: Tensor
    diffusion_loss: Tensor
    ae_loss: Tensor | None
    gamma: Tensor | None

    @property
    def terms(self) -> dict[str, Tensor]:
        """kd, diffusion and (with the AE) ae, unweighted."""
        terms = {"kd": self.kd_loss, "diffusion": self.diffusion_loss}
        return terms if self.ae_loss is None else {**terms, "ae": self.ae_loss}

    @property
    def loss(self) -> Tensor:
        """L_kd + L_diff (+ L_ae): the terms at the paper's weights (1 each), for a level used alone."""
        return sum(self.terms.values())  # type: ignore[return-value]


class LinearAutoencoder(nn.Module):
    """Compresses the teacher feature to the latent width (1x1 conv + BN) and reconstructs it."""

    def __init__(self, channels: int, latent_channels: int):
        super().__init__()
        self.encoder = nn.Sequential(*conv_bn(channels, latent_channels))
        self.decoder = nn.Sequential(PointwiseConv(latent_channels, channels))  # maps and sequences alike

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        latent = self.encoder(x)
        return latent, self.decoder(latent)


def anm_start(z_s: Tensor, gamma: Tensor | None, noise: Tensor | None) -> Tensor:
    """Eq. 8, the chain's start: x = gamma z_s + (1 - gamma) eps per sample (float32); z_s itself without ANM."""
    if gamma is None:
        return z_s.float()
    g = gamma.view(-1, *([1] * (z_s.dim() - 1)))
    return g * z_s.float() + (1.0 - g) * noise.float()


class ReferencePath:
    """Start, chain and noise prediction exactly as written: Eq. 8, the sampler's own form, eps(x_t, t)."""

    memory_format = torch.contiguous_format

    def __init__(self, sampler: DDIM):
        self.sampler = sampler

    def denoise(self, predictor: NoisePredictor, z_s: Tensor, gamma: Tensor | None, noise: Tensor | None) -> Tensor:
        """The chain from the ANM start, returning x0 (before the output projection)."""
        return self.sampler(anm_start(z_s, gamma, noise), predictor)

    def predict_noise(self, predictor: NoisePredictor, schedule: NoiseSchedule, z_t: Tensor, noise: Tensor,
                      timesteps: Tensor) -> Tensor:
        """eps_hat(x_t, t) with x_t from the forward process."""
        return predictor(schedule.add_noise(z_t, noise, timesteps), timesteps)


# Official release key prefix -> ours; the layers inside each box are numbered identically.
OFFICIAL_KEY_PREFIXES = {
    "trans.": "projector.",
    "ae.": "autoencoder.",
    "model.time_embedding.": "noise_predictor.time_embedding.",
    "model.pred.": "noise_predictor.layers.",
    "noise_adapter.feat.": "noise_matcher.features.",
    "noise_adapter.pred.": "noise_matcher.head.",
    "proj.": "output_projection.",
}


class DiffKD(nn.Module):
    """One DiffKD level: denoise the student feature with a diffusion model trained on the teacher's.

    kind="conv" takes maps (B,C,H,W), or with dims=1 sequences (B,C,L) (the same boxes, the 3x3 convs
    become kernel-3 convs along L); kind="mlp" takes vectors (B,K) or (B,K,1,1) and returns the
    rank it was given. A student map (sequence) of another spatial size (length) is resized, bilinear
    (linear), to the teacher's after the 1x1 projector. fast=True (default) runs the chain and the
    noise prediction on the folded, channels-last path (folded.py); fast=False runs every formula as
    written on contiguous maps: the reference, the same maths (tests hold them together).
    recompute=True trades compute for memory: the noise predictor's six evaluations per step keep
    only their inputs and run again in backward (same gradients and BatchNorm statistics).

    `distance` is a name (mse, kl, dist, attention_mse: at its own temperature) or a distance object:
    `losses.NamedDistance(name, tau)`, or one wrapped by a normalisation (`normalizer.NormalizedDistance`:
    both sides mapped with the teacher target's per-channel statistics, its buffers the level's;
    `normalizer.StandardizedDistance`: z-scored logits before the KL). `sampler` names the chain's
    solver: "ddim" (the paper's) or "dpm_solver++" (DPM-Solver++(2M), the same timesteps and evaluations).
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        latent_channels: int | None = None,
        *,
        kind: str = "conv",
        dims: int = 2,
        inference_steps: int = 5,
        adaptive_noise: bool = True,
        distance: str | Distance = "mse",
        sampler: str = "ddim",
        num_train_timesteps: int = 1000,
        fast: bool = True,
        recompute: bool = False,
    ):
        super().__init__()
        check_level(kind, dims, student_channels, teacher_channels, latent_channels)
        self.kind, self.dims = kind, dims
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self.latent_channels = latent_channels
        width = latent_channels or teacher_channels
        schedule = NoiseSchedule(num_train_timesteps)
        self.sampler = make_sampler(sampler, schedule, inference_steps)
        self.distance = resolve_distance(distance)  # a module (a normalisation with buffers) is a submodule

        # The boxes of Fig. 3.
        self.projector = PointwiseConv(student_channels, width)
        self.autoencoder = LinearAutoencoder(teacher_channels, width) if latent_channels else None
        self.noise_predictor = NoisePredictor(width, kind, recompute, dims)
        self.noise_matcher = AdaptiveNoiseMatcher(width, kind, dims) if adaptive_noise else None
        self.output_projection = nn.Sequential(*conv_bn(width, width))
        self.schedule = schedule

        # How the chain and the noise prediction are computed, chosen once. The autoencoder keeps the
        # default layout and reads the teacher map as the teacher made it (relaying out a wide map costs
        # more than it saves); the other boxes take the path's layout.
        self.path = FoldedPath(self.sampler, kind, dims) if fast else ReferencePath(self.sampler)
        for box in (self.projector, self.noise_predictor, self.noise_matcher, self.output_projection):
            if box is not None:
                box.to(memory_format=self.path.memory_format)

    # ----------------------------------------------------------------------------- forward: the method, top to bottom
    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        start_noise: Tensor | None = None,
        diffusion_noise: Tensor | None = None,
        diffusion_timesteps: Tensor | None = None,
    ) -> DiffKDOutput:
        """Denoise the student feature and compute all losses; noises may be given for testing."""
        s, t = self.check_inputs(student, teacher.detach())  # the teacher gets no gradient
        z_s = self.project_student(s, t.shape[2:])
        z_t, ae_loss = self.encode_teacher(t)
        denoised, gamma = self.denoise(z_s, start_noise)
        diffusion = self.diffusion_loss(z_t, diffusion_noise, diffusion_timesteps)
        kd = self.distance(denoised, z_t)  # L_kd = d(z_s_hat, z_t)
        if student.dim() != denoised.dim():  # the mlp kind returns the rank it was given
            denoised, z_t = denoised.view(student.shape[0], -1, 1, 1), z_t.view(student.shape[0], -1, 1, 1)
        return DiffKDOutput(denoised, z_t, kd, diffusion, ae_loss, gamma)

    def project_student(self, student: Tensor, size: torch.Size) -> Tensor:
        """z_s: the student feature in the latent space, resized to the teacher's spatial size (length)."""
        z = self.projector(student)
        if z.dim() > 2 and z.shape[2:] != size:
            mode = "bilinear" if z.dim() == 4 else "linear"
            z = F.interpolate(z, size=tuple(size), mode=mode, align_corners=False)
        return z

    def encode_teacher(self, teacher: Tensor) -> tuple[Tensor, Tensor | None]:
        """z_t, the distillation target, and L_ae = MSE(decoder(encoder(t)), t); without the autoencoder z_t = t.

        z_t is detached: the autoencoder learns from L_ae only.
        """
        if self.autoencoder is None:
            return self.in_layout(teacher), None
        latent, reconstruction = self.autoencoder(teacher)
        return self.in_layout(latent.detach()), F.mse_loss(reconstruction.float(), teacher.float())

    def denoise(self, z_s: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """z_s_hat and gamma: ANM's gamma, the chain from Eq. 8's start, then the output projection."""
        gamma = None
        if self.noise_matcher is not None:  # without ANM (ablation) the chain starts from z_s, no noise drawn
            gamma = self.noise_matcher(z_s)
            noise = self.draw_noise(z_s, noise)
        x0 = self.path.denoise(self.noise_predictor, z_s, gamma, noise)
        return self.output_projection(x0), gamma

    def diffusion_loss(self, z_t: Tensor, noise: Tensor | None = None, timesteps: Tensor | None = None) -> Tensor:
        """L_diff = MSE(eps(x_t, t), eps), x_t = sqrt(abar_t) z_t + sqrt(1 - abar_t) eps, t ~ U{0..T-1} per sample."""
        if timesteps is None:
            timesteps = torch.randint(0, self.schedule.num_train_timesteps, (z_t.shape[0],), device=z_t.device)
        noise = self.draw_noise(z_t, noise)
        eps_hat = self.path.predict_noise(self.noise_predictor, self.schedule, z_t, noise, timesteps)
        return F.mse_loss(eps_hat.float(), noise.float())

    def draw_noise(self, like: Tensor, noise: Tensor | None) -> Tensor:
        """eps ~ N(0, I) shaped like `like` (or the given one), drawn in (B,C,H,W) order and then laid out,
        so both paths get the same noise from one seed."""
        noise = torch.randn(like.shape, device=like.device) if noise is None else noise.reshape(like.shape)
        return self.in_layout(noise)

    # ----------------------------------------------------------------------------- input checks
    def check_inputs(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """Validate shapes against the configuration; the mlp kind works on (B,K) vectors."""
        for role, x, channels in (("student", student, self.student_channels), ("teacher", teacher, self.teacher_channels)):
            if self.kind == "conv":
                expected = "(B,C,H,W)" if self.dims == 2 else "(B,C,L) (dims=1)"
            else:
                expected = "(B,K) or (B,K,1,1)"
            ok_rank = x.dim() == self.dims + 2 if self.kind == "conv" else x.dim() in (2, 4)
            if not ok_rank or (self.kind == "mlp" and x.dim() == 4 and x.shape[2:] != (1, 1)):
                raise ValueError(f"DiffKD(kind={self.kind!r}) expects {role} {expected}, got {tuple(x.shape)}")
            if x.shape[1] != channels:
                raise ValueError(f"DiffKD expects {channels} {role} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(f"DiffKD: batch sizes differ: student {student.shape[0]}, teacher {teacher.shape[0]}")
        if self.training and self.kind == "mlp" and student.shape[0] < 2:
            raise ValueError(
                "DiffKD(kind='mlp') needs a batch of at least 2 in training mode "
                f"(its BatchNorm cannot train on one value per channel), got batch {student.shape[0]}"
            )
        if self.training and self.kind == "conv" and math.prod(teacher.shape[:1] + teacher.shape[2:]) < 2:
            raise ValueError(
                "DiffKD(kind='conv') needs at least 2 values per channel in training mode (batch x positions "
                f"of the teacher map; its BatchNorm cannot train on one), got teacher {tuple(teacher.shape)}"
            )
        self.check_dtypes(student, teacher)
        if self.kind == "mlp":
            return student.flatten(1), teacher.flatten(1)
        return self.in_layout(student), teacher

    def check_dtypes(self, student: Tensor, teacher: Tensor) -> None:
        """DiffKD runs with float32 parameters on float32 features, or lower-precision ones under autocast
        (a free check: no data is read)."""
        dtype = self.projector.weight.dtype
        if dtype != torch.float32:
            raise TypeError(
                f"DiffKD runs with float32 parameters, got {dtype}; call .float() on it and use torch.autocast "
                "for bf16/fp16"
            )
        low = (torch.bfloat16, torch.float16) if torch.is_autocast_enabled(student.device.type) else ()
        for role, x in (("student", student), ("teacher", teacher)):
            if x.dtype != dtype and x.dtype not in low:
                raise TypeError(
                    f"DiffKD: {role} features are {x.dtype} but its parameters are {dtype}; pass the features "
                    f".to({dtype}) (for bf16/fp16 features, run under torch.autocast)"
                )

    def in_layout(self, x: Tensor) -> Tensor:
        """x in the module's memory format (a no-op for vectors and for maps already in it)."""
        return x.contiguous(memory_format=self.path.memory_format) if x.dim() == 4 else x

    def extra_repr(self) -> str:
        variants = f", sampler={self.sampler.name!r}" if self.sampler.name != "ddim" else ""
        return (
            f"kind={self.kind!r}, dims={self.dims}, student={self.student_channels}, teacher={self.teacher_channels}, "
            f"latent={self.latent_channels}, steps={self.sampler.timesteps}{variants}"
        )

    # ----------------------------------------------------------------------------- official weights
    @classmethod
    def from_official_state_dict(cls, state_dict: Mapping[str, Tensor], **options) -> DiffKD:
        """Build a level from a state dict saved by the official release (its DiffKD module).

        Channels, kind, AE and ANM are read off the tensors; `options` sets the rest
        (inference_steps, distance, sampler, ...).
        """
        sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
        if "trans.weight" not in sd or "model.time_embedding.weight" not in sd:
            raise ValueError(
                "not an official DiffKD state dict: expected keys 'trans.weight' and "
                f"'model.time_embedding.weight', got {sorted(sd)[:8]}..."
            )
        width, student_channels = sd["trans.weight"].shape[:2]
        has_ae = "ae.encoder.0.weight" in sd
        teacher_channels = sd["ae.decoder.0.weight"].shape[0] if has_ae else width
        kind = "conv" if "model.pred.0.block.0.weight" in sd else "mlp"
        level = cls(
            student_channels, teacher_channels, width if has_ae else None, kind=kind,
            adaptive_noise="noise_adapter.pred.weight" in sd, **options,
        )
        level.load_state_dict(convert_official_keys(sd), strict=True)
        return level


def check_level(kind: str, dims: int, student_channels: int, teacher_channels: int, latent_channels: int | None) -> None:
    """One-line errors for a level's shape options that cannot work together."""
    if kind not in ("conv", "mlp"):
        raise ValueError(f"unknown kind {kind!r}; expected 'conv' (maps) or 'mlp' (vectors)")
    if latent_channels is not None and kind != "conv":
        raise ValueError("the autoencoder (latent_channels) is for feature maps only (kind='conv')")
    check_dims(dims)
    if dims != 2 and kind != "conv":
        raise ValueError(f"dims is the conv kind's spatial rank; kind={kind!r} takes vectors, drop dims={dims}")
    for name, count in (("student_channels", student_channels), ("teacher_channels", teacher_channels),
                        ("latent_channels", latent_channels)):  # fmt: skip
        if count is not None and (isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1):
            raise ValueError(f"DiffKD {name} must be a positive integer, got {count!r}")


def convert_official_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename official DiffKD keys (trans., model.pred., noise_adapter., proj., ae.) to ours."""
    out = {}
    for key, value in state_dict.items():
        prefix = next((p for p in OFFICIAL_KEY_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"unexpected key {key!r} in official DiffKD state dict")
        out[OFFICIAL_KEY_PREFIXES[prefix] + key[len(prefix):]] = value
    return out
