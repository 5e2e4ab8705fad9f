"""What every distillation method is: a small module from (student, teacher) features to losses."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..weighting import Schedule


@dataclass(frozen=True)
class ExtraInput:
    """Where a method's extra input comes from by default: a student module's latest output (None: the level
    must name one), converted by `convert` (the edge that turns a framework's structure into the method's)."""

    module: str | None
    convert: Callable[[Any], Any] | None = None


@dataclass
class MethodOutput:
    """Named loss terms, unweighted (the weights are the weighting's: `diffkd.weighting`); diagnostics worth logging."""

    terms: dict[str, Tensor]
    stats: dict[str, Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """Base of all methods; `build` sizes the method from the probed tap shapes.

    What a method may declare, each handled in general by the Distiller and the engine:
    `needs_targets` (forward gets the batch's targets), `takes_tap_lists` (a level may give several
    taps per side; `build` then gets a list of shapes and forward a list of tensors, in order),
    `needs_indices` (forward gets `indices=`, each sample's dataset index, and `build` gets
    `dataset_size=`, the training set's size) and `teacher_module_options` (options that name a module
    of the teacher by path; `build` gets the frozen module itself, see `hold_teacher_module`) and
    `calibrated_terms` (what a level with weight "auto" scales; see `diffkd.weighting`).
    An instance declares `term_weights` (its own weight of each term, 1 where absent) and `schedules`
    (a term's weight schedule over training: `weighting.Warmup`, `weighting.EpochRamp`); the weighting
    applies both, so a method returns unweighted terms and never sees the training progress.

    A method's options are declared once: the keyword parameters of its `build`, or, where `build` hands
    `**options` on to the constructor, the constructor's (`option_names`).
    """

    needs_targets = False
    # The tap layouts (FeatureTaps.layouts) the method reads; "raw" captures are not channel-first.
    layouts: frozenset[str] = frozenset({"map", "vector", "sequence"})
    takes_tap_lists = False
    needs_indices = False
    teacher_module_options: tuple[str, ...] = ()
    # The terms `weight: auto` calibrates against the task loss (None: all); the others keep their weights.
    calibrated_terms: tuple[str, ...] | None = None
    # Input name -> where forward's keyword of that name comes from: a student module's latest output (a level
    # may name another module: Level(inputs=...)) and how it is converted (ExtraInput).
    extra_inputs: Mapping[str, ExtraInput] = MappingProxyType({})
    term_weights: Mapping[str, float] = MappingProxyType({})
    schedules: Mapping[str, "Schedule"] = MappingProxyType({})

    @classmethod
    def build(cls, student_shape: torch.Size, teacher_shape: torch.Size, **options) -> "Method":
        """Construct from probed shapes (batch first) and the level's options."""
        return cls(**options)

    @classmethod
    def option_names(cls) -> list[str]:
        """The options a level may give (named in errors and accepted by build): the keyword-only parameters of
        `build` (what it sizes from the shapes is positional), and, where build passes **options on, the
        constructor's keyword parameters that build does not fill itself."""
        build = inspect.signature(cls.build).parameters.values()
        names = [p.name for p in build if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in BUILD_INPUTS]
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in build):
            kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
            init = [p for p in inspect.signature(cls.__init__).parameters.values() if p.kind in kinds][1:]
            names += [p.name for p in init if p.default is not inspect.Parameter.empty and p.name not in BUILD_INPUTS]
        return names

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> MethodOutput:
        raise NotImplementedError


BUILD_INPUTS = ("dataset_size",)  # what build gets from the Distiller, not from a level's options


def require_same_shape(
    method: str, student_shape: torch.Size, teacher_shape: torch.Size, remedy: str = "check the taps and num_classes"
) -> None:
    """Logit-matching methods need identical shapes apart from the batch."""
    if tuple(student_shape[1:]) != tuple(teacher_shape[1:]):
        raise ValueError(
            f"{method} compares student and teacher outputs of the same shape, got student "
            f"{tuple(student_shape)} and teacher {tuple(teacher_shape)} ({remedy})"
        )


def hold_teacher_module(method: nn.Module, name: str, module: nn.Module) -> None:
    """Keep a frozen teacher module as `method.<name>` without registering it.

    So it is not in the method's state_dict, not handed to the optimizer and not switched to train
    mode by `method.train()`; inside a Distiller it moves with the teacher (`.to()`), whose part it is.
    Gradients still flow through it to whatever is fed into it.
    """
    object.__setattr__(method, name, module)


def require_per_sample_channels(method: str, shape: torch.Size | tuple[int, ...]) -> None:
    """Methods on pooled vectors take (B,C) vectors, (B,C,L) sequences or (B,C,H,W) maps (any rank >= 2)."""
    if len(shape) < 2:
        raise ValueError(
            f"{method} needs a (B,C) vector, a (B,C,L) sequence or a (B,C,H,W) map per tap, got a tap of shape "
            f"{tuple(shape)}"
        )


def pooled_vector(method: str, x: Tensor) -> Tensor:
    """A (B, C, ...) tap averaged over every dim after C, in float32: vectors stay, maps and sequences pool."""
    require_per_sample_channels(method, x.shape)
    x = x.float()
    return x.flatten(2).mean(2) if x.dim() > 2 else x


def require_maps(method: str, side: str, shapes: list[torch.Size]) -> None:
    """Methods with conv modules take (B,C,H,W) maps only."""
    for i, shape in enumerate(shapes):
        if len(shape) != 4:
            where = f"{side} tap {i}" if len(shapes) > 1 else f"{side} tap"
            raise ValueError(f"{method} needs (B,C,H,W) maps, but the {where} has shape {tuple(shape)}")


def float32_math(x: Tensor) -> torch.autocast:
    """A context with autocast off on x's device, so matrix products of a loss stay float32."""
    return torch.autocast(x.device.type, enabled=False)


def paired_shapes(method: str, student_shape, teacher_shape) -> tuple[list[torch.Size], list[torch.Size]]:
    """Multi-tap methods: both sides as lists of shapes of equal length (one tap each, or two lists paired in order)."""
    student_list, teacher_list = (isinstance(x, list) for x in (student_shape, teacher_shape))
    if student_list != teacher_list:
        raise ValueError(f"{method} pairs student and teacher taps: give one tap on each side or a list on each side")
    students, teachers = (list(x) if isinstance(x, list) else [x] for x in (student_shape, teacher_shape))
    if len(students) != len(teachers):
        raise ValueError(
            f"{method} pairs the taps in order, but there are {len(students)} student and {len(teachers)} teacher taps"
        )
    return students, teachers
