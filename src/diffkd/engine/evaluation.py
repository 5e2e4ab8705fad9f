"""Evaluation: a model's task metrics on a loader (sharded over processes), and `diffkd eval` on a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import config_from_dict
from ..data import IndexedCollate, WithIndices, build_loader
from ..taps import call_model
from ..tasks import Task, build_task
from .checkpoint import evaluated_weights, find_checkpoint, load_checkpoint, load_into, saved_model_name
from .distributed import Context, ShardSampler, resolve_device
from .layout import inputs_to_channels_last
from .precision import MixedPrecision


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    task: Task,
    ctx: Context,
    precision: MixedPrecision,
    *,
    channels_last: bool = False,
) -> dict[str, float]:
    """The task's metrics over every process's shard of the loader; restores the model's mode.

    channels_last lays 4-D input batches out channels-last (as train.channels_last does in training).
    """
    was_training = model.training
    model.eval()
    metrics = task.metrics()
    for batch in loader:
        inputs, targets = task.to_device(batch, ctx.device)
        if channels_last:
            inputs = inputs_to_channels_last(inputs)
        with precision.autocast():
            outputs = call_model(model, inputs)
        metrics.update(outputs, targets)
    model.train(was_training)
    return metrics.compute(ctx.sum)


def task_loader(task: Task, dataset: Dataset, batch_size: int, **options: Any) -> DataLoader:
    """`diffkd.data.build_loader` with the task's collate function (detection batches are lists).

    A `WithIndices` dataset gives (task batch, (B,) dataset indices) batches.
    """
    loader = build_loader(dataset, batch_size, **options)
    loader.collate_fn = IndexedCollate(task.collate_fn) if isinstance(dataset, WithIndices) else task.collate_fn
    return loader


def test_loader(task: Task, ctx: Context, batch_size: int, workers: int, limit: int | None) -> DataLoader:
    """The test split, sharded over processes without padding, in order."""
    dataset = task.build_dataset("test", limit=limit)
    sampler = ShardSampler(len(dataset), ctx.rank, ctx.world_size)
    return task_loader(task, dataset, batch_size, train=False, workers=workers, sampler=sampler, drop_last=False)


def evaluate_checkpoint(
    path: str | Path,
    *,
    which: str = "best",
    device: str = "auto",
    limit: int | None = None,
    batch_size: int | None = None,
    data_root: str | None = None,
) -> dict[str, Any]:
    """The task's test metrics (top-1/top-5 for classification) of a run's evaluated weights.

    Uses the full test split (or `limit` evenly spaced items); returns {"metrics", "main_metric",
    "checkpoint", "epoch", "images", "classes"} (classes: the class names where the data names them,
    checked against the run's, else None).
    """
    for name, value in (("batch_size", batch_size), ("limit", limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    file = find_checkpoint(path, which)
    ckpt = load_checkpoint(file)
    cfg = config_from_dict(ckpt["config"])
    if data_root is not None:
        cfg.data.root = data_root
    task = build_task(cfg)
    task.check_run(file.parent)
    spec = cfg.model if ckpt["mode"] == "train" else cfg.student
    model = task.build_model(spec)
    load_into(model, evaluated_weights(ckpt), file, saved_model_name(ckpt), f"model {spec.name!r}")
    ctx = Context(device=resolve_device(device))
    model.to(ctx.device)
    size = batch_size or cfg.data.eval_batch_size or cfg.data.batch_size
    loader = test_loader(task, ctx, size, cfg.data.workers, limit)
    metrics = evaluate(model, loader, task, ctx, MixedPrecision("none", ctx.device))
    return {
        "metrics": metrics,
        "main_metric": task.main_metric,
        "checkpoint": str(file),
        "epoch": ckpt["epoch"],
        "images": len(loader.dataset),
        "classes": task.class_names,
    }
