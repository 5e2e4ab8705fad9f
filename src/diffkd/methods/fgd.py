"""FGD: focal and global distillation of one FPN level of a detector.

Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022. Focal: the feature
difference weighted by the teacher's spatial and channel attention, split into foreground (inside the
ground-truth boxes, each box normalised by its area) and background, plus an L1 loss between the
student's and the teacher's attention. Global: a GcBlock per side models the relation between
pixels, and the two outputs are matched. Terms and defaults follow the authors' release (docs/design.md §5).

FGD reads the batch's boxes as `diffkd.boxes.Boxes`: per-image boxes in pixels of the frame the feature maps
cover, scaled to the level by feature size / frame size (the authors' code divides by each image's unpadded
size instead). A torchvision detector resizes and pads its images inside its `transform`, so the extra input
`boxes` is read by default from the student's `transform` and converted at that edge
(`diffkd.boxes.from_torchvision`); the YOLO integration gives Boxes of its batch.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..boxes import Boxes, from_torchvision
from .base import ExtraInput, Method, MethodOutput

# (fg alpha, bg beta, attention gamma, global lambda, temperature T) of the authors' R101 -> R50 configs
FAMILY_WEIGHTS: dict[str, tuple[float, float, float, float, float]] = {
    "retinanet": (1e-3, 5e-4, 5e-4, 5e-6, 0.5),
    "fasterrcnn": (5e-5, 2.5e-5, 5e-5, 5e-7, 0.5),
    "fcos": (1.6e-3, 8e-4, 8e-4, 8e-6, 0.8),
}
WEIGHT_NAMES = ("fg_weight", "bg_weight", "attention_weight", "global_weight", "temperature")


def attention(feature: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Spatial (B,H,W) = HW softmax_hw(mean_c |F| / T) and channel (B,C) = C softmax_c(mean_hw |F| / T)."""
    b, c, h, w = feature.shape
    magnitude = feature.abs()
    spatial = h * w * F.softmax(magnitude.mean(1).reshape(b, -1) / temperature, dim=1).reshape(b, h, w)
    channel = c * F.softmax(magnitude.mean((2, 3)) / temperature, dim=1)
    return spatial, channel


