"""The training loop shared by `diffkd train` and `diffkd distill`: setup, epochs, checkpoints, resume.

`run(cfg, mode=...)` is the Python entry point. One epoch = train on every batch (lr set per
iteration, NaN/inf check, optimizer step, EMA), evaluate on the test split, write last.pt (and
best.pt, without the resume state, when the task's main metric improves), report. The data order,
the augmentation and every RNG follow the seed and the epoch, and last.pt holds all state, so a
resumed run is bit-identical to an uninterrupted one on CPU.
"""

from __future__ import annotations

import copy
import errno
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from .. import __version__
from ..config import Config, ConfigError, config_from_dict, config_to_dict, save_config
from ..data import WithIndices
from ..tasks import Metrics, Task, build_task
from . import distributed, layout, rng
from ..atomic import serialize, write_atomic
from .checkpoint import FORMAT, VERSION, load_checkpoint, load_into, saved_model_name
from .ema import EMA
from .errors import CheckpointError, NonFiniteLossError, RunInterrupted, RunWriteError
from .evaluation import evaluate, task_loader, test_loader
from .identity import check_identity, dataset_identity, record_identity
from .interrupts import interrupts_held
from .learner import LEARNERS, Learner, StepOutput
from .meters import LossMeter
from .optim import build_optimizer
from .precision import MixedPrecision
from .reporting import Reporter, progress_bar
from .rundir import check_run_dir, prepare_run_dir
from .runlock import RunLock, check_unlocked, lock_path
from .schedules import LRSchedule, Timeline

log = logging.getLogger("diffkd")

# Config keys a resumed run may change; anything else would silently make it a different run. The data
# and the teacher may move (data.root, teacher.checkpoint and its file's sha256), as the run's identity
# (identity.py: the teacher's weights, the training set's files) is checked instead.
RESUMABLE_CHANGES = frozenset({
    "train.epochs", "train.device", "train.progress", "train.log_every", "data.root", "data.download",
    "data.workers", "data.eval_batch_size", "output.dir", "output.tensorboard", "teacher.checkpoint", "teacher.sha256",
})  # fmt: skip
# What best.pt leaves out of last.pt: the resume state, which eval, export, visualize and a teacher never read.
RESUME_ONLY = ("optimizer", "scaler", "rng")


