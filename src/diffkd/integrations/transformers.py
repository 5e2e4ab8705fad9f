"""Distil inside the Hugging Face `Trainer`: `DistillationTrainer`, a Trainer whose model is the student.

    trainer = DistillationTrainer(model=student, teacher=teacher, levels=[Level("@logits", "@logits", "kd")],
                                  args=TrainingArguments(...), train_dataset=...)

What is trained (optimised, wrapped in DDP under `torchrun`) is the student plus the levels' method
modules, diffkd's `Distiller` (`trainer.distiller`); `trainer.model` stays the student, so evaluation,
`save_model` and `push_to_hub` see the student alone. Checkpoints also hold the Distiller's state
without the student (`diffkd_distiller.pt`: method modules, automatic loss weights) so
`train(resume_from_checkpoint=...)` resumes them. FSDP, DeepSpeed and
DataParallel are refused in one line (not supported; nothing here can test them).
"""
from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:
    import transformers
    from transformers.utils import is_datasets_available
except ImportError:  # the extra is optional
    raise ImportError("diffkd.integrations.transformers needs transformers: pip install diffkd[hf]") from None
if not hasattr(transformers.Trainer, "loss_is_scaled_for_ga"):  # how the Trainer scales a loss under accumulation
    raise ImportError(f"diffkd.integrations.transformers needs transformers >= 5.19, found {transformers.__version__}: "
                      "pip install -U 'transformers>=5.19'")

from .. import __version__
from ..atomic import save_atomic
from ..models.weights import read_state_file
from ..distiller import Distiller, DistillOutput, Level, check_separate
from .checks import check_teacher_and_levels, warn_if_teacher_trainable

__all__ = ["DistillationTrainer", "INDEX_COLUMN", "DISTILLER_FILE"]

DISTILLER_FILE = "diffkd_distiller.pt"  # in each Trainer checkpoint folder: the Distiller's state without the student
DISTILLER_FORMAT = 1  # that file's layout: {"format", "diffkd_version", "state"}
INDEX_COLUMN = "indices"  # the batch column with each sample's dataset index (CRD's memory bank)
_PROBE_ITEMS = 2  # dataset items collated into the probe's example batch


