"""Segmentation networks by name: a head (DeepLabV3, PSPNet) on a dilated backbone, with an FCN aux head.

Every model returns {"out": logits at input size, "aux": auxiliary logits at input size}. Module paths
are the same for all of them, so are the default taps: `classifier` outputs the logits map before
upsampling (B, classes, H/8, W/8), the map DiffKD denoises; `aux_classifier` the auxiliary logits.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from ..models import Taps
from .backbones import DilatedMobileNetV2, DilatedResNet, load_imagenet_weights
from .heads import aux_head, deeplabv3_head, pspnet_head

TAPS = Taps(feature="backbone['out']", logits="classifier")
AUX_TAP = "aux_classifier"


class SegmentationModel(nn.Module):
    """backbone -> head logits (stride 8) and aux logits, both upsampled bilinearly to the input size."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module, aux_classifier: nn.Module | None):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        out = {"out": F.interpolate(self.classifier(features["out"]), size=size, mode="bilinear", align_corners=False)}
        if self.aux_classifier is not None:
            aux = self.aux_classifier(features["aux"])
            out["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return out


Backbone = Callable[[int, float, int], nn.Module]  # (in_channels, width_mult, output_stride) -> backbone
Head = Callable[[int, int, float], nn.Module]  # (in_channels, num_classes, width_mult) -> head

BACKBONES: dict[str, tuple[Backbone, str]] = {  # name -> (builder, torchvision weights of the same layout)
    **{f"resnet{d}": ((lambda c, w, s, d=d: DilatedResNet(d, c, w, s)), f"resnet{d}") for d in (18, 34, 50, 101)},
    "mobilenetv2": (lambda c, w, s: DilatedMobileNetV2(c, w, s), "mobilenet_v2"),
}
HEADS: dict[str, Head] = {
    "deeplabv3": lambda cin, k, w: deeplabv3_head(cin, k, channels=max(8, round(256 * w))),
    "pspnet": lambda cin, k, w: pspnet_head(cin, k, channels=max(8, round(512 * w))),
}


@dataclass(frozen=True)
class Spec:
    """A registered network: which head on which backbone."""

    head: str
    backbone: str


MODELS: dict[str, Spec] = {f"{h}_{b}": Spec(h, b) for h in HEADS for b in BACKBONES}


def available() -> list[str]:
    """Every registered segmentation model name."""
    return sorted(MODELS)


def _spec(name: str) -> Spec:
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=3)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise ValueError(f"unknown segmentation model {name!r}{hint}; available: {', '.join(available())}")
    return MODELS[name]


def create(
    name: str,
    num_classes: int = 19,
    *,
    in_channels: int = 3,
    width_mult: float = 1.0,
    output_stride: int = 8,
    aux: bool = True,
    pretrained_backbone: bool = False,
) -> SegmentationModel:
    """Build a segmentation network; width_mult < 1 shrinks every stage and head (CPU-sized runs).

    pretrained_backbone loads torchvision's ImageNet weights into the backbone (needs width_mult=1,
    in_channels=3, and the file in torch's cache or a download).
    """
    spec = _spec(name)
    build_backbone, weights = BACKBONES[spec.backbone]
    backbone = build_backbone(in_channels, width_mult, output_stride)
    if pretrained_backbone:
        load_imagenet_weights(backbone, weights)
    classifier = HEADS[spec.head](backbone.out_channels, num_classes, width_mult)
    aux_classifier = aux_head(backbone.aux_channels, num_classes) if aux else None
    return SegmentationModel(backbone, classifier, aux_classifier)


def default_taps(name: str) -> Taps:
    """Default taps of a segmentation model: the backbone's last map and the logits map before upsampling."""
    _spec(name)
    return TAPS
