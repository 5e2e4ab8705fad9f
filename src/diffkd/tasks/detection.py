"""Object detection: torchvision detectors on COCO-format data, scored with COCO box AP.

The plug-in's conventions: a batch is (list of images, list of target dicts); the model inputs are
the tuple (images, targets), spread as positional arguments, so a detector in training mode returns
its loss dict (summed by `loss`) and in eval mode its detections (scored by `CocoAP`). The config's
`detection` section sets the detectors' resize range, the backbone start and the mosaic spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..config import Config, ConfigError, ModelConfig, TeacherConfig
from ..data.cache import cache_dir
from ..detection.coco import Categories, CocoDetectionSet, CocoImages, collate, open_split
from ..detection.evaluator import METRICS, coco_box_ap, to_results
from ..detection.models import build_detector
from ..detection.mosaics import MosaicSpec, ensure_mosaics
from ..detection.pretrained import coco_detector
from .base import Metrics, Reduce, Task

COCO_RESIZE = (800, 1333)  # torchvision's (and the paper's) resize range for COCO images


def _coco_root(cfg: Config) -> Path:
    """data.name coco: any COCO-format folder, given as data.root."""
    if cfg.data.root is None:
        raise ConfigError("data.root: required for data.name=coco (a folder with annotations/instances_<split>.json)")
    return Path(cfg.data.root).expanduser()


def _mosaic_root(cfg: Config) -> Path:
    """data.name fashion_mosaics: generated on first use into data.root (default: a cache folder per spec)."""
    spec = MosaicSpec(**asdict(cfg.detection.mosaics))
    default = cache_dir("fashion-mosaics") / "-".join(f"{k}{v}" for k, v in asdict(spec).items())
    return ensure_mosaics(Path(cfg.data.root).expanduser() if cfg.data.root else default, spec)


DATA_SOURCES: dict[str, Callable[[Config], Path]] = {"coco": _coco_root, "fashion_mosaics": _mosaic_root}


def _gather(value: Any) -> list[Any]:
    """Every process's `value` (just [value] when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


class CocoAP(Metrics):
    """COCO box AP of the detections of evaluated images; training batches (loss dicts) are ignored."""

    def __init__(self, ground_truth: Any, category_ids: Sequence[int]) -> None:
        self.ground_truth = ground_truth
        self.category_ids = list(category_ids)
        self.results: list[dict] = []
        self.image_ids: list[int] = []

    def update(self, outputs: Any, targets: Sequence[Mapping[str, Tensor]]) -> None:
        """Add the detections of one batch; a loss dict (training mode) holds none."""
        if isinstance(outputs, Mapping):
            return
        for detection, target in zip(outputs, targets, strict=True):
            image_id = int(target["image_id"])
            self.image_ids.append(image_id)
            self.results.extend(to_results(image_id, detection, self.category_ids))

    def compute(self, reduce: Reduce) -> dict[str, float]:
        """AP, AP50, AP75, APs, APm, APl in % over every process's images (nan before any detection batch)."""
        parts = _gather((self.results, self.image_ids))
        results = [r for part, _ in parts for r in part]
        image_ids = [i for _, ids in parts for i in ids]
        return coco_box_ap(self.ground_truth, results, image_ids)


class DetectionTask(Task):
    """Detect objects in a COCO-format dataset with torchvision detectors; the best run has the best AP."""

    main_metric = "AP"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        if cfg.data.name not in DATA_SOURCES:
            raise ConfigError(f"data.name: the detection task reads {', '.join(DATA_SOURCES)}, got {cfg.data.name!r}")
        self.settings = cfg.detection
        self._sources: dict[str, CocoImages] = {}

    # ----------------------------------------------------------------------------- data
    @cached_property
    def root(self) -> Path:
        """The COCO-format folder (generated first for mosaics)."""
        return DATA_SOURCES[self.cfg.data.name](self.cfg)

    def source(self, split: str) -> CocoImages:
        """The parsed annotation file of a split, read once."""
        if split not in self._sources:
            self._sources[split] = open_split(self.root, split)
        return self._sources[split]

    @cached_property
    def categories(self) -> Categories:
        """The test split's categories: what the models predict and the metrics score."""
        return Categories.from_coco(self.source("test").coco.dataset["categories"])

    @cached_property
    def resize(self) -> tuple[int, int]:
        """(min_size, max_size) of the detectors' transform: given, else the canvas (mosaics) or 800/1333."""
        s = self.settings
        default = (s.mosaics.canvas,) * 2 if self.cfg.data.name == "fashion_mosaics" else COCO_RESIZE
        return (s.min_size or default[0], s.max_size or max(default[1], s.min_size or 0))

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (3, self.resize[0], self.resize[0])

    def build_dataset(self, split: str, *, limit: int | None = None) -> Dataset:
        source = self.source(split)
        categories = Categories.from_coco(source.coco.dataset["categories"])
        categories.check_same(self.categories, str(source.annotation_file), str(self.source("test").annotation_file))
        augment = (self.cfg.data.augment is not False) if split == "train" else False
        return CocoDetectionSet(source, train=split == "train", augment=augment, limit=limit)

    def collate_fn(self, batch: list[Any]) -> Any:
        return collate(batch)

    def to_device(self, batch: Any, device: torch.device) -> tuple[Any, Any]:
        """Images and target dicts to the device; the model inputs are (images, targets)."""
        images, targets = batch
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        return (images, targets), targets

    def batch_size(self, inputs: Any) -> int:
        return len(inputs[0])

    # ----------------------------------------------------------------------------- models, loss, metrics
    def build_model(self, spec: ModelConfig | TeacherConfig) -> nn.Module:
        classes = self.categories.num_classes
        if spec.num_classes is not None and spec.num_classes != classes:
            raise ConfigError(
                f"num_classes of {spec.name!r} is {spec.num_classes}, but the annotation files have "
                f"{classes - 1} categories (num_classes counts the background: {classes}); drop num_classes or fix it"
            )
        min_size, max_size = self.resize
        options = {"min_size": min_size, "max_size": max_size, **self.settings.options}
        if spec.pretrained:
            return coco_detector(spec.name, self.categories, **options)
        return build_detector(spec.name, classes, imagenet_backbone=self.settings.imagenet_backbone, **options)

    def loss(self, outputs: Any, targets: Any) -> Tensor:
        """The detector's own losses (classification, box regression, ... ) summed."""
        if not isinstance(outputs, Mapping):
            raise TypeError("a detector returns losses only in training mode; in eval mode it returns detections")
        return sum(v.float() for v in outputs.values())  # type: ignore[return-value]

    def metrics(self) -> Metrics:
        return CocoAP(self.source("test").coco, self.categories.ids)


__all__ = ["METRICS", "CocoAP", "DetectionTask"]
