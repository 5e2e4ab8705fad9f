"""The training loop shared by `diffkd train` and `diffkd distill`: setup, epochs, checkpoints, resume.

`run(cfg, mode=...)` is the Python entry point. One epoch = train on every batch (lr set per
iteration, NaN/inf check, optimizer step, EMA), evaluate on the test split, write last.pt (and
best.pt when the task's main metric improves), report. The data order, the augmentation and every
RNG follow the seed and the epoch, and last.pt holds all state, so a resumed run is bit-identical
to an uninterrupted one on CPU.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from ..config import Config, ConfigError, config_to_dict, save_config
from ..data import build_loader
from ..tasks import Task, build_task
from . import distributed, rng
from .checkpoint import FORMAT, VERSION, load_checkpoint, serialize, write_atomic
from .ema import EMA
from .errors import CheckpointError, NonFiniteLossError
from .evaluation import evaluate, test_loader
from .learner import LEARNERS, Learner, StepOutput
from .optim import build_optimizer
from .precision import MixedPrecision
from .reporting import Reporter, progress_bar
from .rundir import check_run_dir, prepare_run_dir
from .schedules import LRSchedule, Timeline

log = logging.getLogger("diffkd")

# Config keys a resumed run may change; anything else would silently make it a different run.
RESUMABLE_CHANGES = frozenset({
    "train.epochs", "train.device", "train.progress", "train.log_every", "data.root", "data.download",
    "data.workers", "data.eval_batch_size", "output.dir", "output.tensorboard",
})  # fmt: skip


@dataclass
class RunResult:
    """What a finished run reports to Python callers (the demo, benchmarks)."""

    run_dir: Path
    best_top1: float
    final_top1: float
    train_seconds: float
    extra_parameters: int
    history: list[dict[str, Any]]


@dataclass
class Session:
    """Everything the epochs share, and the progress that last.pt records."""

    cfg: Config
    mode: str
    task: Task
    ctx: distributed.Context
    learner: Learner
    call: Callable[..., Any]
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    precision: MixedPrecision
    ema: EMA | None
    train_set: Dataset
    sampler: DistributedSampler
    batch_size: int
    test_loader: Any
    run_dir: Path
    reporter: Reporter | None = None
    epoch: int = 0
    step: int = 0
    best: float = -math.inf
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def main_key(self) -> str:
        return f"test_{self.task.main_metric}"


def run(
    cfg: Config,
    *,
    mode: str = "train",
    resume: bool = False,
    force: bool = False,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train (mode "train": task loss only) or distil (mode "distill") as cfg says; returns the run's summary.

    resume continues output.dir from its last.pt; force moves an existing run directory aside first.
    on_epoch_end receives each epoch's metrics row after its checkpoint is written.
    """
    if mode not in LEARNERS:
        raise ValueError(f"mode must be one of {', '.join(LEARNERS)}, got {mode!r}")
    ctx = distributed.setup(cfg.train.device)
    try:
        session = _setup(cfg, mode, ctx, resume=resume, force=force)
        return _train(session, on_epoch_end)
    finally:
        distributed.teardown(ctx)


def _per_rank_batch(batch_size: int, world_size: int) -> int:
    """data.batch_size is the global batch; each process takes an equal share."""
    if batch_size % world_size:
        raise ConfigError(f"data.batch_size={batch_size} must be divisible by the process count {world_size}")
    return batch_size // world_size


