"""COCO box AP with pycocotools: AP, AP50, AP75, APs, APm, APl (in %), and a table like the paper's.

Detections come as torchvision returns them in eval mode (boxes xyxy in original image pixels,
scores, labels 1..K); labels are mapped back to the file's category ids. Only the images that were
evaluated count, so a `limit`ed test split is scored on its own images. `CocoAP` is the task's
metrics accumulator: it gathers every process's detections with a sum over processes only.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]  # sums a tensor over all processes (identity for one process's share)

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six numbers COCOeval.summarize prints


def _results_coco(ground_truth: COCO, results: list[dict]) -> COCO:
    """The detections as a COCO object on the ground truth's images (also when there are none)."""
    dt = COCO()
    dt.dataset = {
        "images": copy.copy(ground_truth.dataset["images"]),
        "categories": copy.deepcopy(ground_truth.dataset["categories"]),
        "annotations": [
            {**r, "id": i + 1, "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0} for i, r in enumerate(results)
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


def coco_box_ap(ground_truth: COCO, results: list[dict], image_ids: Iterable[int]) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl in % over `image_ids`; an area range without ground truth gives nan."""
    ids = sorted(set(image_ids))
    if not ids:
        return {name: math.nan for name in METRICS}
    evaluation = COCOeval(ground_truth, _results_coco(ground_truth, results), iouType="bbox")
    evaluation.params.imgIds = ids
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and the summary
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = np.asarray(evaluation.stats[: len(METRICS)], dtype=float)
    return {name: 100.0 * v if v >= 0 else math.nan for name, v in zip(METRICS, stats.tolist())}


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the process count (0, 1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(rows: Tensor, reduce: Reduce) -> Tensor:
    """Every process's (n_i, k) rows, in rank order, using only `reduce` (a sum over processes).

    Each process writes its rows into its own slot of a zero buffer and the sum fills every slot;
    with an identity `reduce` (one process's share) only this process's rows come back.
    """
    rank, world = _rank_and_world()
    counts = torch.zeros(world, dtype=torch.float64, device=rows.device)
    counts[rank] = len(rows)
    counts = reduce(counts).long().tolist()
    buffer = rows.new_zeros(sum(counts), rows.shape[1])
    start = sum(counts[:rank])
    buffer[start : start + len(rows)] = rows
    return reduce(buffer)


class CocoAP:
    """COCO box AP of the detections of evaluated images; training batches (loss dicts) hold none."""

    def __init__(self, ground_truth: Any, category_ids: Sequence[int]) -> None:
        self.ground_truth = ground_truth
        self.category_ids = list(category_ids)
        self.rows: list[Tensor] = []  # per image: (n, 7) image id, label, x1, y1, x2, y2, score
        self.image_ids: list[int] = []
        self.device: torch.device | None = None
        self.saw_losses = False

    def update(self, outputs: Any, targets: Sequence[Mapping[str, Tensor]]) -> None:
        """Add the detections of one batch; a loss dict (training mode) holds none."""
        if isinstance(outputs, Mapping):
            self.saw_losses = True
            return
        for detection, target in zip(outputs, targets, strict=True):
            image_id = target["image_id"].reshape(1, 1).double()
            self.device = image_id.device
            self.image_ids.append(int(image_id))
            boxes = detection["boxes"].detach().double()
            self.rows.append(torch.cat([
                image_id.expand(len(boxes), 1), detection["labels"].double()[:, None], boxes,
                detection["scores"].detach().double()[:, None],
            ], dim=1))  # fmt: skip

    def _device(self) -> torch.device:
        """Where the gathered tensors live: the detections' device, else NCCL's, else the CPU."""
        if self.device is not None:
            return self.device
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def compute(self, reduce: Reduce) -> dict[str, float]:
        """AP, AP50, AP75, APs, APm, APl in % over every process's images (nan on training batches)."""
        if self.saw_losses and not self.image_ids:
            return {name: math.nan for name in METRICS}
        device = self._device()
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0, 7, dtype=torch.float64, device=device)
        rows = gather_rows(rows.to(device), reduce).cpu()
        ids = gather_rows(torch.tensor(self.image_ids, dtype=torch.float64, device=device).view(-1, 1), reduce)
        results = [
            {"image_id": int(r[0]), "category_id": self.category_ids[int(r[1]) - 1],
             "bbox": [r[2], r[3], r[4] - r[2], r[5] - r[3]], "score": r[6]}
            for r in rows.tolist()
        ]  # fmt: skip
        return coco_box_ap(self.ground_truth, results, [int(i) for i in ids.view(-1).tolist()])


def format_table(rows: Mapping[str, Mapping[str, float]], title: str = "") -> str:
    """A markdown table with one row per model and the six COCO metrics, '-' where undefined."""
    cell = lambda v: "-" if v is None or math.isnan(v) else f"{v:.1f}"  # noqa: E731
    lines = [title] if title else []
    lines += ["| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    lines += [f"| {name} | " + " | ".join(cell(m.get(k)) for k in METRICS) + " |" for name, m in rows.items()]
    return "\n".join(lines)
