"""Task plug-ins by name: each builds its data and models and owns its loss and metrics.

Adding a task means one module with a `Task` subclass and one line in TASKS. Plug-ins are imported
when a config names them, so a classification run never loads the detection stack (pycocotools).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Mapping
from types import MappingProxyType

from ..config import Config, ConfigError
from .base import Metrics, Reduce, Task
from .classification import ClassificationTask, TopK

TASKS: Mapping[str, str] = MappingProxyType(
    {
        "classification": "diffkd.tasks.classification:ClassificationTask",
        "detection": "diffkd.tasks.detection:DetectionTask",
        "segmentation": "diffkd.tasks.segmentation:SegmentationTask",
    }
)


def available() -> list[str]:
    """The task names a config may give."""
    return list(TASKS)


def task_class(name: str) -> type[Task]:
    """The Task subclass registered as name (imported on first use)."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, available(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"task: unknown task {name!r}.{hint} Available: {', '.join(available())}")
    module, attribute = TASKS[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def build_task(cfg: Config) -> Task:
    """The task plug-in named by cfg.task, set up from the config."""
    return task_class(cfg.task)(cfg)


__all__ = ["TASKS", "ClassificationTask", "Metrics", "Reduce", "Task", "TopK", "available", "build_task", "task_class"]
