"""Object detection: torchvision detectors on COCO-format data, scored with COCO box AP.

The plug-in's conventions: a batch is (list of images, list of target dicts); the model inputs are
the tuple (images, targets), spread as positional arguments, so a detector in training mode returns
its loss dict (summed by `loss`) and in eval mode its detections (scored by `CocoAP`). The config's
`detection` section sets the detectors' resize range, the backbone start and the mosaic spec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..config import Config, ConfigError, ModelConfig, TeacherConfig
from ..data.cache import cache_dir
from ..detection.coco import Categories, CocoDetectionSet, CocoImages, collate, open_split
from ..detection.evaluator import CocoAP
from ..detection.models import build_detector
from ..detection.mosaics import MosaicSpec, ensure_mosaics
from ..detection.pretrained import coco_detector
from .base import Metrics, Task

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


class DetectionMetrics(CocoAP, Metrics):
    """COCO box AP as the engine's metrics accumulator."""


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
        options = {"min_size": min_size, "max_size": max_size, **self.settings.options, **spec.options}
        if spec.pretrained:
            return coco_detector(spec.name, self.categories, **options)
        return build_detector(spec.name, classes, imagenet_backbone=self.settings.imagenet_backbone, **options)

    def loss(self, outputs: Any, targets: Any) -> Tensor:
        """The detector's own losses (classification, box regression, ... ) summed."""
        if not isinstance(outputs, Mapping):
            raise TypeError("a detector returns losses only in training mode; in eval mode it returns detections")
        return sum(v.float() for v in outputs.values())  # type: ignore[return-value]

    def metrics(self) -> Metrics:
        return DetectionMetrics(self.source("test").coco, self.categories.ids)


__all__ = ["DetectionTask"]
