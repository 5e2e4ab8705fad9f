"""A batch's boxes in a neutral form: what methods that read boxes (FGD) take, whatever framework made them.

Each front end converts its own structure at its edge: a torchvision detector's transform output here
(`from_torchvision`, FGD's default source), an Ultralytics batch in the YOLO integration.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass(frozen=True)
class Boxes:
    """Each image's boxes (x1, y1, x2, y2), in pixels of a frame of size `frame` = (height, width): the frame the
    feature maps cover (a padded batch's, for a detector that pads)."""

    per_image: list[Tensor]
    frame: tuple[int, int]


def from_torchvision(output: Any) -> Boxes:
    """Boxes from a torchvision detector's transform output, (ImageList, targets) with the boxes resized into the
    padded batch; Boxes pass as they are. Anything else is refused in one line."""
    from torchvision.models.detection.image_list import ImageList

    if isinstance(output, Boxes):
        return output
    if isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[0], ImageList):
        images, resized = output
        if resized is None:
            raise ValueError("fgd: the detector's transform ran without targets; call the distiller with the boxes, "
                             "d((images, targets), targets)")
        return Boxes([t["boxes"] for t in resized], tuple(images.tensors.shape[-2:]))
    raise ValueError(
        "fgd needs its input `boxes`: diffkd.boxes.Boxes, or the (ImageList, targets) a torchvision detector's "
        f"transform returns, with the boxes resized into the padded batch, got {type(output).__name__}; the "
        "Distiller reads it from the student's `transform` (name another module with Level(inputs={'boxes': ...}))"
    )