@dataclass
class RunResult:
    """What a finished run reports to Python callers (the demo, benchmarks).

    best_top1 / final_top1 hold the task's main metric (`main_metric`: top1 for classification).
    """

    run_dir: Path
    best_top1: float
    final_top1: float
    train_seconds: float
    extra_parameters: int
    history: list[dict[str, Any]]
    main_metric: str = "top1"


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
    identity: dict[str, Any]  # what the run trains on (identity.py), recorded in last.pt and identity.json
    sampler: DistributedSampler
    batch_size: int
    test_loader: Any
    run_dir: Path
    reporter: Reporter | None = None
    epoch: int = 0
    step: int = 0
    best: float = -math.inf
    history: list[dict[str, Any]] = field(default_factory=list)
    saved_epoch: int | None = None  # the epoch last.pt holds, once this run wrote or resumed one

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

    resume continues output.dir from its last.pt (or starts afresh, saying so, where there is none);
    force moves an existing run directory aside first. on_epoch_end receives each epoch's metrics row
    after its checkpoint is written. An interrupt (Ctrl-C) leaves as RunInterrupted, a KeyboardInterrupt
    whose message says what was saved last.
    """
    if mode not in LEARNERS:
        raise ValueError(f"mode must be one of {', '.join(LEARNERS)}, got {mode!r}")
    ctx = distributed.setup(cfg.train.device)
    session = None
    run_dir = Path(cfg.output.dir).expanduser()
    lock = RunLock(run_dir) if ctx.is_main else None  # the process that writes the run
    try:
        session = _setup(cfg, mode, ctx, lock, resume=resume, force=force)
        return _train(session, on_epoch_end)
    except KeyboardInterrupt:
        raise RunInterrupted(_what_was_saved(session, run_dir)) from None
    except OSError as err:
        if not _is_write_failure(err, run_dir):
            raise
        why = err.strerror or type(err).__name__
        raise RunWriteError(f"cannot write {err.filename} ({why}); {_what_was_saved(session, run_dir)}") from None
    finally:
        if lock is not None:
            lock.release()
        distributed.teardown(ctx)


WRITE_FAILURES = frozenset({errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT})  # whichever file is written


def _is_write_failure(err: OSError, run_dir: Path) -> bool:
    """Whether err is the failure to write a file of the run (its directory, its lock), not to read the data."""
    if err.filename is None:
        return False
    if err.errno in WRITE_FAILURES:
        return True
    path = Path(os.fsdecode(err.filename)).resolve()
    ours = run_dir.resolve()
    return err.errno in (errno.EACCES, errno.EPERM) and (path == lock_path(run_dir) or ours == path or ours in path.parents)


def _what_was_saved(s: Session | None, run_dir: Path) -> str:
    """For an interrupted run: the checkpoint it can go on from, and how; or that there is none."""
    last = run_dir / "last.pt"
    if s is not None and s.saved_epoch is not None:
        return (
            f"last saved epoch {s.saved_epoch} in {last}; rerun the same command with --resume to continue from there"
        )
    if last.is_file():
        return f"stopped before training started; {last} is unchanged and --resume continues from it"
    return f"nothing was saved yet (no checkpoint in {run_dir}); rerunning the same command starts the run afresh"


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


def _setup(cfg: Config, mode: str, ctx: distributed.Context, lock: RunLock | None, *, resume: bool,
           force: bool) -> Session:
    """Build everything (so config mistakes fail before any file is touched), then lock and open the run dir
    and resume. A directory another live run holds is refused even with --force: moving it would break that run."""
    session = _build(cfg, mode, ctx)
    run_dir = session.run_dir
    check_unlocked(run_dir)
    resuming = check_run_dir(run_dir, resume=resume, force=force)
    ctx.barrier()
    if lock is not None:
        lock.acquire()
        if resume and not resuming:
            log.info("--resume: nothing to resume in %s (no last.pt); starting the run afresh", run_dir)
        prepare_run_dir(run_dir, resume=resuming, force=force)  # logs what it moved aside or removed
    ctx.barrier()
    if resuming:
        session.task.check_run(run_dir)
        _restore(session, run_dir / "last.pt")
    if ctx.is_main:
        save_config(session.cfg, run_dir / "config.yaml")
        session.task.record_run(run_dir)
    session.reporter = Reporter(
        run_dir, enabled=ctx.is_main, tensorboard=cfg.output.tensorboard, main_metric=session.task.main_metric
    )
    if ctx.is_main:
        sizes = f"{len(session.train_set)} train / {len(session.test_loader.dataset)} test items"
        steps = f"{session.schedule.timeline.steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs"
        where = f"{ctx.world_size} process(es) on {ctx.device}"
        log.info("%s %s: %s, %s, %s, run dir %s", mode, cfg.task, sizes, steps, where, run_dir)
        for line in session.learner.describe():
            log.info("%s", line)
    return session


def _build(cfg: Config, mode: str, ctx: distributed.Context) -> Session:
    """Task, learner (model or distiller) on its device, optimizer, schedule, EMA, data; nothing on disk yet."""
    task = build_task(cfg)
    batch_size = _per_rank_batch(cfg.data.batch_size, ctx.world_size)
    precision = MixedPrecision(cfg.train.amp, ctx.device)
    train_set = task.build_dataset("train", limit=cfg.data.limit_train)  # draws no random numbers
    rng.seed_everything(cfg.train.seed)  # identical initial weights in every process
    learner = LEARNERS[mode](cfg, task, dataset_size=len(train_set))
    identity = {"teacher": learner.teacher_identity, "train_set": dataset_identity(train_set, task.class_names)}
    if learner.teacher_identity is not None and cfg.teacher.sha256 is None:  # config.yaml names the teacher's file
        cfg = copy.deepcopy(cfg)
        cfg.teacher.sha256 = learner.teacher_identity["file_sha256"]
    learner.module.to(ctx.device)
    if cfg.train.channels_last:
        layout.module_to_channels_last(learner.module)
    rng.seed_everything(cfg.train.seed + ctx.rank)  # distinct noise and augmentation per process
    optimizer = build_optimizer(learner.trainable_parameters(), cfg.optim, learner.method_parameters())
    if learner.needs_indices:  # every item then comes with its dataset index, whatever the task
        train_set = WithIndices(train_set)
    sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=cfg.train.seed)
    steps = len(sampler) // batch_size
    if steps == 0:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is larger than the training set ({len(train_set)} items)"
        )
    eval_batch = max(1, (cfg.data.eval_batch_size or cfg.data.batch_size) // ctx.world_size)
    return Session(
        cfg=cfg,
        mode=mode,
        task=task,
        ctx=ctx,
        learner=learner,
        call=_wrap(learner.module, ctx, cfg.train.compile),
        optimizer=optimizer,
        schedule=LRSchedule(cfg.schedule, cfg.optim.lr, Timeline(steps, cfg.train.epochs)),
        precision=precision,
        ema=EMA(learner.student, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None,
        train_set=train_set,
        identity=identity,
        sampler=sampler,
        batch_size=batch_size,
        test_loader=test_loader(task, ctx, eval_batch, cfg.data.workers, cfg.data.limit_test),
        run_dir=Path(cfg.output.dir).expanduser(),
    )


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
    # The saved config is read back through the schema, so keys added to it since (at their defaults)
    # are no change, and keys renamed since are carried over; a saved key the schema no longer knows fails
    # there with the usual message.
    saved = config_to_dict(config_from_dict(ckpt["config"]))
    changed = [k for k in _config_changes(saved, config_to_dict(s.cfg)) if k not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(
            f"cannot resume {path.parent}: the config differs from the run's in {', '.join(changed)}; resume with "
            f"the same config (only {', '.join(sorted(RESUMABLE_CHANGES))} may change), or start afresh with --force"
        )
    saved_identity = ckpt.get("identity")
    if saved_identity is None and "train_items" in ckpt:  # written before identities were: its size at least
        saved_identity = {"train_set": {"items": ckpt["train_items"]}}
    check_identity(saved_identity, s.identity, path)
    _check_schedule_left(s, ckpt, path)
    load_into(s.learner.module, ckpt["model"], path, saved_model_name(ckpt), "this run's modules")
    s.optimizer.load_state_dict(ckpt["optimizer"])
    s.precision.load_state_dict(ckpt["scaler"])
    if s.ema is not None:
        s.ema.load_state_dict(ckpt["ema"])
    s.epoch, s.step, s.best, s.history = ckpt["epoch"], ckpt["step"], ckpt["best"], list(ckpt["history"])
    s.saved_epoch = s.epoch
    states = ckpt["rng"]
    if len(states) == s.ctx.world_size:
        rng.restore(states[s.ctx.rank])
    else:
        log.warning("resuming with %d processes (saved with %d): RNG streams reseeded", s.ctx.world_size, len(states))
        rng.seed_everything(s.cfg.train.seed + s.ctx.rank + 7919 * s.epoch)
    if s.ctx.is_main:
        log.info("resumed %s at epoch %d (global step %d)", path, s.epoch, s.step)
        if s.epoch == s.cfg.train.epochs:  # a finished run, reread (batch jobs do): say that nothing is trained
            log.info("the run already holds all %d epochs: nothing left to train (a larger train.epochs trains on)", s.epoch)


def _check_schedule_left(s: Session, ckpt: dict[str, Any], path: Path) -> None:
    """Refuse a resume whose schedule cannot go on from the checkpoint: fewer epochs than were done, or a
    global step that this data's steps per epoch do not reach (the run would train at the wrong lr, or none)."""
    epochs, done, step = s.cfg.train.epochs, ckpt["epoch"], ckpt["step"]
    timeline = s.schedule.timeline
    if done > epochs:
        raise ConfigError(
            f"cannot resume {path.parent}: train.epochs={epochs} but {path.name} already holds {done} epochs; "
            f"give train.epochs={done} or more"
        )
    same_processes = len(ckpt["rng"]) == s.ctx.world_size  # another process count may change the steps per epoch
    if done < epochs and (step >= timeline.steps_per_epoch * epochs
                          or (same_processes and step != done * timeline.steps_per_epoch)):
        raise ConfigError(
            f"cannot resume {path.parent}: {path.name} stopped after {done} epoch(s) at global step {step}, but the "
            f"training data now gives {timeline.steps_per_epoch} steps per epoch, so the schedule would not go on "
            "from where it stopped; resume with the run's data and data.batch_size, or start afresh with --force"
        )


