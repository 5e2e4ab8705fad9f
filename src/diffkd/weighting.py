"""Every loss weight of a distillation, applied in one place, with the schedules that move them.

A term's weight is its level's weight times the term's own weight, which its method declares as data
(`Method.term_weights`), times its schedule's value where the method declares one (`Method.schedules`: a
warm-up moving every step, or a ramp moving once per epoch), read at the training progress the step is
given. Methods never see the progress. A level may instead take `weight="auto"`:
over its first steps (the window) the task loss and its calibrated terms (the method's `calibrated_terms`,
or the level's `calibrate`) are summed, and the terms train with the running factor those sums give; at
the window's end the factor is fixed so that the weighted terms equal `ratio` times the task loss, and kept
(checkpointed, never recalibrated). `ratio` defaults to 1 / (the number of auto levels): together the
automatic levels equal the task loss. Terms outside the unit (DiffKD's diffusion and autoencoder losses)
keep their own weights from the first step. A calibrated term's schedule applies on top of its factor (the
window measures the term at its own weight, before the schedule).
"""
from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger("diffkd")

AUTO = "auto"
DEFAULT_WINDOW = 100  # steps; a first epoch that is shorter ends the window sooner
MAX_AUTO_WEIGHT = 1e6  # beyond this the calibrated terms are ~0 next to the task loss: refused, not applied


@dataclass(frozen=True)
class Warmup:
    """A weight rising linearly from 0 to 1 over the first `epochs` epochs, moving every step (fractional epochs).

    The epoch may be a tensor (a compiled step reads it without recompiling): the value is then computed in
    float64 and returned as a float32 tensor, the same number a Python float gives."""

    epochs: float

    def __call__(self, epoch: float | Tensor) -> float | Tensor:
        if self.epochs <= 0:
            return 1.0
        if isinstance(epoch, Tensor):
            return (epoch.double() / self.epochs).clamp(0.0, 1.0).float()
        return min(1.0, max(0.0, epoch) / self.epochs)


@dataclass(frozen=True)
class EpochRamp:
    """min(1, (e + 1) / epochs) with e the index of the epoch training is in: it moves once per epoch, as DKD's and
    ReviewKD's reference code ramp their weights (a tensor epoch as for `Warmup`)."""

    epochs: float

    def __call__(self, epoch: float | Tensor) -> float | Tensor:
        if self.epochs <= 0:
            return 1.0
        if isinstance(epoch, Tensor):
            return ((epoch.double().floor() + 1) / self.epochs).clamp(max=1.0).float()
        return min(1.0, (math.floor(epoch) + 1) / self.epochs)


Schedule = Warmup | EpochRamp  # what a method may declare for a term (Method.schedules)


def check_schedule_epochs(name: str, epochs: Any) -> float:
    """A schedule's length: a finite number of epochs >= 0 (0: no schedule)."""
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Real) or not math.isfinite(epochs) or epochs < 0:
        raise ValueError(f"{name} must be a number of epochs >= 0 (0: none), got {epochs!r}")
    return float(epochs)


@dataclass(frozen=True)
class WeightSpec:
    """A level's weight: a number (`value`), or automatic (`value` None) with its ratio, window and unit."""

    value: float | None = 1.0
    ratio: float | None = None  # None: the auto levels share the task loss evenly (see LossWeights)
    window: int = DEFAULT_WINDOW
    calibrate: tuple[str, ...] | None = None  # the auto unit's terms; None: the method's calibrated_terms

    @property
    def auto(self) -> bool:
        return self.value is None


def weight_spec(weight: Any = 1.0, ratio: Any = None, window: Any = None, calibrate: Any = None) -> WeightSpec:
    """Check a level's weight settings: a finite number >= 0, or "auto" with a ratio > 0 and a window >= 1."""
    auto = weight == AUTO if isinstance(weight, str) else False
    if not auto and (isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight)
                     or weight < 0):
        raise ValueError(f"Level weight must be a finite number >= 0 or 'auto', got {weight!r}")
    extras = {"ratio": ratio, "window": window, "calibrate": calibrate}
    if not auto:
        given = [k for k, v in extras.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to weight='auto', but the weight is {weight!r}; "
                             "set weight='auto' or drop them")
        return WeightSpec(float(weight))
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, numbers.Real)
                              or not math.isfinite(ratio) or ratio <= 0):
        raise ValueError(f"ratio (weighted terms / task loss for weight='auto') must be a finite number > 0, "
                         f"got {ratio!r}")
    window = DEFAULT_WINDOW if window is None else window
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise ValueError(f"window (calibration steps for weight='auto') must be an integer >= 1, got {window!r}")
    if calibrate is not None:
        if isinstance(calibrate, str):
            calibrate = [calibrate]
        if not isinstance(calibrate, Sequence) or not calibrate or not all(isinstance(t, str) for t in calibrate):
            raise ValueError(f"calibrate must name the level's terms to calibrate (e.g. ['kd']), got {calibrate!r}")
        calibrate = tuple(calibrate)
    return WeightSpec(None, None if ratio is None else float(ratio), int(window), calibrate)


