"""What the engine asks of a task: data, models, the task loss and metrics; nothing about labels or outputs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from .. import models
from ..config import Config, ModelConfig, TeacherConfig

Reduce = Callable[[Tensor], Tensor]  # sums a tensor over all processes (identity when not distributed)


class Metrics(ABC):
    """Accumulates a task's metrics batch by batch; `compute` combines them over all processes."""

    @abstractmethod
    def update(self, outputs: Any, targets: Any) -> None:
        """Add one batch (model outputs and targets, on any device)."""

    @abstractmethod
    def compute(self, reduce: Reduce) -> dict[str, float]:
        """The metrics of everything added so far; `reduce` sums tensors over processes."""


class Task(ABC):
    """A task plug-in (classification, later detection, segmentation) built from the run config."""

    main_metric: str  # the metric that picks best.pt, higher is better (classification: "top1")

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """The model's input shape without the batch dimension (used to probe feature shapes)."""

    @abstractmethod
    def build_dataset(self, split: str, *, limit: int | None = None) -> Dataset:
        """One split ("train" or "test"); limit keeps that many items (None: all)."""

    @abstractmethod
    def build_model(self, spec: ModelConfig | TeacherConfig) -> nn.Module:
        """A freshly built model for a config's model, student or teacher section (no checkpoint loaded)."""

    @abstractmethod
    def loss(self, outputs: Any, targets: Any) -> Tensor:
        """The task loss of a batch (a scalar)."""

    @abstractmethod
    def metrics(self) -> Metrics:
        """An empty metrics accumulator."""

    def default_taps(self, name: str, model: nn.Module) -> models.Taps | models.Probe:
        """Where a model's "@feature" / "@logits" taps are: the registry's for a registered name, else found
        by probing the built model at the task's input shape (timm:, hf:, import paths)."""
        if models.is_registered(name):
            return models.default_taps(name)
        return models.probe_model(model, input_shape=self.input_shape)

    @property
    def class_names(self) -> list[str] | None:
        """The names of the classes, where the data gives them (an image folder); None otherwise."""
        return None

    def record_run(self, run_dir: Path) -> None:
        """Keep in a new run's directory what later uses of the run check the data against (nothing by default)."""

    def check_run(self, run_dir: Path, *, role: str = "run") -> None:
        """Refuse data that does not fit the run in run_dir (resume, eval, visualize); nothing to check by default.

        role "teacher": run_dir holds the teacher's checkpoint, which need not be a diffkd run (then nothing to check)."""

    def collate_fn(self, batch: list[Any]) -> Any:
        """Merge a list of dataset items into a batch (torch's default: stack tensors)."""
        return default_collate(batch)

    def to_device(self, batch: Any, device: torch.device) -> tuple[Any, Any]:
        """Split a loader batch into (inputs, targets) on the device; a tuple of inputs is spread as arguments."""
        inputs, targets = batch
        return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)

    def augment_batch(self, inputs: Any, targets: Any) -> tuple[Any, Any]:
        """Batch-level training augmentation on the device (mixup, cutmix); unchanged by default."""
        return inputs, targets

    def batch_size(self, inputs: Any) -> int:
        """How many samples a batch of inputs holds (for images/s and averaging)."""
        return len(inputs)