def _wrap(module: torch.nn.Module, ctx: distributed.Context, compile_: bool) -> Callable[..., Any]:
    """The callable the loop runs: the module, in DDP when distributed, compiled when asked."""
    call: Any = module
    if ctx.distributed:
        call = DistributedDataParallel(module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return torch.compile(call) if compile_ else call


def _setup(cfg: Config, mode: str, ctx: distributed.Context, *, resume: bool, force: bool) -> Session:
    """Build everything first (so config mistakes fail before any file is touched), then the run dir, then resume."""
    task = build_task(cfg)
    batch_size = _per_rank_batch(cfg.data.batch_size, ctx.world_size)
    precision = MixedPrecision(cfg.train.amp, ctx.device)
    rng.seed_everything(cfg.train.seed)  # identical initial weights in every process
    learner = LEARNERS[mode](cfg, task)
    learner.module.to(ctx.device)
    rng.seed_everything(cfg.train.seed + ctx.rank)  # distinct noise and augmentation per process
    optimizer = build_optimizer(learner.trainable_parameters(), cfg.optim)
    train_set = task.build_dataset("train", limit=cfg.data.limit_train)
    sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.train.seed)
    steps = len(sampler) // batch_size
    if steps == 0:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than the training set ({len(train_set)} items)")
    schedule = LRSchedule(cfg.schedule, cfg.optim.lr, Timeline(steps, cfg.train.epochs))
    ema = EMA(learner.student, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    eval_batch = max(1, (cfg.data.eval_batch_size or cfg.data.batch_size) // ctx.world_size)
    tests = test_loader(task, ctx, eval_batch, cfg.data.workers, cfg.data.limit_test)
    call = _wrap(learner.module, ctx, cfg.train.compile)
    run_dir = Path(cfg.output.dir).expanduser()
    session = Session(
        cfg, mode, task, ctx, learner, call, optimizer, schedule, precision, ema, train_set, sampler, batch_size, tests, run_dir
    )
    check_run_dir(run_dir, resume=resume, force=force)
    ctx.barrier()
    if ctx.is_main:
        moved = prepare_run_dir(run_dir, resume=resume, force=force)
        if moved is not None:
            log.warning("--force: moved the previous run %s aside to %s", run_dir, moved)
        save_config(cfg, run_dir / "config.yaml")
    ctx.barrier()
    if resume:
        _restore(session, run_dir / "last.pt")
    session.reporter = Reporter(run_dir, enabled=ctx.is_main, tensorboard=cfg.output.tensorboard)
    if ctx.is_main:
        log.info(
            "%s %s: %d train / %d test items, %d steps/epoch x %d epochs, %d process(es) on %s, run dir %s",
            mode, cfg.task, len(train_set), len(tests.dataset), steps, cfg.train.epochs, ctx.world_size, ctx.device, run_dir,
        )  # fmt: skip
    return session


def _config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two plain configs (sections compared key by key)."""
    changes = []
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section), current.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            changes += [f"{section}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            changes.append(section)
    return changes


def _restore(s: Session, path: Path) -> None:
    """Load last.pt into every stateful part; refuse a checkpoint of another mode or an incompatible config."""
    ckpt = load_checkpoint(path)
    if ckpt["mode"] != s.mode:
        raise CheckpointError(f"{path} is from `diffkd {ckpt['mode']}`, not `diffkd {s.mode}`")
    changed = [k for k in _config_changes(ckpt["config"], config_to_dict(s.cfg)) if k not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(
            f"cannot resume {path.parent}: the config differs from the run's in {', '.join(changed)}; resume with "
            f"the same config (only {', '.join(sorted(RESUMABLE_CHANGES))} may change), or start afresh with --force"
        )
    s.learner.module.load_state_dict(ckpt["model"])
    s.optimizer.load_state_dict(ckpt["optimizer"])
    s.precision.load_state_dict(ckpt["scaler"])
    if s.ema is not None:
        s.ema.load_state_dict(ckpt["ema"])
    s.epoch, s.step, s.best, s.history = ckpt["epoch"], ckpt["step"], ckpt["best"], list(ckpt["history"])
    states = ckpt["rng"]
    if len(states) == s.ctx.world_size:
        rng.restore(states[s.ctx.rank])
    else:
        log.warning("resuming with %d processes (saved with %d): RNG streams reseeded", s.ctx.world_size, len(states))
        rng.seed_everything(s.cfg.train.seed + s.ctx.rank + 7919 * s.epoch)
    if s.ctx.is_main:
        log.info("resumed %s at epoch %d (global step %d)", path, s.epoch, s.step)


def _train(s: Session, on_epoch_end: Callable[[dict[str, Any]], None] | None) -> RunResult:
    """Run the remaining epochs; returns the summary of the whole run (resumed epochs included)."""
    for epoch in range(s.epoch, s.cfg.train.epochs):
        record = _run_epoch(s, epoch)
        s.history.append(record)
        s.epoch = epoch + 1
        improved = record[s.main_key] > s.best
        s.best = max(s.best, record[s.main_key]) if improved else s.best
        _save(s, improved)
        s.reporter.epoch(s.history, s.cfg.train.epochs)
        if on_epoch_end is not None:
            on_epoch_end(dict(record))
    s.reporter.finish(s.history)
    values = [r[s.main_key] for r in s.history]
    return RunResult(
        run_dir=s.run_dir,
        best_top1=max(values, default=math.nan),
        final_top1=values[-1] if values else math.nan,
        train_seconds=sum(r["epoch_seconds"] for r in s.history),
        extra_parameters=s.learner.extra_parameters,
        history=[dict(r) for r in s.history],
    )


def _run_epoch(s: Session, epoch: int) -> dict[str, Any]:
    """Train one epoch, evaluate, and return its metrics row."""
    start = time.perf_counter()
    s.learner.set_epoch(epoch, s.cfg.train.epochs)
    s.sampler.set_epoch(epoch)
    loader = build_loader(
        s.train_set, s.batch_size, train=True, workers=s.cfg.data.workers, sampler=s.sampler, seed=s.cfg.train.seed + epoch
    )
    train, stats, images, train_seconds = _train_epoch(s, loader, epoch)
    model = s.ema.module if s.ema is not None else s.learner.student
    s.ctx.broadcast_buffers(model)
    test = evaluate(model, s.test_loader, s.task, s.ctx, s.precision)
    return {
        "epoch": epoch + 1,
        "lr": s.schedule.lr(s.step - 1),
        **train,
        **{f"test_{k}": v for k, v in test.items()},
        "epoch_seconds": time.perf_counter() - start,
        "images_per_s": images / max(train_seconds, 1e-9),
        **stats,
    }


def _check_finite(out: StepOutput, epoch: int, step: int, s: Session) -> None:
    """Stop on a NaN/inf loss (in any process), naming each bad term, the global step and the epoch."""
    names = [*out.terms, "total"]
    values = torch.stack([*(t.detach().float().reshape(()) for t in out.terms.values()), out.total.detach().float()])
    finite = torch.isfinite(values)
    if s.ctx.all_true(bool(finite.all())):
        return
    bad = [f"{n} = {v}" for n, v, ok in zip(names, values.tolist(), finite.tolist()) if not ok] or ["(in another process)"]
    kept = f"{s.run_dir / 'last.pt'} (epoch {s.epoch}) is left untouched" if s.epoch else "no checkpoint was written"
    raise NonFiniteLossError(
        f"non-finite loss at epoch {epoch + 1}, global step {step}: {', '.join(bad)}; training stopped and {kept}. "
        f"Lower optim.lr, set train.clip_grad_norm, or check the inputs"
    )


def _train_epoch(s: Session, loader: Any, epoch: int) -> tuple[dict[str, float], dict[str, float], int, float]:
    """One pass over the training data; returns (mean losses and train metrics, mean method stats, images, seconds)."""
    cfg, ctx = s.cfg, s.ctx
    s.learner.module.train()
    params = [p for group in s.optimizer.param_groups for p in group["params"]]
    metrics = s.task.metrics()
    sums: torch.Tensor | None = None  # per term: sum of value x batch size, then the sample count
    stats: dict[str, torch.Tensor] = {}
    names: list[str] = []
    steps = 0
    bar = progress_bar(loader, total=len(loader), desc=f"epoch {epoch + 1}/{cfg.train.epochs}", enabled=cfg.train.progress and ctx.is_main)
    start = time.perf_counter()
    for batch in bar:
        inputs, targets = s.task.to_device(batch, ctx.device)
        s.schedule.apply(s.optimizer, s.step)
        with s.precision.autocast():
            out = s.learner.compute(s.call, inputs, targets)
        _check_finite(out, epoch, s.step, s)
        s.optimizer.zero_grad(set_to_none=True)
        s.precision.backward_and_step(out.total, s.optimizer, params, cfg.train.clip_grad_norm)
        if s.ema is not None:
            s.ema.update(s.learner.student)
        n = s.task.batch_size(inputs)
        names = ["train_loss", *(f"loss_{k}" for k in out.terms)]
        row = torch.stack([out.total.detach(), *(t.detach().reshape(()) for t in out.terms.values())]).double() * n
        row = torch.cat([row, row.new_tensor([n])])
        sums = row if sums is None else sums + row
        metrics.update(out.outputs, targets)
        for key, value in out.stats.items():
            value = value.detach().double().mean() if torch.is_tensor(value) else torch.tensor(float(value), dtype=torch.float64)
            stats[key] = stats.get(key, 0) + value.to(ctx.device)
        s.step += 1
        steps += 1
        if s.step % cfg.train.log_every == 0:
            _log_step(s, bar, sums, metrics, start)
    seconds = time.perf_counter() - start
    if sums is None:
        raise ConfigError("the training loader gave no batch")
    totals = ctx.sum(sums).tolist()
    result = {name: total / totals[-1] for name, total in zip(names, totals[:-1])}
    result.update({f"train_{k}": v for k, v in metrics.compute(ctx.sum).items()})
    means = ctx.sum(torch.stack(list(stats.values())) / steps) / ctx.world_size if stats else torch.zeros(0)
    return result, dict(zip(stats, means.tolist())), int(totals[-1]), seconds


def _log_step(s: Session, bar: Any, sums: torch.Tensor, metrics: Any, start: float) -> None:
    """Every log_every steps: the progress bar's loss/accuracy/images-per-second and TensorBoard scalars."""
    values = sums.tolist()
    loss = values[0] / values[-1]
    accuracy = metrics.compute(lambda t: t)[s.task.main_metric]
    speed = values[-1] * s.ctx.world_size / max(time.perf_counter() - start, 1e-9)
    bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.2f}", img_s=f"{speed:.0f}", refresh=False)
    s.reporter.scalars(s.step, {"step/train_loss": loss, "step/lr": s.optimizer.param_groups[0]["lr"]})


def _save(s: Session, improved: bool) -> None:
    """Write last.pt (and best.pt if improved) from rank 0, with every process's RNG state."""
    states = s.ctx.gather(rng.capture())
    if not s.ctx.is_main:
        return
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "mode": s.mode,
        "config": config_to_dict(s.cfg),
        "epoch": s.epoch,
        "step": s.step,
        "best": s.best,
        "main_metric": s.task.main_metric,
        "model": s.learner.module.state_dict(),
        "optimizer": s.optimizer.state_dict(),
        "scaler": s.precision.state_dict(),
        "ema": s.ema.state_dict() if s.ema is not None else None,
        "rng": states,
        "history": s.history,
    }
    data = serialize(ckpt)
    write_atomic(data, s.run_dir / "last.pt")
    if improved:
        write_atomic(data, s.run_dir / "best.pt")
