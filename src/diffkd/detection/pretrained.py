"""torchvision's COCO-trained detectors as teachers, narrowed to the categories of a dataset.

torchvision's COCO weights predict 91 classes indexed by COCO category id (0 is the background,
some ids are unused). Our labels are contiguous (1..K in the order of the annotation file's
category ids), so the classifier rows of the file's categories are kept, in that order; the names
must match, otherwise the annotation file and the model disagree and we refuse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .coco import Categories
from .models import parse_name


def _take_rows(layer: nn.Module, rows: list[int]) -> None:
    """Keep only the given output rows of a Linear or Conv2d, in place."""
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight[rows].clone())
        layer.bias = nn.Parameter(layer.bias[rows].clone())
    attr = "out_features" if isinstance(layer, nn.Linear) else "out_channels"
    setattr(layer, attr, len(rows))


def _narrow_fasterrcnn(model: nn.Module, keep: list[int]) -> None:
    """Class scores and the per-class box deltas (4 rows per class) of the box predictor."""
    predictor = model.roi_heads.box_predictor
    _take_rows(predictor.cls_score, keep)
    _take_rows(predictor.bbox_pred, [4 * k + i for k in keep for i in range(4)])


def _narrow_dense_head(model: nn.Module, keep: list[int]) -> None:
    """RetinaNet / FCOS: cls_logits channels are laid out anchor-major, (A, num_classes)."""
    head = model.head.classification_head
    classes = head.num_classes
    anchors = head.cls_logits.out_channels // classes
    _take_rows(head.cls_logits, [a * classes + k for a in range(anchors) for k in keep])
    head.num_classes = len(keep)


NARROWERS: dict[str, Callable[[nn.Module, list[int]], None]] = {
    "fasterrcnn": _narrow_fasterrcnn,
    "retinanet": _narrow_dense_head,
    "fcos": _narrow_dense_head,
}


def narrow_classes(model: nn.Module, family: str, keep: Sequence[int]) -> None:
    """Keep the classifier outputs of class indices `keep` (0, the background, first) in that order."""
    NARROWERS[family](model, list(keep))


def check_category_names(categories: Categories, model_names: Sequence[str], model: str) -> None:
    """Refuse a dataset whose category ids do not name the same classes as the model's."""
    wrong = [
        f"id {cid} is {name!r} in the file but {model_names[cid] if cid < len(model_names) else 'absent'!r} in the model"
        for cid, name in zip(categories.ids, categories.names)
        if cid >= len(model_names) or model_names[cid] != name
    ]
    if wrong:
        shown = "; ".join(wrong[:5]) + (f"; ... ({len(wrong)} in all)" if len(wrong) > 5 else "")
        raise ValueError(
            f"category ids do not match between the annotation file and {model}'s pretrained weights: {shown}. "
            "Use a checkpoint trained on this dataset (teacher.checkpoint) instead of pretrained weights"
        )


def coco_detector(name: str, categories: Categories, **options) -> nn.Module:
    """torchvision's COCO-trained `name` (ResNet-50 variants only), narrowed to `categories`; needs network access once."""
    import torchvision

    parsed = parse_name(name)
    builder = parsed.family.coco_builder
    if builder is None or parsed.backbone != "resnet50":
        raise ValueError(
            f"torchvision has no COCO detection weights for {name!r} (only {parsed.family_name}_resnet50_fpn); "
            "train it first and give its run directory or weights file as teacher.checkpoint"
        )
    weights = torchvision.models.get_model_weights(builder).DEFAULT
    check_category_names(categories, weights.meta["categories"], builder)
    model = torchvision.models.get_model(builder, weights=weights, **options)
    narrow_classes(model, parsed.family_name, [0, *categories.ids])
    return model