class DistillationTrainer(transformers.Trainer):
    """A `transformers.Trainer` whose model (`model=`) is the student, distilled from `teacher` on `levels`.

    The loss is the student's own loss (the model's `loss`, or `compute_loss_func` / label smoothing as
    the Trainer does) plus the levels' weighted terms; it is the Distiller's task loss, so levels with
    `weight="auto"` calibrate against it. Each term is logged with the Trainer's loss ("task_loss",
    "distill/<term>", and "auto_weight/<level>" for automatic weights).
    `example_input`: a batch as the data collator makes it, to probe the taps; default the first
    items of `train_dataset`. The teacher is called with the batch's model inputs (the label columns
    and `indices` left out), or with `teacher_inputs(batch)` when given (e.g. `lambda b:
    b["pixel_values"]` for a plain torch teacher). A method that needs each sample's dataset index
    (CRD) reads it from the batch's "indices" column. Losses are per-batch means; with gradient
    accumulation the Trainer divides them by the number of micro-batches.
    """

    loss_is_scaled_for_ga = False  # per-batch means, see the class docstring

    def __init__(self, model: nn.Module | None = None, args: transformers.TrainingArguments | None = None,
                 *trainer_args: Any, teacher: nn.Module | None = None, levels: Sequence[Level] | None = None,
                 example_input: Mapping[str, Any] | None = None,
                 teacher_inputs: Callable[[dict[str, Any]], Any] | None = None, **trainer_kwargs: Any):
        check_teacher_and_levels(teacher, levels, "DistillationTrainer")
        if model is None:
            raise ValueError("DistillationTrainer needs model=... (the student); model_init is not supported")
        super().__init__(model, args, *trainer_args, **trainer_kwargs)
        self._refuse_unsupported_parallelism()
        check_separate(teacher, model)
        warn_if_teacher_trainable(teacher, "DistillationTrainer")
        self.teacher_inputs = teacher_inputs
        self._dropped_columns: list[str] = []  # the dataset's columns that remove_unused_columns drops
        from_dataset = example_input is None
        batch = self._example_batch() if from_dataset else self._prepare_inputs(dict(example_input))
        student_batch, _, _, teacher_batch = self._split(batch)
        probe_batch = {k: v for k, v in student_batch.items() if k not in self._label_keys}
        if teacher_inputs is None:
            _check_takes_keywords(teacher, teacher_batch)
        size = len(self.train_dataset) if hasattr(self.train_dataset, "__len__") else None
        self.distiller = Distiller(teacher, model, levels, example_input=probe_batch, dataset_size=size,
                                   task_loss=self._task_loss, teacher_example_input=teacher_batch)
        self.distiller.to(_device_of(model))
        if from_dataset:
            self._require_columns(batch)
        self._term_sums: dict[str, Tensor] = {}
        self._term_batches = 0

    # ----------------------------------------------------------------------------- setup
    def _refuse_unsupported_parallelism(self) -> None:
        """FSDP and DeepSpeed shard or own the model and its optimizer; DataParallel replicates it in threads."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or self.args.fsdp:
            raise ValueError("DistillationTrainer supports one device and DDP (torchrun / accelerate launch); "
                             "FSDP and DeepSpeed are not supported: drop the fsdp / deepspeed arguments")
        if self.args.n_gpu > 1:
            raise ValueError("DistillationTrainer does not support DataParallel (several GPUs in one process): "
                             "launch one process per GPU with torchrun --nproc_per_node=N")

    @property
    def _label_keys(self) -> list[str]:
        """The batch keys that hold labels: the Trainer's label_names, else "labels"."""
        return list(self.label_names) or ["labels"]

    def _example_batch(self) -> dict[str, Any]:
        """The first items of train_dataset, columns removed and collated as a training batch is."""
        dataset = self.train_dataset
        if dataset is None:
            raise ValueError("DistillationTrainer needs train_dataset=... or example_input=... (a batch as the "
                             "data collator makes it) to probe the taps")
        collator, columns = self.data_collator, None
        if _is_datasets_dataset(dataset):  # the Trainer removes a datasets.Dataset's columns, else the collator does
            columns = set(dataset.column_names)
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
            items = list(itertools.islice(iter(dataset), _PROBE_ITEMS))
        else:
            items = [dataset[i] for i in range(min(_PROBE_ITEMS, len(dataset)))]
        if not items:
            raise ValueError("DistillationTrainer: train_dataset is empty; there is nothing to probe the taps with")
        batch = collator(items)
        if columns is None and isinstance(items[0], Mapping):
            columns = set(items[0])
        renamed = {"label", "label_ids"} if "labels" in batch else set()  # the default collator renames them
        self._dropped_columns = sorted((columns or set()) - set(batch) - renamed)  # what remove_unused_columns drops
        return self._prepare_inputs(batch)

    def _split(self, batch: Mapping[str, Any]) -> tuple[dict[str, Any], Tensor | None, Tensor | None, Any]:
        """(student inputs, targets, indices, teacher inputs) of a collated batch."""
        student = dict(batch)
        indices = student.pop(INDEX_COLUMN, None)
        targets = next((student[k] for k in self._label_keys if k in student), None)
        if self.teacher_inputs is not None:
            teacher = self.teacher_inputs(dict(student))
        else:
            teacher = {k: v for k, v in student.items() if k not in self._label_keys}
        return student, targets, indices, teacher

    def _require_columns(self, batch: Mapping[str, Any]) -> None:
        """The batch holds what the levels' methods read: labels for those that need targets, "indices" for CRD."""
        needs = [(lv.name, self._label_keys[0], "targets") for lv in self.distiller.levels
                 if self.distiller.methods[lv.name].needs_targets]
        needs += [(name, INDEX_COLUMN, "dataset indices") for name, m in self.distiller.methods.items() if m.needs_indices]
        for level, column, what in needs:
            if column in batch:
                continue
            self._set_signature_columns_if_needed()
            kept = [c for c in dict.fromkeys(self._signature_columns) if c not in ("self", "kwargs")]
            if column == INDEX_COLUMN and self.args.remove_unused_columns and column not in kept:
                why = (f"TrainingArguments(remove_unused_columns=True) drops it (it keeps the student's forward arguments "
                       f"and labels: {', '.join(kept)}); pass remove_unused_columns=False")
            elif column == INDEX_COLUMN:
                why = f"add an {column!r} column (each item's index in train_dataset) to the dataset"
            elif self._dropped_columns:
                why = (f"TrainingArguments(remove_unused_columns=True) dropped the dataset's column(s) "
                       f"{', '.join(map(repr, self._dropped_columns))} (not arguments of the student's forward); "
                       f"name the label column {column!r}")
            else:
                why = f"name the dataset's label column {column!r}"
            raise ValueError(f"level {level!r} needs the batch's {what} in column {column!r}, which the batch lacks: {why}")

    # ----------------------------------------------------------------------------- training
    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The Trainer's optimizer (and so its scheduler) over the student and the method modules."""
        student = self.model
        self.model = self.distiller  # the Trainer builds its parameter groups from self.model
        try:
            optimizer = super().create_optimizer(*args, **kwargs)
        finally:
            self.model = student
        covered = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if any(id(p) not in covered for p in self.distiller.methods.parameters() if p.requires_grad):
            raise ValueError("the optimizer given to DistillationTrainer does not cover the method modules: let the "
                             "trainer build it (optimizer_cls_and_kwargs=... for another class) or build it over "
                             "trainer.distiller.trainable_parameters()")
        return optimizer

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader: Any = None) -> nn.Module:
        """For training, the Distiller (student + method modules; under DDP, wrapped whole); else the Trainer's way."""
        if not training or model is not self.model:
            return super()._wrap_model(model, training, dataloader)
        if self.args.parallel_mode == transformers.training_args.ParallelMode.DISTRIBUTED:
            handler = self.accelerator.ddp_handler
            device = _device_of(self.model)
            return nn.parallel.DistributedDataParallel(
                self.distiller, device_ids=[device.index] if device.type == "cuda" else None,
                **(handler.to_kwargs() if handler is not None else {}))
        return self.distiller

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Tensor | tuple[Tensor, Any]:
        """Training: the student's own loss plus the levels' terms; evaluation: the Trainer's, on the student alone."""
        if self.accelerator.unwrap_model(model) is not self.distiller:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._require_columns(inputs)
        student_inputs, targets, indices, teacher_inputs = self._split(inputs)
        if self.label_smoother is not None or self.compute_loss_func is not None:
            for key in self._label_keys:  # the loss is computed from the outputs, as the Trainer does
                student_inputs.pop(key, None)
        progress = (self.state.epoch or 0.0, max(1, math.ceil(self.state.num_train_epochs or 1)))
        with self.accelerator.autocast():  # the Distiller computes the task loss with _task_loss
            out: DistillOutput = model(student_inputs, targets, indices, teacher_inputs=teacher_inputs, progress=progress)
        self._add_terms({"task_loss": out.task_loss, **{f"distill/{k}": v for k, v in out.losses.items()}})
        loss = out.total
        return (loss, out.student) if return_outputs else loss

    def _task_loss(self, outputs: Any, labels: Tensor | None) -> Tensor:
        """The student's own loss, as the Trainer computes it: compute_loss_func, label smoothing, or the model's."""
        if self.compute_loss_func is not None:
            return self.compute_loss_func(outputs, labels, num_items_in_batch=None)
        if self.label_smoother is not None:
            return self.label_smoother(outputs, labels)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else (
            outputs[0] if isinstance(outputs, (tuple, list)) and outputs else None)
        if not isinstance(loss, Tensor):
            raise ValueError(f"the student returned no loss ({type(outputs).__name__} without 'loss'): give the batch "
                             f"its labels as {self._label_keys[0]!r}, or pass compute_loss_func=...")
        return loss

    # ----------------------------------------------------------------------------- logging
    def _add_terms(self, terms: Mapping[str, Tensor]) -> None:
        """Sum each term (detached, on its device) until the next training log."""
        for name, value in terms.items():
            value = value.detach().float()
            self._term_sums[name] = self._term_sums[name] + value if name in self._term_sums else value
        self._term_batches += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Training logs (those with "loss") also get each term's mean since the last log, over all processes,
        and the automatic weights as they stand (a running estimate while a calibration window is open)."""
        if "loss" in logs and self._term_batches:
            names = sorted(self._term_sums)
            means = torch.stack([self._term_sums[n] for n in names]) / self._term_batches
            means = self.accelerator.reduce(means, reduction="mean")
            logs.update(dict(zip(names, means.tolist())))
            logs.update({f"auto_weight/{k}": v for k, v in self.distiller.auto_weights().items()})  # as they stand
            self._term_sums, self._term_batches = {}, 0
        super().log(logs, *args, **kwargs)

    # ----------------------------------------------------------------------------- saving, resuming
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The student alone, in Hugging Face format; a checkpoint (an internal call) also gets the rest of the
        Distiller (method modules, automatic weights)."""
        super().save_model(output_dir, _internal_call)
        if _internal_call and self.args.should_save:
            state = {k: v for k, v in self.distiller.state_dict().items() if not k.startswith("student.")}
            saved = {"format": DISTILLER_FORMAT, "diffkd_version": __version__, "state": state}
            save_atomic(saved, Path(output_dir or self.args.output_dir) / DISTILLER_FILE, overwrite=True)  # the Trainer's

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The student's weights as the Trainer loads them, then the rest of the Distiller."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        if isinstance(self.model, transformers.PreTrainedModel):  # the Trainer's own load skips the renames that
            # from_pretrained applies (transformers 5.25 leaves a ViT's layers unloaded, with a warning): load strictly
            saved = type(self.model).from_pretrained(resume_from_checkpoint, config=self.model.config)
            self.model.load_state_dict(saved.state_dict())
        path = Path(resume_from_checkpoint) / DISTILLER_FILE
        saved = read_state_file(path, DISTILLER_FORMAT, "resume_from_checkpoint needs a checkpoint written by "
                                                        "DistillationTrainer (it holds the method modules' state)")
        state = saved["state"]
        missing, unexpected = self.distiller.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("student.")]
        if missing or unexpected:
            raise ValueError(f"{path} does not fit these levels (missing {missing[:3]}, unexpected {unexpected[:3]}): "
                             "resume with the levels the checkpoint was trained with")


def _is_datasets_dataset(dataset: Any) -> bool:
    """Whether `dataset` is a Hugging Face `datasets.Dataset` (the library imported only when installed)."""
    if not is_datasets_available():
        return False
    import datasets

    return isinstance(dataset, datasets.Dataset)


def _check_takes_keywords(teacher: nn.Module, batch: Mapping[str, Any]) -> None:
    """The teacher's forward takes the batch's model inputs as keywords, or the error says to map them."""
    params = inspect.signature(teacher.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    missing = [k for k in batch if k not in params]
    if missing:
        raise ValueError(f"the teacher's forward takes no {missing[0]!r} (the batch's model inputs: {', '.join(batch)}): "
                         f"pass teacher_inputs=lambda batch: ... giving what it takes, e.g. batch[{next(iter(batch))!r}]")


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's first parameter lives (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
