"""DiffKD for one distilled feature pair ("a level"): the boxes of the paper's Fig. 3 in one module.

student feature -> projector -> (adaptive noise matching) -> DDIM denoising with a noise predictor
trained on teacher latents -> output projection -> distance to the (auto-encoded) teacher feature.
Beyond the paper, off by default: a warm-up of the kd weight, scale-free (normalised) targets, the
DPM-Solver++(2M) sampler and logit standardization (see `DiffKD`).
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
    AdaptiveNoiseMatcher,
    NoisePredictor,
    NoiseSchedule,
    PointwiseConv,
    check_dims,
    check_sampler,
    conv_bn,
    denoise,
    denoise_folded,
    denoise_multistep,
    denoise_multistep_folded,
)
from .losses import Distance, compares_distributions, resolve_distance
from .normalizer import TargetNormalizer


@dataclass
class DiffKDOutput:
    """What one DiffKD level returns; `loss` is the weighted sum of the three terms."""

    denoised: Tensor
    target: Tensor
    kd_loss: Tensor
    diffusion_loss: Tensor
    ae_loss: Tensor | None
    gamma: Tensor | None
    loss: Tensor


class LinearAutoencoder(nn.Module):
    """Compresses the teacher feature to the latent width (1x1 conv + BN) and reconstructs it."""

    def __init__(self, channels: int, latent_channels: int):
        super().__init__()
        self.encoder = nn.Sequential(*conv_bn(channels, latent_channels))
        self.decoder = nn.Sequential(PointwiseConv(latent_channels, channels))  # maps and sequences alike

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        latent = self.encoder(x)
        return latent, self.decoder(latent)


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
    (linear), to the teacher's after the 1x1 projector. fast=True (default) computes maps channels-last and folds the
    time embeddings and DDIM updates into the noise predictor's last layer; fast=False runs every
    formula as written on contiguous maps: the reference, the same maths (tests hold them together).
    recompute=True trades compute for memory: the noise predictor's six evaluations per step keep
    only their inputs and run again in backward (same gradients and BatchNorm statistics).

    Variants beyond the paper, all off by default: kd_warmup_epochs ramps the kd weight linearly from
    0 over that many epochs, per step (call `set_progress` before each step; the diffusion and AE
    losses train from step 0); normalize_target=True measures the distance after normalising both
    sides per channel with the teacher target's statistics (`TargetNormalizer`); sampler="dpm_solver++"
    runs DPM-Solver++(2M) over the same timesteps and evaluations; standardize=True z-scores the
    logits before the KL (distance="kl").
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
        tau: float | None = None,
        kd_weight: float = 1.0,
        diffusion_weight: float = 1.0,
        ae_weight: float = 1.0,
        num_train_timesteps: int = 1000,
        fast: bool = True,
        recompute: bool = False,
        kd_warmup_epochs: float = 0.0,
        normalize_target: bool = False,
        sampler: str = "ddim",
        standardize: bool = False,
    ):
        super().__init__()
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
        check_variant_options(kd_warmup_epochs, normalize_target, distance)
        self.sampler = check_sampler(sampler)
        self.kind = kind
        self.dims = dims
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.latent_channels = latent_channels
        self.inference_steps = inference_steps
        self.kd_weight, self.diffusion_weight, self.ae_weight = kd_weight, diffusion_weight, ae_weight
        self.distance = resolve_distance(distance, tau, standardize)  # tau None: the distance's own
        width = latent_channels or teacher_channels

        self.projector = PointwiseConv(student_channels, width)
        self.autoencoder = LinearAutoencoder(teacher_channels, width) if latent_channels else None
        self.noise_predictor = NoisePredictor(width, kind, recompute, dims)
        self.noise_matcher = AdaptiveNoiseMatcher(width, kind, dims) if adaptive_noise else None
        self.output_projection = nn.Sequential(*conv_bn(width, width))
        self.target_normalizer = TargetNormalizer(width) if normalize_target else None
        self.schedule = NoiseSchedule(num_train_timesteps)
        self.chain = self.schedule.ddim_coefficients(inference_steps)
        self.solver_steps = self.schedule.dpm_solver_coefficients(inference_steps) if sampler == "dpm_solver++" else None
        self.kd_warmup_epochs = float(kd_warmup_epochs)
        self._progress_set = False
        if self.kd_warmup_epochs > 0:  # the ramp's factor as a tensor: a compiled level reads it without recompiling
            self.register_buffer("kd_ramp", torch.zeros(()), persistent=False)
        # Channels-last maps: the same maths, but the small convs and BatchNorms of the chain get
        # faster kernels (benchmarks/module_speed.py). Sequences and vectors keep the default layout.
        self.fast = fast
        self.memory_format = torch.channels_last if fast and kind == "conv" and dims == 2 else torch.contiguous_format
        for box in (self.projector, self.noise_predictor, self.noise_matcher, self.output_projection):
            if box is not None:
                box.to(memory_format=self.memory_format)
        # The autoencoder keeps the default layout and reads the teacher map as the teacher made it:
        # relaying out a wide teacher map costs more than it saves. Its narrow latent is laid out.

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
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    # ----------------------------------------------------------------------------- the boxes
    def project_student(self, student: Tensor, size: torch.Size) -> Tensor:
        """z_s: the student feature in the latent space, resized to the teacher's spatial size (length)."""
        z = self.projector(student)
        if z.dim() > 2 and z.shape[2:] != size:
            mode = "bilinear" if z.dim() == 4 else "linear"
            z = F.interpolate(z, size=tuple(size), mode=mode, align_corners=False)
        return z

    def start(self, z_s: Tensor, noise: Tensor | None = None, offset: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Start of the chain: gamma * z_s + (1 - gamma) * eps (Eq. 8), or z_s without ANM.

        `offset` (the fast path's first time embedding) is added in the same passes.
        """
        if self.noise_matcher is None:
            return (z_s.float(), None) if offset is None else (z_s.float() + offset.float(), None)
        gamma = self.noise_matcher(z_s)
        # Drawn in (B,C,H,W) order, then laid out: both paths get the same noise from one seed.
        noise = torch.randn(z_s.shape, device=z_s.device) if noise is None else noise.reshape(z_s.shape)
        noise = self.in_layout(noise)
        g = gamma.view(-1, *([1] * (z_s.dim() - 1)))
        if offset is None:
            return g * z_s.float() + (1.0 - g) * noise.float(), gamma
        return torch.addcmul(torch.addcmul(offset.float(), noise.float(), 1.0 - g), z_s.float(), g), gamma

    def denoise(self, z_s: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """z_s_hat: the denoised student latent after the chain (DDIM or DPM-Solver++) and the output projection."""
        if self.fast:
            h, gamma = self.start(z_s, noise, offset=self.noise_predictor.embed(self.chain[0][0], z_s.dim()))
            if self.solver_steps is None:
                x = denoise_folded(h, self.noise_predictor, self.chain)
            else:
                x = denoise_multistep_folded(h, self.noise_predictor, self.solver_steps)
        else:
            x, gamma = self.start(z_s, noise)
            if self.solver_steps is None:
                x = denoise(x, self.noise_predictor, self.chain)
            else:
                x = denoise_multistep(x, self.noise_predictor, self.solver_steps)
        return self.output_projection(x), gamma

    def diffusion_loss(self, z_t: Tensor, noise: Tensor | None = None, timesteps: Tensor | None = None) -> Tensor:
        """L_diff: the noise predictor learns to recover eps from noised teacher latents."""
        if timesteps is None:
            timesteps = torch.randint(0, self.schedule.num_train_timesteps, (z_t.shape[0],), device=z_t.device)
        noise = torch.randn(z_t.shape, device=z_t.device) if noise is None else noise.reshape(z_t.shape)
        noise = self.in_layout(noise)
        if self.fast:  # the time embedding joins the noising passes
            x_t = self.schedule.add_noise(z_t, noise, timesteps, offset=self.noise_predictor.embed(timesteps, z_t.dim()))
            eps_hat = self.noise_predictor.predict(x_t)
        else:
            eps_hat = self.noise_predictor(self.schedule.add_noise(z_t, noise, timesteps), timesteps)
        return F.mse_loss(eps_hat.float(), noise.float())

    # ----------------------------------------------------------------------------- forward
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
        if self.autoencoder is not None:
            latent, reconstruction = self.autoencoder(t)
            ae_loss: Tensor | None = F.mse_loss(reconstruction.float(), t.float())
            z_t = self.in_layout(latent.detach())
        else:
            ae_loss, z_t = None, self.in_layout(t)
        denoised, gamma = self.denoise(z_s, start_noise)
        diffusion = self.diffusion_loss(z_t, diffusion_noise, diffusion_timesteps)
        if self.target_normalizer is None:
            kd = self.distance(denoised, z_t)
        else:  # both sides with the target's per-channel statistics: a scale-free distance
            kd = self.distance(*self.target_normalizer(denoised, z_t))
        if student.dim() != denoised.dim():  # the mlp kind returns the rank it was given
            denoised, z_t = denoised.view(student.shape[0], -1, 1, 1), z_t.view(student.shape[0], -1, 1, 1)
        loss = self.current_kd_weight() * kd + self.diffusion_weight * diffusion
        if ae_loss is not None:
            loss = loss + self.ae_weight * ae_loss
        return DiffKDOutput(denoised, z_t, kd, diffusion, ae_loss, gamma, loss)

    # ----------------------------------------------------------------------------- kd warm-up
    def set_progress(self, epoch: float, epochs: int) -> None:
        """Where training stands (fractional 0-based epoch, of `epochs`): sets the kd warm-up's ramp.

        Call it before every step when kd_warmup_epochs > 0 (the engine and `Distiller.set_progress` do).
        """
        if self.kd_warmup_epochs > 0:
            self.kd_ramp.fill_(min(1.0, max(0.0, epoch) / self.kd_warmup_epochs))
            self._progress_set = True

    def current_kd_weight(self) -> float | Tensor:
        """kd_weight, times the warm-up's ramp min(1, epoch / kd_warmup_epochs) while there is one."""
        if self.kd_warmup_epochs == 0:
            return self.kd_weight
        if self.training and not self._progress_set:
            raise ValueError(
                f"DiffKD(kd_warmup_epochs={self.kd_warmup_epochs:g}) ramps its kd weight with training: call "
                "set_progress(epoch, epochs) before each step (the engine and Distiller.set_progress do)"
            )
        return self.kd_weight * self.kd_ramp

    def extra_repr(self) -> str:
        variants = "".join([
            f", kd_warmup_epochs={self.kd_warmup_epochs:g}" if self.kd_warmup_epochs else "",
            f", sampler={self.sampler!r}" if self.sampler != "ddim" else "",
        ])
        return (
            f"kind={self.kind!r}, dims={self.dims}, student={self.student_channels}, teacher={self.teacher_channels}, "
            f"latent={self.latent_channels}, steps={[t for t, _, _ in self.chain]}{variants}"
        )

    # ----------------------------------------------------------------------------- official weights
    @classmethod
    def from_official_state_dict(cls, state_dict: Mapping[str, Tensor], **options) -> DiffKD:
        """Build a level from a state dict saved by the official release (its DiffKD module).

        Channels, kind, AE and ANM are read off the tensors; `options` sets the rest
        (inference_steps, distance, weights, ...).
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


def check_variant_options(kd_warmup_epochs: float, normalize_target: bool, distance: str | Distance) -> None:
    """One-line errors for the beyond-the-paper options that cannot work as given."""
    if not kd_warmup_epochs >= 0:
        raise ValueError(f"kd_warmup_epochs must be >= 0 (0: no warm-up), got {kd_warmup_epochs}")
    if normalize_target and compares_distributions(distance):  # per-channel rescaling would change them
        raise ValueError(
            f"normalize_target=True rescales each channel, which changes the class distributions distance={distance!r} "
            "compares; use it with a feature distance ('mse', 'attention_mse') or set normalize_target=False"
        )


def convert_official_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename official DiffKD keys (trans., model.pred., noise_adapter., proj., ae.) to ours."""
    out = {}
    for key, value in state_dict.items():
        prefix = next((p for p in OFFICIAL_KEY_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"unexpected key {key!r} in official DiffKD state dict")
        out[OFFICIAL_KEY_PREFIXES[prefix] + key[len(prefix):]] = value
    return out
