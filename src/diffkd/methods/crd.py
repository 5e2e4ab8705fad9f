"""CRD: contrastive representation distillation with a memory bank of every training sample (NCE).

Tian, Krishnan and Isola, "Contrastive Representation Distillation", ICLR 2020. Computed as the
reference code (RepDistiller) does; docs/design.md §5. Each batch brings its samples' dataset
indices: the method declares `needs_indices`, so `diffkd distill` feeds them for every task.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .base import Method, MethodOutput, float32_math, pooled_vector, require_per_sample_channels

EPS = 1e-7
SAMPLING = ("other_classes", "uniform")
MAX_REDRAWS = 100  # rounds of redrawing same-class negatives before giving up


def _all_processes(x: Tensor) -> Tensor:
    """x concatenated over every DDP process (x itself when not distributed), so all banks see all updates."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _process_mean(x: Tensor) -> Tensor:
    """The mean of a scalar over every DDP process (x itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def nce_loss(p: Tensor, dataset_size: int) -> Tensor:
    """NCE of (B, 1+K) probabilities, positive first, noise 1/dataset_size, summed and divided by B."""
    noise = p.shape[1] - 1
    mass = noise / dataset_size
    positive = torch.log(p[:, 0] / (p[:, 0] + mass + EPS))
    negative = torch.log(mass / (p[:, 1:] + mass + EPS))
    return -(positive.sum() + negative.sum()) / len(p)


def draw_negatives(batch: int, negatives: int, dataset_size: int, device: torch.device,
                   row_labels: Tensor | None = None, anchor_labels: Tensor | None = None) -> Tensor:
    """(batch, negatives) rows drawn uniformly (with replacement) from [0, dataset_size).

    With row_labels (the class of each row, -1 where unknown) and the anchors' labels, a draw of the
    anchor's class is redrawn until none is left: uniform among the rows of other (or unknown) classes.
    """
    draw = torch.randint(dataset_size, (batch, negatives), device=device)
    if row_labels is None or anchor_labels is None:
        return draw
    for _ in range(MAX_REDRAWS):
        same = row_labels[draw] == anchor_labels[:, None]
        if not bool(same.any()):
            return draw
        draw[same] = torch.randint(dataset_size, (int(same.sum()),), device=device)
    raise RuntimeError(
        "crd could not draw negatives of another class than the anchors' (are nearly all samples of one "
        "class?); set negative_sampling='uniform'"
    )


class CRD(Method):
    """L_s + L_t over 128-d embeddings (weight 0.8 in the recipes), two momentum memory banks, 16384 negatives.

    Accepts any (B,C,...) tap on each side (vectors, sequences, maps: pooled over every dim after C).
    Negatives ("other_classes", the paper's code): drawn uniformly among the rows whose class differs
    from the anchor's; a row's class is learnt when its sample is first seen (the method needs the
    (B,) class labels as targets), so in the first epoch rows not seen yet also count as candidates;
    they still hold their random initial values then, as do most rows in the reference's first epoch.
    "uniform" draws among all rows, for tasks without per-sample classes. The banks, the learnt
    classes and the normalisers Z (fixed on the first training forward) are buffers, so they are in
    the checkpoint. Under DDP every process updates its banks with the whole global batch.
    """

    needs_targets = True
    needs_indices = True

    def __init__(self, student_channels: int, teacher_channels: int, dataset_size: int, feat_dim: int = 128,
                 negatives: int = 16384, temperature: float = 0.07, momentum: float = 0.5,
                 negative_sampling: str = "other_classes"):
        super().__init__()
        if negative_sampling not in SAMPLING:
            raise ValueError(f"crd: negative_sampling must be one of {', '.join(SAMPLING)}, got {negative_sampling!r}")
        if not isinstance(dataset_size, int) or dataset_size < 2:
            raise ValueError(f"crd needs a training set of at least 2 samples, got dataset_size={dataset_size!r}")
        self.dataset_size, self.negatives = dataset_size, negatives
        self.temperature, self.momentum, self.negative_sampling = temperature, momentum, negative_sampling
        self.embed_student = nn.Linear(student_channels, feat_dim)
        self.embed_teacher = nn.Linear(teacher_channels, feat_dim)
        bound = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_student", torch.rand(dataset_size, feat_dim) * 2 * bound - bound)
        self.register_buffer("memory_teacher", torch.rand(dataset_size, feat_dim) * 2 * bound - bound)
        self.register_buffer("normalizers", torch.full((2,), -1.0))  # Z_s, Z_t; < 0 until the first forward
        if negative_sampling == "other_classes":
            self.register_buffer("labels", torch.full((dataset_size,), -1, dtype=torch.long))

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, **options) -> "CRD":
        for shape in (student_shape, teacher_shape):
            require_per_sample_channels("crd", shape)
        return cls(student_shape[1], teacher_shape[1], **options)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None,
                indices: Tensor | None = None) -> MethodOutput:
        indices = self._check_indices(indices, len(student))
        labels = self._check_labels(targets, len(student)) if self.negative_sampling == "other_classes" else None
        if labels is not None and self.training:
            self.labels[_all_processes(indices)] = _all_processes(labels)
        with float32_math(student):
            f_s = self._embed(self.embed_student, pooled_vector("crd", student))
            f_t = self._embed(self.embed_teacher, pooled_vector("crd", teacher.detach()))
            negatives = draw_negatives(len(indices), self.negatives, self.dataset_size, indices.device,
                                       self.labels if labels is not None else None, labels)
            contrast = torch.cat([indices[:, None], negatives], dim=1)
            scores_s = self._scores(self.memory_teacher, contrast, f_s)
            scores_t = self._scores(self.memory_student, contrast, f_t)
            z_s, z_t = self._normalizers(scores_s, scores_t)
            loss_s = nce_loss(scores_s / z_s, self.dataset_size)
            loss_t = nce_loss(scores_t / z_t, self.dataset_size)
        if self.training:
            self._update(indices, f_s, f_t)
        return MethodOutput({"crd": loss_s + loss_t})

    # ----------------------------------------------------------------------------- parts
    @staticmethod
    def _embed(head: nn.Linear, x: Tensor) -> Tensor:
        e = head(x)
        return e / e.norm(dim=1, keepdim=True)

    def _scores(self, memory: Tensor, contrast: Tensor, f: Tensor) -> Tensor:
        """exp(<memory[contrast[b, k]], f_b> / T), (B, 1+K); memory rows carry no gradient."""
        if self.dataset_size <= contrast.shape[1]:  # fewer rows than draws: score every row once, then pick
            dots = (f @ memory.detach().clone().t()).gather(1, contrast)
        else:
            rows = memory.detach()[contrast.reshape(-1)].view(*contrast.shape, -1)
            dots = torch.bmm(rows, f[:, :, None]).squeeze(2)
        return torch.exp(dots / self.temperature)

    def _normalizers(self, scores_s: Tensor, scores_t: Tensor) -> tuple[Tensor, Tensor]:
        """Z_s, Z_t: the stored ones, or on the first forward mean(exp-scores) * dataset_size (kept when training)."""
        if bool((self.normalizers < 0).any()):
            estimate = torch.stack([scores_s.detach().mean(), scores_t.detach().mean()]) * self.dataset_size
            estimate = _process_mean(estimate)
            if not self.training:
                return estimate[0], estimate[1]
            self.normalizers.copy_(torch.where(self.normalizers < 0, estimate, self.normalizers))
        return self.normalizers[0], self.normalizers[1]

    @torch.no_grad()
    def _update(self, indices: Tensor, f_s: Tensor, f_t: Tensor) -> None:
        """mem[i] <- normalise(momentum mem[i] + (1 - momentum) f), for both banks, at the batch's indices."""
        rows = _all_processes(indices)
        for memory, f in ((self.memory_student, f_s), (self.memory_teacher, f_t)):
            mixed = memory[rows] * self.momentum + _all_processes(f.detach()) * (1 - self.momentum)
            memory[rows] = mixed / mixed.norm(dim=1, keepdim=True)

    def _check_indices(self, indices: Tensor | None, batch: int) -> Tensor:
        if indices is None:
            raise ValueError("crd needs each sample's dataset index: call the distiller as d(inputs, targets, "
                             "indices=...) (wrap the dataset in diffkd.data.WithIndices)")
        if not isinstance(indices, Tensor) or indices.shape != (batch,) or indices.is_floating_point():
            got = f"{tuple(indices.shape)} {indices.dtype}" if isinstance(indices, Tensor) else type(indices).__name__
            raise ValueError(f"crd: indices must be a ({batch},) integer tensor, got {got}")
        if int(indices.min()) < 0 or int(indices.max()) >= self.dataset_size:
            raise ValueError(f"crd: indices must lie in [0, {self.dataset_size}) (dataset_size), got "
                             f"{int(indices.min())}..{int(indices.max())}")
        return indices.long()

    def _check_labels(self, targets: Tensor | None, batch: int) -> Tensor:
        if not isinstance(targets, Tensor) or targets.shape != (batch,) or targets.is_floating_point():
            got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(
                f"crd draws negatives from other classes, so it needs the ({batch},) class labels as targets, got {got}; "
                "set negative_sampling='uniform' for tasks without a class per sample"
            )
        return targets.long()
