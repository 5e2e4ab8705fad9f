"""Torchvision detectors by name: Faster R-CNN, RetinaNet and FCOS on ResNet / ResNeXt FPN backbones.

A name is `<family>_<backbone>_fpn`, e.g. `retinanet_resnet18_fpn` or `fcos_resnext101_32x8d_fpn`.
Every detector keeps torchvision's own architecture (FPN with 256 channels, its heads and anchors);
only the resize range of its transform (`min_size`, `max_size`) comes from the caller, so small
canvases are not upscaled to 800 px. Each family also records where its distillation taps are: the
FPN levels (keys of the backbone's dict output) and, for the one-stage detectors, the box-regression
output that the regression KD loss compares.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext101_32x8d", "resnext101_64x4d")

FASTER_RCNN_NO_REGRESSION = (
    "Faster R-CNN regresses boxes for each model's own RPN proposals, so student and teacher "
    "regression outputs are not about the same boxes and cannot be compared one to one"
)


@dataclass(frozen=True)
class Family:
    """One detector family: how its backbone and head are built and where its taps are."""

    build: Callable[..., nn.Module]  # build(backbone, num_classes=..., min_size=..., max_size=...)
    returned_layers: tuple[int, ...]  # ResNet stages fed to the FPN
    extra_blocks: Callable[[], Any]  # the FPN's extra levels (max-pool or P6/P7 convs)
    levels: tuple[str, ...]  # the keys of the FPN's dict output, finest first
    regression: dict[str, Any] | None  # tap spec of the (B, N, 4) box-regression output, if comparable
    regression_note: str = ""  # why there is no regression tap
    coco_builder: str | None = None  # torchvision builder with COCO weights for the ResNet-50 variant


def _families() -> dict[str, Family]:
    """The three families, built lazily so importing diffkd does not import torchvision's detectors."""
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    one_stage_levels = ("0", "1", "2", "p6", "p7")
    return {
        "fasterrcnn": Family(
            FasterRCNN, (1, 2, 3, 4), LastLevelMaxPool, ("0", "1", "2", "3", "pool"), None,
            FASTER_RCNN_NO_REGRESSION, "fasterrcnn_resnet50_fpn",
        ),
        "retinanet": Family(
            RetinaNet, (2, 3, 4), lambda: LastLevelP6P7(256, 256), one_stage_levels,
            {"path": "head.regression_head", "layout": "raw"}, coco_builder="retinanet_resnet50_fpn",
        ),
        "fcos": Family(
            FCOS, (2, 3, 4), lambda: LastLevelP6P7(256, 256), one_stage_levels,
            {"path": "head.regression_head", "select": 0, "layout": "raw"},  # (boxes, centerness)
            coco_builder="fcos_resnet50_fpn",
        ),
    }


@dataclass(frozen=True)
class DetectorName:
    """A parsed detector name: its family, backbone and the family's build recipe."""

    name: str
    family_name: str
    backbone: str
    family: Family

    @property
    def levels(self) -> tuple[str, ...]:
        """FPN level keys, finest first."""
        return self.family.levels

    def level_taps(self) -> list[str]:
        """Tap strings of the FPN levels, e.g. "backbone['0']" (dict outputs selected by key)."""
        return [f"backbone[{key!r}]" for key in self.family.levels]


def available() -> list[str]:
    """Every detector name this registry builds."""
    return [f"{family}_{backbone}_fpn" for family in ("fasterrcnn", "retinanet", "fcos") for backbone in BACKBONES]


def parse_name(name: str) -> DetectorName:
    """Split `<family>_<backbone>_fpn` and check both parts, suggesting the closest valid name."""
    families = _families()
    for family_name, family in families.items():
        backbone = name.removeprefix(f"{family_name}_").removesuffix("_fpn")
        if name == f"{family_name}_{backbone}_fpn" and backbone in BACKBONES:
            return DetectorName(name, family_name, backbone, family)
    close = difflib.get_close_matches(name, available(), n=3)
    hint = f" (closest: {', '.join(close)})" if close else ""
    raise ValueError(
        f"unknown detector {name!r}{hint}; names are <family>_<backbone>_fpn with family in "
        f"{', '.join(families)} and backbone in {', '.join(BACKBONES)}"
    )


def build_detector(
    name: str,
    num_classes: int,
    *,
    min_size: int = 800,
    max_size: int = 1333,
    imagenet_backbone: bool = False,
    **options: Any,
) -> nn.Module:
    """A freshly built detector; num_classes counts the background (labels run 1..num_classes-1).

    imagenet_backbone loads torchvision's ImageNet weights into the ResNet (network access needed),
    with frozen BatchNorm and the stem and first stage frozen, as detection students usually start;
    otherwise every layer is trainable with ordinary BatchNorm. `options` go to the torchvision class.
    """
    import torchvision
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FrozenBatchNorm2d

    parsed = parse_name(name)
    if num_classes < 2:
        raise ValueError(f"{name}: num_classes counts the background, so it must be at least 2, got {num_classes}")
    weights = torchvision.models.get_model_weights(parsed.backbone).DEFAULT if imagenet_backbone else None
    backbone = resnet_fpn_backbone(
        backbone_name=parsed.backbone,
        weights=weights,
        norm_layer=FrozenBatchNorm2d if imagenet_backbone else nn.BatchNorm2d,
        trainable_layers=3 if imagenet_backbone else 5,
        returned_layers=list(parsed.family.returned_layers),
        extra_blocks=parsed.family.extra_blocks(),
    )
    return parsed.family.build(backbone, num_classes=num_classes, min_size=min_size, max_size=max_size, **options)