def _train(s: Session, on_epoch_end: Callable[[dict[str, Any]], None] | None) -> RunResult:
    """Run the remaining epochs; returns the summary of the whole run (resumed epochs included)."""
    for epoch in range(s.epoch, s.cfg.train.epochs):
        record = _run_epoch(s, epoch)
        s.history.append(record)
        s.epoch = epoch + 1
        improved = record[s.main_key] > s.best
        if improved:
            s.best = record[s.main_key]
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
        main_metric=s.task.main_metric,
    )


def _run_epoch(s: Session, epoch: int) -> dict[str, Any]:
    """Train one epoch, evaluate, and return its metrics row."""
    start = time.perf_counter()
    s.sampler.set_epoch(epoch)
    loader = task_loader(
        s.task,
        s.train_set,
        s.batch_size,
        train=True,
        workers=s.cfg.data.workers,
        sampler=s.sampler,
        seed=s.cfg.train.seed + epoch,
    )
    train, stats, images, train_seconds = _train_epoch(s, loader, epoch)
    s.learner.end_epoch()  # before last.pt: a weight window that ends with the first epoch is saved closed
    model = s.ema.module if s.ema is not None else s.learner.student
    s.ctx.broadcast_buffers(model)
    test = evaluate(model, s.test_loader, s.task, s.ctx, s.precision, channels_last=s.cfg.train.channels_last)
    return {
        "epoch": epoch + 1,
        "lr": s.schedule.lr(s.step - 1),
        **train,
        **{f"test_{k}": v for k, v in test.items()},
        "epoch_seconds": time.perf_counter() - start,
        "images_per_s": images / max(train_seconds, 1e-9),
        **s.learner.epoch_columns(),
        **stats,
    }


