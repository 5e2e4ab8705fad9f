"""Learning-rate schedules as pure functions of the iteration, so resuming needs only the step count.

Times are in epochs and may be fractional; they become iterations by rounding epochs * steps_per_epoch.
multistep: x gamma at each milestone. step: x gamma every step_size epochs. exponential: x gamma every
every_epochs epochs (e.g. x0.97 every 2.4 epochs), checked each iteration. cosine and poly
((1 - progress) ** power): from lr to min_lr between the end of warm-up and the end of training.
constant. Warm-up multiplies any of them by (step + 1) / warmup_steps during the first warmup_epochs.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

from ..config import ConfigError, ScheduleConfig


@dataclass(frozen=True)
class Timeline:
    """The run's length in iterations, for converting epoch times."""

    steps_per_epoch: int
    epochs: int

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def steps(self, epochs: float) -> int:
        """Iterations in a (fractional) number of epochs, rounded."""
        return round(epochs * self.steps_per_epoch)


Shape = Callable[[ScheduleConfig, Timeline, float, int], float]  # (cfg, timeline, base lr, step) -> factor


def _constant(cfg: ScheduleConfig, tl: Timeline, base_lr: float, step: int) -> float:
    return 1.0


def _multistep(cfg: ScheduleConfig, tl: Timeline, base_lr: float, step: int) -> float:
    return cfg.gamma ** sum(step >= tl.steps(m) for m in cfg.milestones)


def _step(cfg: ScheduleConfig, tl: Timeline, base_lr: float, step: int) -> float:
    return cfg.gamma ** (step // max(1, tl.steps(cfg.step_size)))


def _exponential(cfg: ScheduleConfig, tl: Timeline, base_lr: float, step: int) -> float:
    return cfg.gamma ** (step // max(1, tl.steps(cfg.every_epochs)))


def _decay_progress(cfg: ScheduleConfig, tl: Timeline, step: int) -> float:
    """How far step is from the end of warm-up (0) to the end of training (1)."""
    start = tl.steps(cfg.warmup_epochs)
    return min(1.0, max(0.0, (step - start) / max(1, tl.total_steps - start)))


def _towards_min_lr(cfg: ScheduleConfig, base_lr: float, fraction: float) -> float:
    """The factor that is fraction of the way from min_lr (0) to lr (1)."""
    floor = cfg.min_lr / base_lr if base_lr > 0 else 0.0
    return floor + (1.0 - floor) * fraction


def _cosine(cfg: ScheduleConfig, tl: Timeline, base_lr: float, step: int) -> float:
    return _towards_min_lr(cfg, base_lr, 0.5 * (1.0 + math.cos(math.pi * _decay_progress(cfg, tl, step))))


def _poly(cfg: ScheduleConfig, tl: Timeline, base_lr: float, step: int) -> float:
    return _towards_min_lr(cfg, base_lr, (1.0 - _decay_progress(cfg, tl, step)) ** cfg.power)


SHAPES: Mapping[str, Shape] = MappingProxyType(
    {
        "constant": _constant,
        "multistep": _multistep,
        "step": _step,
        "exponential": _exponential,
        "cosine": _cosine,
        "poly": _poly,
    }
)


class LRSchedule:
    """lr(step) = initial lr of each group x factor(step); `apply` sets it before an iteration."""

    def __init__(self, cfg: ScheduleConfig, base_lr: float, timeline: Timeline) -> None:
        if cfg.name not in SHAPES:
            close = difflib.get_close_matches(cfg.name, list(SHAPES), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"schedule.name: unknown schedule {cfg.name!r}.{hint} Available: {', '.join(SHAPES)}")
        self.cfg, self.base_lr, self.timeline = cfg, base_lr, timeline
        self.shape = SHAPES[cfg.name]

    def factor(self, step: int) -> float:
        """The multiplier of the initial lr at iteration step (0-based)."""
        value = self.shape(self.cfg, self.timeline, self.base_lr, step)
        warmup = self.timeline.steps(self.cfg.warmup_epochs)
        return value * min(1.0, (step + 1) / warmup) if warmup > 0 else value

    def lr(self, step: int) -> float:
        """The configured lr at iteration step."""
        return self.base_lr * self.factor(step)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr for iteration step; returns the factor."""
        factor = self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return factor
