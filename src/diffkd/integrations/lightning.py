"""Distil inside Lightning: `DistillationModule`, a LightningModule wrapping the user's own LightningModule.

    module = DistillationModule(LitClassifier(), teacher, levels=[Level("@logits", "@logits", "kd")],
                                input_shape=(3, 32, 32))  # the task loss: LitClassifier's own training_step
    L.Trainer(...).fit(module, train_loader)

The wrapped module (the student) keeps its forward, `configure_optimizers` (run with the method
modules attached, so an optimizer over `self.parameters()` covers them), training, validation, test and
predict steps. Its own `training_step` gives the task loss, every term it adds included (its forward
inside runs once on the batch's inputs, and the teacher on the same); a student without one gets
`task_loss(output, targets)`. diffkd's `Distiller` adds the levels' terms (levels with
`weight="auto"` calibrate against the task loss). The module tree is `student` +
`methods` + `weighting` (the automatic weights): checkpoints and DDP hold them; the teacher stays
outside, frozen, in eval mode, moved with the module. `export_student` writes the student alone.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

try:
    import lightning as L
except ImportError:  # the extra is optional
    raise ImportError("diffkd.integrations.lightning needs lightning: pip install diffkd[lightning]") from None
from lightning.pytorch.utilities.model_helpers import is_overridden

from .. import __version__
from ..distiller import Distiller, DistillOutput, Level, check_separate, checked_task_loss
from .checks import check_teacher_and_levels, warn_if_teacher_trainable

__all__ = ["DistillationModule"]

LEVELS_KEY = "diffkd_levels"  # in Lightning checkpoints: the levels as written
VERSION_KEY = "diffkd_version"  # and the diffkd that wrote them
ATTACHED_NAME = "distill_methods"  # the method modules' name on the student while its configure_optimizers runs

Batch = tuple[Any, Tensor | None, Tensor | None]  # (inputs, targets, indices)


class DistillationModule(L.LightningModule):
    """Train `student` (a LightningModule) on its own training_step's loss, or `task_loss(student_output, targets)`
    where it has none, plus the levels' terms.

    `example_input` or `input_shape` (without batch) probes the taps. `split_batch(batch)` gives
    (inputs, targets, indices or None); by default a batch is (inputs, targets), or ((inputs, targets),
    indices) from `diffkd.data.WithIndices` when a method needs dataset indices. `teacher_inputs(inputs)`
    is what the teacher is called with when it takes other inputs than the student (then give
    `teacher_example_input` too). Each term is logged with `self.log` as train/<term> (and
    train/task_loss, train/loss, train/auto_weight/<level> for automatic weights).
    """

    def __init__(self, student: L.LightningModule, teacher: nn.Module, levels: Sequence[Level], *,
                 task_loss: Callable[[Any, Any], Tensor] | None = None, example_input: Any = None,
                 input_shape: tuple[int, ...] | None = None, split_batch: Callable[[Any], Batch] | None = None,
                 teacher_inputs: Callable[[Any], Any] | None = None, teacher_example_input: Any = None,
                 dataset_size: int | None = None):
        super().__init__()
        check_teacher_and_levels(teacher, levels, "DistillationModule")
        if not isinstance(student, L.LightningModule):
            raise TypeError(f"DistillationModule wraps the student's LightningModule, got {type(student).__name__}: "
                            "wrap a plain nn.Module in a LightningModule whose forward calls it")
        if (teacher_inputs is None) != (teacher_example_input is None):
            raise ValueError("give teacher_inputs (what the teacher is called with) and teacher_example_input "
                             "(what it is probed with) together, or neither")
        own_step = is_overridden("training_step", student, parent=L.LightningModule)
        if own_step and task_loss is not None:
            raise ValueError(f"the student ({type(student).__name__}) has its own training_step, whose loss is the task "
                             "loss here: drop task_loss=, or remove training_step from the student")
        if not own_step and task_loss is None:
            raise ValueError(f"give task_loss=fn(student_output, targets): the student ({type(student).__name__}) has no "
                             "training_step of its own to compute it")
        check_separate(teacher, student)
        warn_if_teacher_trainable(teacher, "DistillationModule")
        distiller = Distiller(teacher, student, levels, example_input=example_input, input_shape=input_shape,
                              dataset_size=dataset_size, task_loss=task_loss, teacher_example_input=teacher_example_input)
        object.__setattr__(self, "distiller", distiller)  # outside the module tree, which holds its parts but the teacher
        self.student = student
        self.methods = distiller.methods
        self.weighting = distiller.weighting
        self.split_batch, self.teacher_inputs, self.own_step = split_batch, teacher_inputs, own_step
        for step in ("validation_step", "test_step"):  # a step the student lacks: Lightning sees none here either
            if not is_overridden(step, student, parent=L.LightningModule):
                object.__setattr__(self, step, None)

    # ----------------------------------------------------------------------------- modes, devices
    def train(self, mode: bool = True) -> "DistillationModule":
        super().train(mode)
        self.distiller.teacher.eval()
        return self

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        super()._apply(fn, *args, **kwargs)
        self.distiller.teacher._apply(fn, *args, **kwargs)  # the teacher moves with the module
        return self

    # ----------------------------------------------------------------------------- training
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The student's forward."""
        return self.student(*args, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets, indices = self.split_batch(batch) if self.split_batch else self._default_split(batch)
        progress = self._progress(batch_idx)
        if self.own_step:
            out = self._distil_own_step(batch, batch_idx, inputs, targets, indices, progress)
        else:
            extra = {"teacher_inputs": self.teacher_inputs(inputs)} if self.teacher_inputs else {}
            out = self.distiller(inputs, targets, indices, progress=progress, **extra)  # task_loss computed inside
        loss = out.total
        batch_size = _batch_size(inputs)
        terms = {"train/task_loss": out.task_loss, **{f"train/{name}": value for name, value in out.losses.items()}}
        self.log_dict({k: v.detach() for k, v in terms.items()}, on_step=True, on_epoch=True, sync_dist=True,
                      batch_size=batch_size)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True, sync_dist=True,
                 batch_size=batch_size)
        for level, weight in self.distiller.auto_weights().items():  # the same in every process
            self.log(f"train/auto_weight/{level}", weight, on_step=True, on_epoch=False, batch_size=batch_size)
        return loss

    def _distil_own_step(self, batch: Any, batch_idx: int, inputs: Any, targets: Any, indices: Any,
                         progress: tuple[float, int] | None = None) -> DistillOutput:
        """The teacher on the batch's inputs, then the student's own training_step (its forward captured by the
        taps), its loss the task loss."""
        self.distiller.run_teacher(self.teacher_inputs(inputs) if self.teacher_inputs else inputs)
        before = self.distiller.student_taps.forwards
        result = self._student_step("training_step", batch, batch_idx)
        ran = self.distiller.student_taps.forwards - before
        if ran != 1:
            raise ValueError(f"the student's training_step ran its forward {ran} times; DistillationModule distils the "
                             "features of one forward per step: call self(inputs) once in it, or give the student no "
                             "training_step and pass task_loss=")
        loss = result.get("loss") if isinstance(result, Mapping) else result
        task_loss = checked_task_loss(loss, "the student's training_step")
        return self.distiller.distil(None, targets, indices, task_loss, progress)

    def on_train_epoch_end(self) -> None:
        """A calibration window (weight "auto") still open ends with the first epoch."""
        self.distiller.end_epoch()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The levels as written (names, taps, methods, weights, options), so a resume can tell other levels."""
        checkpoint[LEVELS_KEY] = [repr(level) for level in self.distiller.levels]
        checkpoint[VERSION_KEY] = __version__
        super().on_save_checkpoint(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of other levels, or of an earlier diffkd, is refused in one line before Lightning loads it
        (its own error would list every key)."""
        saved = checkpoint.get(LEVELS_KEY)
        mine = [repr(level) for level in self.distiller.levels]
        if saved is None:
            raise ValueError("the checkpoint records no distillation levels: it was written by an earlier diffkd or "
                             "without DistillationModule; resume it with what wrote it, or start a new run")
        if saved != mine:
            first = next((f"{a} there, {b} here" for a, b in zip(saved, mine) if a != b),
                         f"{len(saved)} levels there, {len(mine)} here")
            raise ValueError(f"the checkpoint was trained with other levels ({first}): resume with the levels it was "
                             "trained with")
        super().on_load_checkpoint(checkpoint)

    def _default_split(self, batch: Any) -> Batch:
        """(inputs, targets) batches, or ((inputs, targets), indices) from WithIndices when a method needs indices."""
        pair = isinstance(batch, (tuple, list)) and len(batch) == 2
        if self.distiller.needs_indices:
            if pair and isinstance(batch[0], (tuple, list)) and len(batch[0]) == 2:
                (inputs, targets), indices = batch
                return inputs, targets, indices
            raise ValueError("a level needs each sample's dataset index: wrap the training set in "
                             "diffkd.data.WithIndices (batches ((inputs, targets), indices)) or pass split_batch=...")
        if pair:
            return batch[0], batch[1], None
        raise ValueError(f"DistillationModule reads (inputs, targets) batches, got a {type(batch).__name__}"
                         f"{f' of {len(batch)}' if isinstance(batch, (tuple, list)) else ''}: pass "
                         "split_batch=lambda batch: (inputs, targets, indices or None)")

    def _progress(self, batch_idx: int) -> tuple[float, int]:
        """(fractional epoch, number of epochs) for the methods' schedules, from the trainer's step budget."""
        trainer = self.trainer
        batches = trainer.num_training_batches
        if not (math.isfinite(batches) and batches > 0):  # an iterable without length: whole epochs only
            return float(trainer.current_epoch), max(1, trainer.max_epochs or 1)
        epochs = math.ceil(trainer.estimated_stepping_batches * trainer.accumulate_grad_batches / batches)
        return trainer.current_epoch + batch_idx / batches, max(1, epochs)

    def configure_optimizers(self) -> Any:
        """The student's configure_optimizers, run while the method modules are attached to it as
        `distill_methods`, so an optimizer over its `self.parameters()` (and that optimizer's scheduler) covers them."""
        self.student.add_module(ATTACHED_NAME, self.methods)
        try:
            config = self.student.configure_optimizers()
        finally:
            delattr(self.student, ATTACHED_NAME)
        covered = {id(p) for optimizer in _optimizers(config) for group in optimizer.param_groups for p in group["params"]}
        if any(id(p) not in covered for p in self.methods.parameters() if p.requires_grad):
            raise ValueError("the student's configure_optimizers does not optimise the method modules: build the "
                             "optimizer over self.parameters() (the methods are attached as self.distill_methods "
                             "while it runs) or override DistillationModule.configure_optimizers")
        return config

    # ----------------------------------------------------------------------------- the student's other steps
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._student_step("validation_step", *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._student_step("test_step", *args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._student_step("predict_step", *args, **kwargs)

    def _student_step(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run the student's own step, its self.log calls logged as this module's."""
        self.student._current_fx_name = self._current_fx_name
        try:
            return getattr(self.student, name)(*args, **kwargs)
        finally:
            self.student._current_fx_name = None

    # ----------------------------------------------------------------------------- export
    def export_student(self, path: str, overwrite: bool = False):
        """Write the student's weights alone (load_state_dict(strict=True) into the user's module); see Distiller."""
        return self.distiller.export_student(path, overwrite=overwrite)


def _optimizers(config: Any) -> list[torch.optim.Optimizer]:
    """Every optimizer in what configure_optimizers may return (one, a list, (optimizers, schedulers), dicts)."""
    if isinstance(config, torch.optim.Optimizer):
        return [config]
    if isinstance(config, dict):
        return _optimizers(config.get("optimizer"))
    if isinstance(config, (list, tuple)):
        return [o for item in config for o in _optimizers(item)]
    return []


def _batch_size(inputs: Any) -> int | None:
    """The batch size of a tensor input (or the first tensor of a tuple/dict), for self.log's epoch means."""
    if isinstance(inputs, Tensor):
        return inputs.shape[0] if inputs.dim() else None
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (tuple, list)) else ()
    return next((_batch_size(v) for v in values if isinstance(v, Tensor)), None)