def _check_finite(out: StepOutput, epoch: int, step: int, s: Session) -> None:
    """Stop on a NaN/inf loss (in any process), naming each bad term, the global step and the epoch."""
    names = [*out.terms, "total"]
    values = torch.stack([*(t.detach().float().reshape(()) for t in out.terms.values()), out.total.detach().float()])
    finite = torch.isfinite(values)
    if s.ctx.all_true(bool(finite.all())):
        return
    bad = [f"{n} = {v}" for n, v, ok in zip(names, values.tolist(), finite.tolist()) if not ok]
    fix = "Lower optim.lr, set train.clip_grad_norm, or check the inputs"
    if not s.epoch:  # every finished epoch wrote last.pt
        kept = f"no checkpoint was written, so rerunning the same command starts the run afresh. {fix}"
    else:
        kept = (
            f"{s.run_dir / 'last.pt'} (epoch {s.epoch}) is left untouched. {fix}, then rerun with --force "
            "to start afresh (it moves this run aside)"
        )
    raise NonFiniteLossError(
        f"non-finite loss at epoch {epoch + 1}, global step {step}: {', '.join(bad) or 'in another process'}; "
        f"training stopped and {kept}"
    )


def _train_step(s: Session, inputs: Any, targets: Any, indices: torch.Tensor | None, epoch: int,
                params: list[torch.nn.Parameter]) -> StepOutput:
    """One iteration: set the lr, forward under autocast, check the losses, backward, step, update the EMA."""
    s.schedule.apply(s.optimizer, s.step)
    with s.precision.autocast():
        out = s.learner.compute(s.call, inputs, targets, indices)
    _check_finite(out, epoch, s.step, s)
    s.optimizer.zero_grad(set_to_none=True)
    s.precision.backward_and_step(out.total, s.optimizer, params, s.cfg.train.clip_grad_norm)
    if s.ema is not None:
        s.ema.update(s.learner.student)
    s.step += 1
    return out