def box_masks(boxes: list[Tensor], feature_hw: tuple[int, int], input_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Foreground and background masks (B,H,W) of boxes (x1, y1, x2, y2) given in pixels of an input_hw frame.

    Boxes are scaled to the level; x1, y1 are floored and x2, y2 ceiled; a box covers the rows y1..y2 and
    columns x1..x2 inclusive with weight 1 / ((y2 - y1 + 1)(x2 - x1 + 1)), the largest weight where boxes
    overlap. The background is 1 where no box is, divided by its sum (left at 0 if boxes cover everything).
    """
    (h, w), (in_h, in_w) = feature_hw, input_hw
    fg = torch.zeros(len(boxes), h, w, device=boxes[0].device if boxes else None)
    rows = torch.arange(h, device=fg.device).view(1, h, 1)
    cols = torch.arange(w, device=fg.device).view(1, 1, w)
    for i, image_boxes in enumerate(boxes):
        if image_boxes.numel() == 0:
            continue
        scaled = image_boxes.detach().float() * torch.tensor([w / in_w, h / in_h, w / in_w, h / in_h], device=fg.device)
        x1, y1 = scaled[:, 0].floor().view(-1, 1, 1), scaled[:, 1].floor().view(-1, 1, 1)
        x2, y2 = scaled[:, 2].ceil().view(-1, 1, 1), scaled[:, 3].ceil().view(-1, 1, 1)
        weight = 1.0 / ((y2 - y1 + 1) * (x2 - x1 + 1))
        inside = (rows >= y1) & (rows <= y2) & (cols >= x1) & (cols <= x2)
        fg[i] = torch.where(inside, weight, torch.zeros_like(weight)).amax(0)
    bg = (fg == 0).float()
    total = bg.sum((1, 2), keepdim=True)
    return fg, torch.where(total > 0, bg / total.clamp(min=1), bg)


class GlobalContext(nn.Module):
    """GcBlock: softmax_hw attention pooling (1x1 conv C->1), then 1x1 C->C/2, LayerNorm, ReLU, 1x1 C/2->C, added to F."""

    def __init__(self, channels: int):
        super().__init__()
        self.mask = nn.Conv2d(channels, 1, 1)
        self.transform = nn.Sequential(
            nn.Conv2d(channels, channels // 2, 1), nn.LayerNorm([channels // 2, 1, 1]), nn.ReLU(),
            nn.Conv2d(channels // 2, channels, 1),
        )
        nn.init.kaiming_normal_(self.mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.mask.bias)
        nn.init.zeros_(self.transform[-1].weight)  # the block starts as the identity
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        weights = F.softmax(self.mask(x).reshape(b, 1, h * w), dim=2)  # (B, 1, HW)
        context = torch.bmm(x.reshape(b, c, h * w), weights.transpose(1, 2)).reshape(b, c, 1, 1)
        return x + self.transform(context)


class FGD(Method):
    """fg_weight L_fg + bg_weight L_bg + attention_weight L_at + global_weight L_global on one FPN level.

    `family` (retinanet, fasterrcnn, fcos) picks the authors' weights and temperature; any of them can be
    given on its own, and without a family all five must be.
    """

    layouts = frozenset({"map"})
    extra_inputs = MappingProxyType({"boxes": ExtraInput("transform", from_torchvision)})  # torchvision's resize-and-pad

    def __init__(self, student_channels: int, teacher_channels: int, fg_weight: float, bg_weight: float,
                 attention_weight: float, global_weight: float, temperature: float):
        super().__init__()
        self.term_weights = {"fg": fg_weight, "bg": bg_weight, "attention": attention_weight, "global": global_weight}
        self.temperature = temperature
        self.align = nn.Conv2d(student_channels, teacher_channels, 1) if student_channels != teacher_channels else None
        self.student_context = GlobalContext(teacher_channels)
        self.teacher_context = GlobalContext(teacher_channels)

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, *, family: str | None = None,
              fg_weight: float | None = None, bg_weight: float | None = None, attention_weight: float | None = None,
              global_weight: float | None = None, temperature: float | None = None) -> "FGD":
        if len(student_shape) != 4 or len(teacher_shape) != 4 or student_shape[-2:] != teacher_shape[-2:]:
            raise ValueError(
                f"fgd distils two feature maps (B,C,H,W) of the same size, got student {tuple(student_shape)} and "
                f"teacher {tuple(teacher_shape)} (tap the same FPN level of both detectors)"
            )
        given = dict(zip(WEIGHT_NAMES, (fg_weight, bg_weight, attention_weight, global_weight, temperature)))
        weights = {name: value for name, value in given.items() if value is not None}
        if family is not None:
            if family not in FAMILY_WEIGHTS:
                raise ValueError(f"fgd: family must be one of {', '.join(FAMILY_WEIGHTS)}, got {family!r}")
            weights = {**dict(zip(WEIGHT_NAMES, FAMILY_WEIGHTS[family])), **weights}
        missing = [name for name in WEIGHT_NAMES if name not in weights]
        if missing:
            raise ValueError(f"fgd: give family ({', '.join(FAMILY_WEIGHTS)}) for the authors' weights, or all of {', '.join(missing)}")
        if teacher_shape[1] < 2:
            raise ValueError(f"fgd: the GcBlock halves the channels, so the teacher map needs at least 2, got {teacher_shape[1]}")
        return cls(student_shape[1], teacher_shape[1], **weights)

    def forward(self, student: Tensor, teacher: Tensor, targets: Any = None, *, boxes: Boxes | None = None) -> MethodOutput:
        if student.shape[-2:] != teacher.shape[-2:]:
            raise ValueError(
                f"fgd: student and teacher maps differ in size, {tuple(student.shape)} vs {tuple(teacher.shape)}; "
                "both detectors need the same input resize"
            )
        if not isinstance(boxes, Boxes):
            raise ValueError(f"fgd needs its input `boxes` as diffkd.boxes.Boxes, got {type(boxes).__name__}")
        per_image, frame = boxes.per_image, boxes.frame
        if len(per_image) != student.shape[0]:
            raise ValueError(f"fgd: {len(per_image)} images have boxes but the feature batch holds {student.shape[0]}")
        aligned = self.align(student) if self.align is not None else student
        s, t = aligned.float(), teacher.float()
        batch = s.shape[0]
        spatial_t, channel_t = attention(t, self.temperature)
        spatial_s, channel_s = attention(s, self.temperature)
        fg, bg = box_masks([b.to(s.device) for b in per_image], tuple(s.shape[-2:]), frame)
        weighted = spatial_t.unsqueeze(1) * channel_t[:, :, None, None] * (s - t) ** 2  # (B, C, H, W)
        focal_fg = (fg.unsqueeze(1) * weighted).sum() / batch
        focal_bg = (bg.unsqueeze(1) * weighted).sum() / batch
        attention_loss = ((channel_s - channel_t).abs().sum() + (spatial_s - spatial_t).abs().sum()) / batch
        relation = ((self.student_context(aligned).float() - self.teacher_context(teacher).float()) ** 2).sum() / batch
        terms = {"fg": focal_fg, "bg": focal_bg, "attention": attention_loss, "global": relation}
        return MethodOutput(terms, {"fg_pixels": (fg > 0).float().mean().detach()})


