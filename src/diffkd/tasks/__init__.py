"""Task plug-ins by name: each builds its data and models and owns its loss and metrics.

Adding a task (detection, segmentation) means one module with a `Task` subclass and one line here.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from types import MappingProxyType

from ..config import Config, ConfigError
from .base import Metrics, Reduce, Task
from .classification import ClassificationTask, TopK

TASKS: Mapping[str, type[Task]] = MappingProxyType({"classification": ClassificationTask})


def available() -> list[str]:
    """The task names a config may give."""
    return list(TASKS)


def build_task(cfg: Config) -> Task:
    """The task plug-in named by cfg.task, set up from the config."""
    if cfg.task not in TASKS:
        close = difflib.get_close_matches(cfg.task, available(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"task: unknown task {cfg.task!r}.{hint} Available: {', '.join(available())}")
    return TASKS[cfg.task](cfg)


__all__ = ["Metrics", "Reduce", "Task", "TopK", "ClassificationTask", "TASKS", "available", "build_task"]