def _train_epoch(s: Session, loader: Any, epoch: int) -> tuple[dict[str, float], dict[str, float], int, float]:
    """One pass over the training data; returns (mean losses and train metrics, mean method stats, images, seconds)."""
    s.learner.module.train()
    params = [p for group in s.optimizer.param_groups for p in group["params"]]
    meter, metrics = LossMeter(), s.task.metrics()
    show = s.cfg.train.progress and s.ctx.is_main
    bar = progress_bar(loader, total=len(loader), desc=f"epoch {epoch + 1}/{s.cfg.train.epochs}", enabled=show)
    start = time.perf_counter()
    steps = len(loader)
    for i, batch in enumerate(bar):
        indices = None
        if isinstance(s.train_set, WithIndices):
            batch, indices = batch
            indices = indices.to(s.ctx.device, non_blocking=True)
        inputs, targets = s.task.augment_batch(*s.task.to_device(batch, s.ctx.device))
        s.learner.set_progress(epoch + i / steps, s.cfg.train.epochs)  # loss ramps move per step
        if s.cfg.train.channels_last:
            inputs = layout.inputs_to_channels_last(inputs)
        out = _train_step(s, inputs, targets, indices, epoch, params)
        meter.update(out, s.task.batch_size(inputs))
        metrics.update(out.outputs, targets)
        if s.step % s.cfg.train.log_every == 0:
            _log_step(s, bar, meter, metrics, start)
    seconds = time.perf_counter() - start
    losses, stats, images = meter.summary(s.ctx.sum, s.ctx.world_size)
    measured = {k: v for k, v in metrics.compute(s.ctx.sum).items() if not math.isnan(v)}  # nan: not on train batches
    losses.update({f"train_{k}": v for k, v in measured.items()})
    return losses, stats, images, seconds


def _log_step(s: Session, bar: Any, meter: LossMeter, metrics: Metrics, start: float) -> None:
    """Every log_every steps: the progress bar's loss/accuracy/images-per-second and TensorBoard scalars."""
    loss, samples = meter.running_loss()
    main = s.task.main_metric
    score = metrics.compute(lambda t: t).get(main, math.nan)  # this process's share, no communication
    speed = samples * s.ctx.world_size / max(time.perf_counter() - start, 1e-9)
    shown = {
        "loss": f"{loss:.4f}",
        **({main: f"{score:.2f}"} if not math.isnan(score) else {}),
        "img/s": f"{speed:.0f}",
    }
    bar.set_postfix(shown, refresh=False)
    s.reporter.scalars(s.step, {"step/train_loss": loss, "step/lr": s.optimizer.param_groups[0]["lr"]})


def _save(s: Session, improved: bool) -> None:
    """Write last.pt (and best.pt if improved) from rank 0, with every process's RNG state."""
    states = s.ctx.gather(rng.capture())
    if not s.ctx.is_main:
        return
    ckpt = {
        "format": FORMAT,
        "version": VERSION,
        "diffkd_version": __version__,
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
        "train_items": len(s.train_set),  # what methods with per-sample state (CRD) are sized by, to rebuild the run
        "identity": s.identity,
    }
    with interrupts_held():  # a Ctrl-C between the write and the record would report the epoch before
        write_atomic(serialize(ckpt), s.run_dir / "last.pt")
        s.saved_epoch = s.epoch
    record_identity(s.identity, s.run_dir)  # beside the checkpoint, so a run without one holds no outputs but config.yaml
    if improved:
        write_atomic(serialize({k: v for k, v in ckpt.items() if k not in RESUME_ONLY}), s.run_dir / "best.pt")
