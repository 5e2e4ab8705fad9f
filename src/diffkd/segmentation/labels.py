"""Cityscapes label definitions: the 34 label ids of `*_gtFine_labelIds.png` and their 19 train ids.

Train ids are what the networks predict; every label id outside the 19 evaluated classes becomes
IGNORE (255), which the loss and the metric skip.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

IGNORE = 255


class Label(NamedTuple):
    """One row of the Cityscapes label table."""

    id: int
    name: str
    train_id: int


LABELS: tuple[Label, ...] = (
    Label(0, "unlabeled", IGNORE),
    Label(1, "ego vehicle", IGNORE),
    Label(2, "rectification border", IGNORE),
    Label(3, "out of roi", IGNORE),
    Label(4, "static", IGNORE),
    Label(5, "dynamic", IGNORE),
    Label(6, "ground", IGNORE),
    Label(7, "road", 0),
    Label(8, "sidewalk", 1),
    Label(9, "parking", IGNORE),
    Label(10, "rail track", IGNORE),
    Label(11, "building", 2),
    Label(12, "wall", 3),
    Label(13, "fence", 4),
    Label(14, "guard rail", IGNORE),
    Label(15, "bridge", IGNORE),
    Label(16, "tunnel", IGNORE),
    Label(17, "pole", 5),
    Label(18, "polegroup", IGNORE),
    Label(19, "traffic light", 6),
    Label(20, "traffic sign", 7),
    Label(21, "vegetation", 8),
    Label(22, "terrain", 9),
    Label(23, "sky", 10),
    Label(24, "person", 11),
    Label(25, "rider", 12),
    Label(26, "car", 13),
    Label(27, "truck", 14),
    Label(28, "bus", 15),
    Label(29, "caravan", IGNORE),
    Label(30, "trailer", IGNORE),
    Label(31, "train", 16),
    Label(32, "motorcycle", 17),
    Label(33, "bicycle", 18),
)

CLASSES: tuple[str, ...] = tuple(label.name for label in sorted(
    (lb for lb in LABELS if lb.train_id != IGNORE), key=lambda lb: lb.train_id
))
UNKNOWN = -1  # lookup-table value of a byte that is no valid id


def id_to_train_id() -> torch.Tensor:
    """A 256-entry table: label id -> train id (IGNORE for unevaluated classes, UNKNOWN for non-ids)."""
    table = torch.full((256,), UNKNOWN, dtype=torch.int64)
    for label in LABELS:
        table[label.id] = label.train_id
    return table


def train_id_identity(num_classes: int) -> torch.Tensor:
    """A 256-entry table for files that already hold train ids (0..num_classes-1 and IGNORE)."""
    table = torch.full((256,), UNKNOWN, dtype=torch.int64)
    table[:num_classes] = torch.arange(num_classes, dtype=torch.int64)
    table[IGNORE] = IGNORE
    return table


def apply_table(label: torch.Tensor, table: torch.Tensor, where: str, what: str) -> torch.Tensor:
    """Map a uint8 label map through a table; bytes the table does not know raise a ValueError."""
    mapped = torch.from_numpy(table.numpy()[label.numpy()])  # a numpy lookup: far faster than torch indexing
    if bool((mapped == UNKNOWN).any()):
        bad = sorted(torch.unique(label[mapped == UNKNOWN]).tolist())
        raise ValueError(f"{where}: unknown label values {bad[:10]}; {what}")
    return mapped