def term_key(level: str, term: str, terms: Mapping[str, Any]) -> str:
    """A weighted term's name: the level's name for a method of one term, else level/term."""
    return level if len(terms) == 1 else f"{level}/{term}"


@dataclass
class WeightedTerms:
    """Each term under its name: weighted (what is optimised), raw (unweighted) and the weight applied."""

    weighted: dict[str, Tensor]
    raw: dict[str, Tensor]
    weights: dict[str, float | Tensor]


class WindowSums(nn.Module):
    """The calibration sums (task loss, weighted unit) and step counts per auto level, over every process.

    Each step's figures are reduced over processes as they are added, so every process holds the same sums
    and trains with the same running factor. Kept as the module's extra state rather than as buffers, so
    that a checkpoint holds them without DDP's per-forward buffer copy having any say in them.
    """

    def __init__(self, count: int):
        super().__init__()
        self.sums = torch.zeros(count, 2, dtype=torch.float64)
        self.steps = [0] * count

    def get_extra_state(self) -> dict[str, Any]:
        return {"sums": self.sums.clone(), "steps": list(self.steps)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.sums, self.steps = state["sums"].to(torch.float64).cpu().clone(), list(state["steps"])


class LossWeights(nn.Module):
    """Applies every level's and term's weight once, with its schedule; calibrates and holds the automatic ones.

    `specs`: level name -> WeightSpec; `methods`: level name -> its method, whose `calibrated_terms` (what an auto
    level scales by default, None: all), `term_weights` and `schedules` are read once here. The automatic factors
    (buffers) and the window's sums (`WindowSums`) travel with the state_dict into checkpoints: a resumed run keeps
    its factors and never recalibrates.
    """

    def __init__(self, specs: Mapping[str, WeightSpec], methods: Mapping[str, Any]):
        super().__init__()
        self.specs = dict(specs)
        self.term_weights = {name: dict(getattr(m, "term_weights", {})) for name, m in methods.items()}
        self.schedules = {name: dict(getattr(m, "schedules", {})) for name, m in methods.items()}
        self.auto_levels = [name for name, spec in self.specs.items() if spec.auto]
        self.units = {name: self.specs[name].calibrate or getattr(methods[name], "calibrated_terms", None)
                      for name in self.auto_levels}
        count = len(self.auto_levels)
        # A level without its own ratio takes an even share: the auto levels together equal the task loss.
        self.ratios = {name: 1.0 / count if self.specs[name].ratio is None else self.specs[name].ratio
                       for name in self.auto_levels}
        # Per auto level: its factor (0 until calibrated) and whether it is fixed; none without auto levels,
        # so a run of fixed weights checkpoints exactly what it did before.
        self.register_buffer("factors", torch.zeros(count) if count else None)
        self.register_buffer("fixed", torch.zeros(count, dtype=torch.bool) if count else None)
        self.window = WindowSums(count) if count else None
        self._fixed: list[bool] | None = None  # host copy of `fixed`, read once after (re)loading
        self._checked: set[str] = set()

    @property
    def has_auto(self) -> bool:
        return bool(self.auto_levels)

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[override]
        super()._load_from_state_dict(*args, **kwargs)
        self._fixed = None

    def _host_fixed(self) -> list[bool]:
        if self._fixed is None:
            self._fixed = [bool(v) for v in self.fixed.tolist()]
        return self._fixed

    def forward(self, outputs: Mapping[str, Any], task_loss: Tensor | None,
                progress: tuple[float, int] | None = None) -> WeightedTerms:
        """Weigh every level's MethodOutput (its `terms`, unweighted), in level order, at the training `progress`
        ((fractional epoch, epochs); needed in training by scheduled terms). From the second epoch on an open
        calibration window is closed first."""
        if progress is not None and not isinstance(progress[0], Tensor) and progress[0] >= 1:
            self.end_windows()  # (a front end passing a tensor epoch ends the first epoch with end_windows)
        if self.has_auto and self.training and not all(self._host_fixed()) and task_loss is None:
            raise ValueError(
                f"level {self.auto_levels[0]!r} has weight='auto', which calibrates against the task loss: build the "
                "Distiller with task_loss=fn(student_output, targets), or pass task_loss=<tensor> to its forward"
            )
        weighted: dict[str, Tensor] = {}
        raw: dict[str, Tensor] = {}
        weights: dict[str, float | Tensor] = {}
        for name, out in outputs.items():
            spec = self.specs[name]
            own_weights = self.term_weights[name]
            unit = self._unit(name, out.terms) if spec.auto else ()
            if spec.auto and self.training and not self._host_fixed()[self.auto_levels.index(name)]:
                # measured before it is weighed: a window's step trains with the factor that includes it
                unit_sum = sum(own_weights.get(term, 1.0) * out.terms[term].detach() for term in unit)
                self._measure(name, task_loss, unit_sum)  # type: ignore[arg-type]
            factor = self._factor(name) if spec.auto else spec.value
            for term, value in out.terms.items():
                key = term_key(name, term, out.terms)
                own = own_weights.get(term, 1.0) * self._scheduled(name, term, progress)
                weight = own * factor if term in unit else (own if spec.auto else own * spec.value)
                weighted[key], raw[key], weights[key] = weight * value, value, weight
        return WeightedTerms(weighted, raw, weights)

    def _scheduled(self, name: str, term: str, progress: tuple[float, int] | None) -> float:
        """The value of a term's schedule at `progress` (1 without one, and outside training without progress)."""
        schedule = self.schedules[name].get(term)
        if schedule is None:
            return 1.0
        if progress is None:
            if self.training:
                raise ValueError(f"level {name!r}: the weight of its term {term!r} follows training ({schedule}), so "
                                 "each step needs the training progress: call the distiller with progress=(fractional "
                                 "epoch, epochs), as diffkd's engine and integrations do")
            return 1.0
        return schedule(progress[0])

    def _unit(self, name: str, terms: Mapping[str, Tensor]) -> tuple[str, ...]:
        """The terms an auto level calibrates; a named term the method does not return is an error."""
        unit = self.units[name] or tuple(terms)
        if name not in self._checked:
            missing = [t for t in unit if t not in terms]
            if missing:
                raise ValueError(f"level {name!r}: calibrate names {missing}, but the method's terms are "
                                 f"{list(terms)}; name some of those")
            self._checked.add(name)
        return unit

    def _factor(self, name: str) -> Tensor:
        return self.factors[self.auto_levels.index(name)]

    def _measure(self, name: str, task_loss: Tensor, unit_sum: Tensor) -> None:
        """Add one training step (summed over processes) to an open window and update its running factor;
        close the window once it holds `window` steps."""
        i = self.auto_levels.index(name)
        with torch.no_grad():
            step = torch.stack([task_loss.detach().double().reshape(()), unit_sum.double().reshape(())])
            if dist.is_available() and dist.is_initialized():
                step = step.to(self._reduce_device())
                dist.all_reduce(step)
            self.window.sums[i] += step.cpu()
        self.window.steps[i] += 1
        if self.window.steps[i] >= self.specs[name].window:
            self.close(name)
            return
        task, unit = self.window.sums[i].tolist()
        running = self.ratios[name] * task / unit if unit > 0 else math.inf
        # a window not usable so far (a term sum of 0, a weight over the cap, a task loss < 0 or not finite)
        # trains without the terms; its close says what is wrong if it stays so
        self.factors[i] = running if 0 <= running <= MAX_AUTO_WEIGHT else 0.0

    def end_windows(self) -> None:
        """Fix every open window now (the engine calls it when the first epoch ends before the window does)."""
        for i, name in enumerate(self.auto_levels):
            if not self._host_fixed()[i] and self.window.steps[i]:
                self.close(name)

    def close(self, name: str) -> None:
        """Fix a level's factor from its window: ratio x mean task loss / mean unit (sums over every process)."""
        i = self.auto_levels.index(name)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        task, unit = self.window.sums[i].tolist()
        steps = self.window.steps[i] * world
        terms = "+".join(self.units[name] or ("all terms",))
        where = f"level {name!r} (weight='auto'): over the {int(steps)} calibration steps"
        task_mean, unit_mean = task / max(steps, 1), unit / max(steps, 1)
        if not math.isfinite(task_mean) or task_mean <= 0:
            raise ValueError(f"{where} the task loss averaged {task_mean:.4g}; weight='auto' needs a finite task loss "
                             "> 0 to calibrate against: give the level a number weight")
        if not math.isfinite(unit_mean) or unit_mean <= 0:
            raise ValueError(f"{where} its terms ({terms}) averaged {unit_mean:.4g}; weight='auto' needs them finite "
                             "and > 0: check the level's taps, or give it a number weight")
        factor = self.ratios[name] * task_mean / unit_mean
        if factor > MAX_AUTO_WEIGHT:
            raise ValueError(
                f"{where} its terms ({terms}) averaged {unit_mean:.3g} against a task loss of {task_mean:.3g}, so "
                f"the weight would be {factor:.3g} (> {MAX_AUTO_WEIGHT:g}): the terms are ~0 (a constant tap, or "
                "student and teacher already equal there); check the taps, or give the level a number weight"
            )
        self.factors[i] = factor
        self.fixed[i] = True
        self._host_fixed()[i] = True
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            log.info(f"auto weight: level {name!r} ({terms}) x {factor:.4g} = ratio {self.ratios[name]:.4g} x task loss "
                     f"{task_mean:.4g} / {unit_mean:.4g} (mean over {int(steps)} steps)")

    def _reduce_device(self) -> torch.device:
        """NCCL reduces CUDA tensors only; gloo takes the CPU ones."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def current(self) -> dict[str, float]:
        """The automatic factors as they stand (the running estimate while a window is open), by level: for logs."""
        return dict(zip(self.auto_levels, self.factors.tolist())) if self.has_auto else {}
