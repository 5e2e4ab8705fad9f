"""COCO box AP with pycocotools: AP, AP50, AP75, APs, APm, APl (in %), and a table like the paper's.

Detections come as torchvision returns them in eval mode (boxes xyxy in original image pixels,
scores, labels 1..K); labels are mapped back to the file's category ids. Only the images that were
evaluated count, so a `limit`ed test split is scored on its own images.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six numbers COCOeval.summarize prints


def to_results(image_id: int, detection: Mapping[str, Tensor], category_ids: Sequence[int]) -> list[dict]:
    """One image's detections as COCO result records (xywh boxes, category ids, scores)."""
    boxes = detection["boxes"].detach().float().cpu()
    boxes[:, 2:] -= boxes[:, :2]
    labels = detection["labels"].detach().cpu().tolist()
    scores = detection["scores"].detach().float().cpu().tolist()
    return [
        {"image_id": image_id, "category_id": category_ids[label - 1], "bbox": box, "score": score}
        for box, label, score in zip(boxes.tolist(), labels, scores)
    ]


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


class CocoEvaluator:
    """Collects detections image by image, then scores them against a pycocotools ground truth."""

    def __init__(self, ground_truth: COCO, category_ids: Sequence[int]):
        self.ground_truth = ground_truth
        self.category_ids = list(category_ids)
        self.results: list[dict] = []
        self.image_ids: list[int] = []

    def add(self, detections: Sequence[Mapping[str, Tensor]], image_ids: Sequence[int]) -> None:
        """Add a batch: one detection dict per image and the images' ids."""
        for image_id, detection in zip(image_ids, detections, strict=True):
            self.image_ids.append(int(image_id))
            self.results.extend(to_results(int(image_id), detection, self.category_ids))

    def compute(self) -> dict[str, float]:
        """The six COCO box metrics in % of everything added so far."""
        return coco_box_ap(self.ground_truth, self.results, self.image_ids)


def format_table(rows: Mapping[str, Mapping[str, float]], title: str = "") -> str:
    """A markdown table with one row per model and the six COCO metrics, '-' where undefined."""
    cell = lambda v: "-" if v is None or math.isnan(v) else f"{v:.1f}"  # noqa: E731
    lines = [title] if title else []
    lines += ["| model | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    lines += [f"| {name} | " + " | ".join(cell(m.get(k)) for k in METRICS) + " |" for name, m in rows.items()]
    return "\n".join(lines)
