"""Distillation distances: KD, DIST, DKD, MSE and attention-weighted MSE (docs/design.md §5).

Every function computes in float32, whatever the autocast dtype of its inputs, so the losses stay
finite under bf16/fp16. Dense maps (B,C,H,W) are treated as B*H*W samples of C classes, and
sequences (B,C,L) (frame-wise logits, channel-first as every diffkd tap hands them out) as B*L.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Distance = Callable[[Tensor, Tensor], Tensor]


def as_rows(x: Tensor) -> Tensor:
    """(B,K) stays; (B,C,L) -> (B*L, C) and (B,C,H,W) -> (B*H*W, C): one row per sample (position,
    pixel), classes along columns."""
    if x.dim() == 2:
        return x.float()
    if x.dim() in (3, 4):
        return x.float().movedim(1, -1).reshape(-1, x.shape[1])
    raise ValueError(f"expected logits of shape (B,K), (B,C,L) or (B,C,H,W), got {tuple(x.shape)}")


def _check_same_shape(student: Tensor, teacher: Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student and teacher shapes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}"
        )


def standardize_logits(logits: Tensor) -> Tensor:
    """Logit standardization (Sun et al., CVPR 2024): z-score each row over its classes,
    (z - mean) / (1e-7 + std) with the unbiased std, so the softmax sees shape, not scale."""
    return (logits - logits.mean(dim=1, keepdim=True)) / (1e-7 + logits.std(dim=1, keepdim=True))


def kd_loss(student: Tensor, teacher: Tensor, tau: float = 4.0, standardize: bool = False) -> Tensor:
    """Hinton KD: tau^2 * KL(softmax(t/tau) || softmax(s/tau)), summed over classes, mean over samples.

    standardize=True z-scores both sides' logits per sample first (`standardize_logits`).
    """
    _check_same_shape(student, teacher, "kd_loss")
    s, t = as_rows(student), as_rows(teacher)
    if standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    log_q = F.log_softmax(s / tau, dim=1)
    log_p = F.log_softmax(t / tau, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean() * tau**2


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of matching rows of a and b: centre each row, then cosine."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)


def dist_loss(
    student: Tensor, teacher: Tensor, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0
) -> Tensor:
    """DIST: inter-class (per sample) plus intra-class (per class) Pearson relations of softmaxes."""
    _check_same_shape(student, teacher, "dist_loss")
    y_s = F.softmax(as_rows(student) / tau, dim=1)
    y_t = F.softmax(as_rows(teacher) / tau, dim=1)
    inter = 1.0 - pearson_rows(y_s, y_t).mean()
    intra = 1.0 - pearson_rows(y_s.t(), y_t.t()).mean()
    return tau**2 * (beta * inter + gamma * intra)


def dkd_loss(
    student: Tensor, teacher: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 8.0, tau: float = 4.0,
    standardize: bool = False,
) -> Tensor:
    """DKD: alpha * target-class KD (binary) + beta * non-target KD (target masked out), times tau^2.

    standardize=True z-scores both sides' logits per sample before the temperature (`standardize_logits`).
    """
    _check_same_shape(student, teacher, "dkd_loss")
    if student.dim() != 2:
        raise ValueError(f"dkd_loss expects logits (B,K), got {tuple(student.shape)}")
    if target.shape != student.shape[:1]:
        raise ValueError(f"dkd_loss expects targets of shape ({student.shape[0]},), got {tuple(target.shape)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(
            f"dkd_loss: targets must be integer class indices, got dtype {target.dtype}; pass the class labels "
            "as a torch.long tensor"
        )
    s, t = student.float(), teacher.float()
    if standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    s, t = s / tau, t / tau
    is_target = F.one_hot(target.long(), s.shape[1]).bool()

    def binary_log_probs(z: Tensor) -> Tensor:
        log_all = torch.logsumexp(z, dim=1)
        log_target = z[is_target] - log_all
        log_rest = torch.logsumexp(z.masked_fill(is_target, float("-inf")), dim=1) - log_all
        return torch.stack([log_target, log_rest], dim=1)

    def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
        return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()

    tckd = kl(binary_log_probs(t), binary_log_probs(s))
    rest = ~is_target
    k_rest = s.shape[1] - 1
    nckd = kl(
        F.log_softmax(t[rest].view(-1, k_rest), dim=1), F.log_softmax(s[rest].view(-1, k_rest), dim=1)
    )
    return tau**2 * (alpha * tckd + beta * nckd)


def mse_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error in float32."""
    _check_same_shape(student, teacher, "mse_loss")
    return F.mse_loss(student.float(), teacher.float())


