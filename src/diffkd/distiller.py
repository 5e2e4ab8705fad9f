"""Teacher + student + one method per level: the object a training loop optimises.

The teacher is held outside the module tree: it is frozen, pinned to eval mode, never in
`state_dict()` (so checkpoints hold student + method modules only) and invisible to DDP, yet it
follows `.to()` with the rest. Features come from forward hooks, so neither model is edited.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .atomic import save_atomic
from .methods import build_method, method_class
from .models.probe import probe_model, resolve_aliases
from .taps import FeatureTaps, ProbedFeature, Tap, call_model, resolve_module
from .step import DistillationStep, DistillOutput, Progress
from .weighting import LossWeights, weight_spec

TapSpec = str | Tap | Mapping[str, Any]


class Level:
    """One distilled pair: student tap, teacher tap, method name, loss weight and method options.

    `weight` is a number >= 0, or "auto": the level's calibrated terms (its method's `calibrated_terms`, or
    `calibrate`) are scaled so that they equal `ratio` times the task loss (default: 1 / the number of auto
    levels, so that together they equal it), measured over the first `window` steps (default 100, or the
    first epoch if shorter), during which they train with the running estimate of that factor. See
    `diffkd.weighting`; the Distiller then needs the task loss (its `task_loss` argument).

    A side may list several taps (`student=["layer1", "layer2"]`) for methods that take lists
    (ReviewKD, VID): the method then gets their shapes and captures as lists, in the order given.

    `inputs` names the student module each of the method's extra inputs is read from (input name -> module
    path), where it differs from the method's default (`Method.extra_inputs`): FGD reads `boxes` from a
    torchvision detector's `transform` unless told otherwise.
    """

    def __init__(self, student: TapSpec | list[TapSpec], teacher: TapSpec | list[TapSpec], method: str,
                 weight: float | str = 1.0, name: str | None = None, *, inputs: Mapping[str, str] | None = None,
                 ratio: float | None = None, window: int | None = None, calibrate: Sequence[str] | None = None,
                 **options: Any):
        if inputs is not None and not (isinstance(inputs, Mapping) and all(isinstance(v, str) for v in inputs.values())):
            raise ValueError(f"Level inputs map an input name to a student module path, e.g. {{'boxes': 'transform'}}, got {inputs!r}")
        self.student, self.teacher, self.method = student, teacher, method
        self.weight_spec = weight_spec(weight, ratio, window, calibrate)
        self.weight, self.inputs, self.options = weight, dict(inputs or {}), options
        self.name = name or default_level_name(method, student)

    def __repr__(self) -> str:
        inputs = f", inputs={self.inputs!r}" if self.inputs else ""
        return (f"Level({self.student!r}, {self.teacher!r}, {self.method!r}, weight={self.weight}, "
                f"name={self.name!r}{inputs}, options={self.options})")


def default_level_name(method: str, student: TapSpec | list[TapSpec]) -> str:
    """A level's name when none is given: the method and the (first) student tap as written, an alias
    without its "@" ("diffkd_feature", "mse_layer4"), so a config and the Python API name a level alike."""
    spec = student[0] if isinstance(student, list) and student else student
    path = spec[1:] if isinstance(spec, str) and spec.startswith("@") else Tap.parse(spec).path
    return f"{method}_{re.sub(r'[^0-9A-Za-z_]', '_', path) or 'output'}"


class Distiller(DistillationStep):
    """Distil `student` from a frozen `teacher` on the given levels: the distillation step (`step.py`) on the
    features forward hooks capture from both models.

    Give `example_input` (or `input_shape` without batch) so every tap's shape is probed once and
    the method modules are sized automatically. A level's tap may be "@feature" / "@logits": the
    model's pooled feature and logits, found by probing it (`diffkd.models.find_taps`).
    `dataset_size` (the training set's size) is needed by methods that use each sample's dataset
    index (CRD); they then need `indices` in `forward`. `task_loss(student_output, targets)` computes the
    task loss in `forward` when training or given targets (then in `DistillOutput.task_loss`): levels with weight "auto" calibrate
    against it (or pass `task_loss=<tensor>` to `forward`). A teacher that takes other inputs than the
    student (a plain CNN taking a tensor, a Hugging Face student taking keywords and labels) is probed
    with `teacher_example_input` and then called with `forward(..., teacher_inputs=...)`.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, levels: Sequence[Level],
                 example_input: Any = None, input_shape: tuple[int, ...] | None = None,
                 dataset_size: int | None = None, task_loss: Callable[[Any, Any], Tensor] | None = None,
                 teacher_example_input: Any = None):
        if not levels:
            raise ValueError("a Distiller needs at least one Level")
        if example_input is None and input_shape is None:
            raise ValueError("give example_input or input_shape so the method modules can be sized from the taps")
        names = [level.name for level in levels]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"level names must be unique, got {duplicates} twice; pass name=... to Level")
        check_separate(teacher, student)
        teacher.requires_grad_(False).eval()
        tap_names = {lv.name: (_tap_names(lv, "student"), _tap_names(lv, "teacher")) for lv in levels}
        student_specs = {n: spec for lv in levels for n, spec in zip(tap_names[lv.name][0], _as_list(lv.student))}
        teacher_specs = {n: spec for lv in levels for n, spec in zip(tap_names[lv.name][1], _as_list(lv.teacher))}
        teacher_input, teacher_shape = ((example_input, input_shape) if teacher_example_input is None
                                        else (teacher_example_input, None))
        # One watched forward per model (on the meta device where it runs there) resolves the aliases and sizes
        # every tap; one hook holder per model then captures features (and the student's extra inputs).
        student_aliases, teacher_aliases = _has_alias(student_specs), _has_alias(teacher_specs)
        student_watch = functools.cache(lambda: probe_model(student, example_input, input_shape=input_shape,
                                                            aliases=student_aliases))
        teacher_watch = functools.cache(lambda: probe_model(teacher, teacher_input, input_shape=teacher_shape,
                                                            aliases=teacher_aliases))
        student_specs = resolve_aliases(student_specs, student_watch, role="student")
        teacher_specs = resolve_aliases(teacher_specs, teacher_watch, role="teacher")
        extra_paths, extra_what = _extra_inputs(levels, {lv.name: method_class(lv.method) for lv in levels})
        student_taps = FeatureTaps(student, student_specs, extra_paths, extra_what)
        teacher_taps = FeatureTaps(teacher, teacher_specs)
        student_probe = student_taps.replay(student_watch().calls)
        teacher_probe = teacher_taps.replay(teacher_watch().calls)
        methods = nn.ModuleDict()
        for lv in levels:
            student_names, teacher_names = tap_names[lv.name]
            s = _probed(lv.student, student_names, student_probe)
            t = _probed(lv.teacher, teacher_names, teacher_probe)
            try:
                options = _with_teacher_modules(lv, teacher)
                methods[lv.name] = build_method(lv.method, s[0], t[0], layouts=(s[1], t[1]),
                                                dataset_size=dataset_size, **options)
            except ValueError as exc:
                raise ValueError(f"level {lv.name!r} ({lv.student!r} -> {lv.teacher!r}): {exc}") from None
        super().__init__(methods, LossWeights({lv.name: lv.weight_spec for lv in levels}, dict(methods.items())))
        self.levels, self.student, self.task_loss = list(levels), student, task_loss
        self.separate_teacher_inputs = teacher_example_input is not None
        object.__setattr__(self, "teacher", teacher)  # not a submodule: see the module docstring
        self._tap_names = tap_names
        self.probed = {"student": student_probe, "teacher": teacher_probe}  # shapes and layouts, for reports
        self.student_taps, self.teacher_taps = student_taps, teacher_taps

    # ----------------------------------------------------------------------------- modes, devices
    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()
        return self

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        super()._apply(fn, *args, **kwargs)
        self.teacher._apply(fn, *args, **kwargs)
        return self

    def tap_names(self, level: str, side: str) -> list[str]:
        """The names under which a level's taps on one side ("student"/"teacher") are captured and probed."""
        return self._tap_names[level][0 if side == "student" else 1]

    @property
    def needs_indices(self) -> bool:
        """Whether some method needs each sample's dataset index (`indices` in forward)."""
        return any(method.needs_indices for method in self.methods.values())

    # ----------------------------------------------------------------------------- forward
    def forward(self, inputs: Any, targets: Tensor | None = None, indices: Tensor | None = None,
                task_loss: Tensor | None = None, *, teacher_inputs: Any = None,
                progress: Progress | None = None) -> DistillOutput:
        """Run teacher (no grad) and student, then the distillation step on the captured features.

        A tuple `inputs` is spread as positional arguments (detectors take `(images, targets)`), a
        mapping as keywords. `indices` (B,) are the samples' dataset indices, passed to the methods
        that need them. `task_loss`: this batch's task loss, for levels with weight "auto", where the
        Distiller was built without a `task_loss` function. `teacher_inputs` is what the teacher is
        called with when it is not `inputs` (required when the Distiller was built with
        `teacher_example_input`, refused otherwise). `progress`: (fractional epoch, epochs), where
        training stands, needed by levels whose weights follow it (a warm-up); `e + i / steps` before
        step i of epoch e (0-based).
        """
        if (teacher_inputs is None) == self.separate_teacher_inputs:
            raise ValueError(
                "this Distiller was built with teacher_example_input: call it as d(inputs, ..., teacher_inputs=...)"
                if self.separate_teacher_inputs else
                "teacher_inputs was given, but this Distiller probed the teacher with the student's example input: "
                "build it with teacher_example_input=... too"
            )
        self.run_teacher(inputs if teacher_inputs is None else teacher_inputs)
        student_output = call_model(self.student, inputs)
        if task_loss is None and self.task_loss is not None and (targets is not None or self.training):
            # in eval mode without targets (visualize) there is none to compute
            task_loss = checked_task_loss(self.task_loss(student_output, targets), "the task_loss function")
        return self.distil(student_output, targets, indices, task_loss, progress)

    def run_teacher(self, inputs: Any) -> None:
        """Call the frozen teacher on `inputs` (no gradient), so its taps hold this batch's features."""
        with torch.no_grad():
            call_model(self.teacher, inputs)

    def distil(self, student_output: Any, targets: Tensor | None = None, indices: Tensor | None = None,
               task_loss: Tensor | None = None, progress: Progress | None = None) -> DistillOutput:
        """The distillation step on the features both models' latest forwards captured: for a front end that
        calls the student itself (and the teacher with `run_teacher`) on the same batch."""
        if indices is None and self.needs_indices:
            needing = [n for n, m in self.methods.items() if m.needs_indices]
            raise ValueError(
                f"level {needing[0]!r} needs each sample's dataset index: call the distiller as d(inputs, targets, "
                "indices=...) with the (B,) indices of the batch's items (wrap the dataset in diffkd.data.WithIndices)"
            )
        student, teacher, extra = {}, {}, {}
        for level in self.levels:
            student_names, teacher_names = self._tap_names[level.name]
            method = self.methods[level.name]
            student[level.name] = _captures(level.student, student_names, self.student_taps)
            teacher[level.name] = _captures(level.teacher, teacher_names, self.teacher_taps)
            extra[level.name] = {name: _converted(source, self.student_taps.output(f"{level.name}/{name}"))
                                 for name, source in method.extra_inputs.items()}
            if method.needs_indices:
                extra[level.name]["indices"] = indices
        return self.compute(student, teacher, targets=targets, extra=extra, task_loss=task_loss, progress=progress,
                            student_output=student_output)

    # ----------------------------------------------------------------------------- parameters, export
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Student + method modules: what the optimizer gets."""
        for p in self.parameters():
            if p.requires_grad:
                yield p

    def extra_parameters(self) -> int:
        """Number of parameters the methods add (training-time only)."""
        return sum(p.numel() for p in self.methods.parameters())

    def student_state_dict(self) -> dict[str, Tensor]:
        """The student's weights alone, loadable with strict=True into a plain student model."""
        return {k: v.detach().clone() for k, v in self.student.state_dict().items()}

    def export_student(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the student's weights alone, atomically; an existing file is kept unless overwrite."""
        return save_atomic(self.student_state_dict(), path, overwrite=overwrite)

    def close(self) -> None:
        """Remove the feature hooks from both models and the extra-input hooks from the student."""
        self.student_taps.close()
        self.teacher_taps.close()


def checked_task_loss(loss: Any, source: str) -> Tensor:
    """The task loss as a one-element tensor, or one line naming what `source` returned instead."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shown = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"{source} returned {shown}; it must return the task loss as one number in a tensor "
                         "(e.g. F.cross_entropy(output, targets))")
    return loss


def check_separate(teacher: nn.Module, student: nn.Module) -> None:
    """Refuse a teacher that shares a module, parameter or buffer with the student: freezing the teacher would
    freeze that part of the student without a word (a teacher that is the student freezes all of it)."""
    in_student = {id(m): name for name, m in student.named_modules(remove_duplicate=False)}
    for name, module in teacher.named_modules(remove_duplicate=False):
        holds_state = next(module.parameters(), None) is not None or next(module.buffers(), None) is not None
        if id(module) in in_student and holds_state:
            theirs = in_student[id(module)]
            what = ("the teacher is the student" if not name and not theirs else
                    f"the teacher is the student's module {theirs!r}" if not name else
                    f"the teacher's module {name!r} is the student's {'module ' + repr(theirs) if theirs else 'whole model'}")
            raise ValueError(f"{what}: distillation freezes the teacher, and with it that part of the student; give the "
                             "teacher its own copy (copy.deepcopy) or a separately trained model")
    student_tensors = {id(t): name for name, t in [*student.named_parameters(remove_duplicate=False),
                                                   *student.named_buffers(remove_duplicate=False)]}
    for name, tensor in [*teacher.named_parameters(remove_duplicate=False), *teacher.named_buffers(remove_duplicate=False)]:
        if id(tensor) in student_tensors:
            raise ValueError(f"the teacher's {name!r} is the student's {student_tensors[id(tensor)]!r} (a shared tensor): "
                             "distillation freezes the teacher, which would freeze it in the student too; give the "
                             "teacher its own copy (copy.deepcopy)")


def _has_alias(specs: Mapping[str, Any]) -> bool:
    """Whether some tap spec is an alias ("@feature"), which the probe finds from the model's recorded graph."""
    return any(isinstance(spec, str) and spec.startswith("@") for value in specs.values() for spec in _as_list(value))


def _as_list(spec: Any) -> list[Any]:
    """A side's taps as a list (one tap is a list of one)."""
    return list(spec) if isinstance(spec, list) else [spec]


def _tap_names(level: Level, side: str) -> list[str]:
    """Names of a level's taps on one side: the level's name for one tap, name[i] for a list."""
    spec = getattr(level, side)
    if not isinstance(spec, list):
        return [level.name]
    if not spec:
        raise ValueError(f"level {level.name!r}: the list of {side} taps is empty; give at least one tap")
    return [f"{level.name}[{i}]" for i in range(len(spec))]


def _probed(spec: Any, names: list[str], probed: Mapping[str, ProbedFeature]) -> tuple[Any, Any]:
    """(shape, layout) of a single tap, or (list of shapes, list of layouts) of a list of taps."""
    if isinstance(spec, list):
        return [probed[n].shape for n in names], [probed[n].layout for n in names]
    return probed[names[0]].shape, probed[names[0]].layout


def _extra_inputs(levels: Sequence[Level], methods: Mapping[str, type]) -> tuple[dict[str, str], dict[str, str]]:
    """The student module each level's extra input comes from (the method's default or the level's own), by
    "level/input" name, and what each is, for errors."""
    paths, what = {}, {}
    for lv in levels:
        declared = methods[lv.name].extra_inputs
        unknown = sorted(set(lv.inputs) - set(declared))
        if unknown:
            raise ValueError(f"level {lv.name!r}: method {lv.method!r} reads no input {unknown[0]!r}; "
                             f"its extra inputs: {', '.join(declared) or 'none'}")
        for name, source in declared.items():
            path = lv.inputs.get(name, source.module)
            if path is None:
                raise ValueError(f"level {lv.name!r}: method {lv.method!r} needs its input {name!r}: "
                                 f"give Level(inputs={{{name!r}: <student module path>}})")
            paths[f"{lv.name}/{name}"] = path
            what[f"{lv.name}/{name}"] = f"level {lv.name!r} ({lv.method}): input {name!r}"
    return paths, what


def _converted(source: Any, value: Any) -> Any:
    """An extra input as its method takes it: the module's output through the source's converter, if any."""
    return source.convert(value) if source.convert is not None else value


def _captures(spec: Any, names: list[str], taps: FeatureTaps) -> Tensor | list[Tensor]:
    """The latest capture of a single tap, or the list of captures of a list of taps."""
    return [taps[n] for n in names] if isinstance(spec, list) else taps[names[0]]


def _with_teacher_modules(level: Level, teacher: nn.Module) -> dict[str, Any]:
    """The level's options with each teacher-module option (a path) replaced by that frozen module."""
    options = dict(level.options)
    for key in method_class(level.method).teacher_module_options:
        if key in options:
            options[key] = resolve_module(teacher, options[key], f"option {key!r} (a module path of the teacher)")
    return options