def attention_mse_loss(student: Tensor, teacher: Tensor, tau: float = 0.5) -> Tensor:
    """MSE weighted by the teacher's spatial (H*W*softmax) and channel (C*softmax) attention."""
    _check_same_shape(student, teacher, "attention_mse_loss")
    if teacher.dim() != 4:
        raise ValueError(f"attention_mse_loss expects maps (B,C,H,W), got {tuple(teacher.shape)}")
    s, t = student.float(), teacher.float()
    b, c, h, w = t.shape
    magnitude = t.abs()
    spatial = h * w * F.softmax(magnitude.mean(dim=1).reshape(b, -1) / tau, dim=1).view(b, 1, h, w)
    channel = c * F.softmax(magnitude.mean(dim=(2, 3)) / tau, dim=1).view(b, c, 1, 1)
    return ((s - t) ** 2 * spatial * channel).mean()


@dataclass(frozen=True)
class DistanceInfo:
    """A named distance: its function, whether it compares class distributions (softmaxes of logits, so
    both sides need the same classes and no per-channel rescaling), and its own temperature (None: none)."""

    fn: Callable[..., Tensor]
    compares_distributions: bool
    tau: float | None


# The temperatures are the distances' defaults as a DiffKD level uses them: KL and DIST on logits at 1 (the
# paper's classification setting), attention-MSE at 0.5 (its detection setting).
DISTANCES: dict[str, DistanceInfo] = {
    "mse": DistanceInfo(mse_loss, False, None),
    "kl": DistanceInfo(kd_loss, True, 1.0),
    "dist": DistanceInfo(dist_loss, True, 1.0),
    "attention_mse": DistanceInfo(attention_mse_loss, False, 0.5),
}


def distance_info(distance: str) -> DistanceInfo:
    """The registry entry of a named distance; an unknown name gets the closest one and the list."""
    if distance not in DISTANCES:
        close = difflib.get_close_matches(str(distance), DISTANCES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown distance {distance!r}{hint}; expected one of {sorted(DISTANCES)} or a callable")
    return DISTANCES[distance]


class NamedDistance:
    """A registered distance (mse, kl, dist, attention_mse) at a temperature: callable(student, teacher) -> loss.

    `tau` None takes the distance's own temperature; a distance without one refuses a tau.
    """

    def __init__(self, name: str, tau: float | None = None):
        info = distance_info(name)
        if info.tau is None and tau is not None:
            raise ValueError(f"distance {name!r} has no temperature, but tau={tau} was given: drop tau")
        self.name, self.fn, self.compares_distributions = name, info.fn, info.compares_distributions
        self.tau = info.tau if tau is None else tau

    def __call__(self, student: Tensor, teacher: Tensor) -> Tensor:
        return self.fn(student, teacher) if self.tau is None else self.fn(student, teacher, tau=self.tau)

    def __repr__(self) -> str:
        return f"NamedDistance({self.name!r}{'' if self.tau is None else f', tau={self.tau:g}'})"


def compares_distributions(distance: str | Distance) -> bool:
    """Whether `distance` compares class distributions: a name by its registry entry, an object by its own
    `compares_distributions` (a plain callable is taken as a feature distance)."""
    if isinstance(distance, str):
        return distance_info(distance).compares_distributions
    return bool(getattr(distance, "compares_distributions", False))


def resolve_distance(distance: str | Distance, tau: float | None = None) -> Distance:
    """A distance object: a name (mse, kl, dist, attention_mse) at temperature `tau` (None: its own), or any
    callable(student, teacher) -> loss as it is (which takes no tau)."""
    if callable(distance):
        if tau is not None:
            raise ValueError(f"tau={tau} is for a named distance; a callable distance takes no temperature: drop tau")
        return distance
    return NamedDistance(distance, tau)
