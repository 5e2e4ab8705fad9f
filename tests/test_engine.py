"""The training engine: schedules, parameter groups, resume bit-exactness, error cases and run outputs.

Runs use a small evenly spaced slice of the real Fashion-MNIST (skipped when it is not installed).
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import needs_fmnist, record_progress
from diffkd import models
from diffkd.config import ConfigError, OptimConfig, ScheduleConfig, apply_overrides, config_from_dict, load_config
from diffkd.engine import CheckpointError, NonFiniteLossError, RunDirError, evaluate_checkpoint, load_checkpoint, run
from diffkd.engine.optim import build_optimizer
from diffkd.engine.precision import MixedPrecision
from diffkd.engine.schedules import LRSchedule, Timeline
from diffkd.tasks.classification import ClassificationTask



def tiny(tmp_path: Path, *overrides: str, name: str = "run", mode: str = "train") -> Any:
    """A config training fmnist_student on 128 images (4 steps of 32) for 2 epochs, on CPU, quietly."""
    data: dict[str, Any] = {
        "data": {"limit_train": 128, "limit_test": 64, "batch_size": 32},
        "optim": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": 2, "device": "cpu", "progress": False, "log_every": 1},
        "output": {"dir": str(tmp_path / name), "tensorboard": False},
    }
    if mode == "train":
        data["model"] = {"name": "fmnist_student"}
    return config_from_dict(apply_overrides(data, overrides))


def random_teacher(tmp_path: Path) -> Path:
    """An untrained fmnist_teacher's state dict on disk (enough to exercise distillation)."""
    path = tmp_path / "teacher.pt"
    torch.manual_seed(1)
    torch.save(models.create("fmnist_teacher", num_classes=10).state_dict(), path)
    return path


def distill_overrides(teacher: Path) -> list[str]:
    """DiffKD on the logits (KL) and an MSE projector on the feature map: cheap on CPU, yet with method
    modules, optimizer state and fresh noise per step (the conv DiffKD level runs in test_cli)."""
    return [
        "teacher.name=fmnist_teacher",
        f"teacher.checkpoint={teacher}",
        "student.name=fmnist_student",
        "levels=[{student: '@feature', teacher: '@feature', method: mse},"
        " {student: '@logits', teacher: '@logits', method: diffkd, options: {distance: kl, tau: 1.0}}]",
    ]


def all_tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor inside nested dicts/lists, by path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(all_tensors(value, f"{prefix}/{key}"))
    return out


class Stop(Exception):
    """Raised by an epoch hook to interrupt a run, as a crash or Ctrl-C would."""


def stop_after(epoch: int):
    def hook(record: dict[str, Any]) -> None:
        if record["epoch"] == epoch:
            raise Stop

    return hook


# --------------------------------------------------------------------------------------- schedules


def schedule(steps_per_epoch: int = 10, epochs: int = 10, **options: Any) -> LRSchedule:
    return LRSchedule(ScheduleConfig(**options), 0.1, Timeline(steps_per_epoch, epochs))


def test_exponential_every_fractional_epochs() -> None:
    s = schedule(name="exponential", gamma=0.97, every_epochs=2.4)  # 2.4 epochs = 24 iterations
    for step in (0, 23, 24, 47, 48, 100, 99):
        assert s.lr(step) == pytest.approx(0.1 * 0.97 ** (step // 24), rel=1e-12)


def test_linear_warmup_then_cosine_to_min_lr() -> None:
    s = schedule(name="cosine", warmup_epochs=0.5, min_lr=0.001)  # 5 warm-up iterations of 100
    for step in range(5):
        assert s.lr(step) == pytest.approx(0.1 * (step + 1) / 5, rel=1e-12)
    for step in (5, 20, 52, 99, 100):
        expected = 0.001 + (0.1 - 0.001) * 0.5 * (1 + math.cos(math.pi * (step - 5) / 95))
        assert s.lr(step) == pytest.approx(expected, rel=1e-12)
    assert s.lr(100) == pytest.approx(0.001)


def test_poly_decay() -> None:
    s = schedule(name="poly", power=0.9, min_lr=0.0)
    for step in (0, 37, 100):
        assert s.lr(step) == pytest.approx(0.1 * (1 - step / 100) ** 0.9, rel=1e-12)


def test_multistep_step_and_constant() -> None:
    s = schedule(name="multistep", milestones=[1, 2.5], gamma=0.1)
    assert [s.lr(i) for i in (0, 9, 10, 24, 25)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])
    s = schedule(name="step", step_size=3, gamma=0.5)
    assert [s.lr(i) for i in (29, 30, 60)] == pytest.approx([0.1, 0.05, 0.025])
    assert schedule(name="constant").lr(77) == 0.1


def test_schedule_sets_every_group_and_rejects_unknown_names() -> None:
    model = models.create("fmnist_student", num_classes=10)
    optimizer = build_optimizer(model.parameters(), OptimConfig(lr=0.2, no_decay_norm_bias=True))
    s = LRSchedule(ScheduleConfig(name="step", step_size=1, gamma=0.5), 0.2, Timeline(4, 3))
    s.apply(optimizer, 4)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.1])
    with pytest.raises(ConfigError, match=r"unknown schedule 'cosin'\. Did you mean 'cosine'\?"):
        schedule(name="cosin")


# --------------------------------------------------------------------------------------- optimizers


def test_no_decay_groups_hold_norms_and_biases() -> None:
    model = models.create("fmnist_student", num_classes=10)
    optimizer = build_optimizer(model.parameters(), OptimConfig(name="sgd", weight_decay=5e-4, no_decay_norm_bias=True))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert decayed == {
        n for n, p in model.named_parameters() if n.endswith("weight") and n.rsplit(".", 1)[0] not in norms
    }
    assert undecayed == {n for n, _ in model.named_parameters()} - decayed
    assert "fc.bias" in undecayed and any(n.rsplit(".", 1)[0] in norms for n in undecayed)
    single = build_optimizer(model.parameters(), OptimConfig(no_decay_norm_bias=False))
    assert len(single.param_groups) == 1


def test_method_modules_learn_at_their_own_multiple_of_the_rate() -> None:
    student, method = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    params = [*student.parameters(), *method.parameters()]
    cfg = OptimConfig(name="sgd", lr=0.2, weight_decay=5e-4, no_decay_norm_bias=True, methods_lr_scale=3.0)
    optimizer = build_optimizer(params, cfg, method.parameters())
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 4
    assert [by_param[id(p)]["lr"] for p in student.parameters()] == pytest.approx([0.2, 0.2])
    assert [by_param[id(p)]["lr"] for p in method.parameters()] == pytest.approx([0.6, 0.6])
    assert by_param[id(method.weight)]["weight_decay"] == 5e-4 and by_param[id(method.bias)]["weight_decay"] == 0.0
    LRSchedule(ScheduleConfig(name="step", step_size=1, gamma=0.5), 0.2, Timeline(4, 3)).apply(optimizer, 4)
    assert by_param[id(student.weight)]["lr"] == pytest.approx(0.1)
    assert by_param[id(method.weight)]["lr"] == pytest.approx(0.3)  # the schedule keeps the ratio
    plain = build_optimizer(params, OptimConfig(name="sgd", lr=0.2, no_decay_norm_bias=True), method.parameters())
    assert len(plain.param_groups) == 2  # scale 1: the same two groups as without method parameters
    with pytest.raises(ConfigError, match=r"optim.methods_lr_scale: must be more than 0, got 0"):
        config_from_dict({"optim": {"methods_lr_scale": 0}})


@pytest.mark.parametrize("name", ["sgd", "adamw", "rmsprop"])
def test_optimizer_registry(name: str) -> None:
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(3))], OptimConfig(name=name, lr=0.3))
    assert optimizer.param_groups[0]["initial_lr"] == 0.3


def test_optimizer_errors() -> None:
    with pytest.raises(ConfigError, match=r"unknown optimizer 'adam'\. Did you mean 'adamw'\?"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimConfig(name="adam"))
    with pytest.raises(ConfigError, match="nesterov=true needs optim.name=sgd"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], OptimConfig(name="adamw", nesterov=True))


def test_fp16_refused_on_cpu() -> None:
    with pytest.raises(ConfigError, match="train.amp=fp16 needs a CUDA device .* use train.amp=bf16 or none"):
        MixedPrecision("fp16", torch.device("cpu"))


def test_topk_counts() -> None:
    metric = ClassificationTask(config_from_dict({})).metrics()
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5], [5.0, 4, 3, 2, 1, 0]])
    metric.update(logits, torch.tensor([5, 5]))
    assert metric.compute(lambda t: t) == {"top1": 50.0, "top5": 50.0}


# --------------------------------------------------------------------------------------- runs


@pytest.mark.integration
@needs_fmnist
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path: Path) -> None:
    extra = [
        "train.epochs=3", "schedule.name=cosine", "schedule.warmup_epochs=0.5", "train.ema_decay=0.9",
        "optim.no_decay_norm_bias=true", "optim.nesterov=true", "train.label_smoothing=0.1", "train.clip_grad_norm=1.0",
    ]  # fmt: skip
    straight = run(tiny(tmp_path, *extra, name="straight"), mode="train")
    with pytest.raises(Stop):
        run(tiny(tmp_path, *extra, name="resumed"), mode="train", on_epoch_end=stop_after(2))
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 2
    resumed = run(tiny(tmp_path, *extra, name="resumed"), mode="train", resume=True)

    a, b = (load_checkpoint(p / "last.pt") for p in (straight.run_dir, resumed.run_dir))
    ta, tb = (
        all_tensors({k: a[k] for k in ("model", "optimizer", "ema", "rng")}),
        all_tensors({k: b[k] for k in ("model", "optimizer", "ema", "rng")}),
    )
    assert ta.keys() == tb.keys() and len(ta) > 40
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    drop = ("epoch_seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in straight.history] == [
        {k: v for k, v in r.items() if k not in drop} for r in resumed.history
    ]


@pytest.mark.integration
@needs_fmnist
def test_distill_resume_is_bit_identical(tmp_path: Path) -> None:
    teacher = random_teacher(tmp_path)
    extra = [
        *distill_overrides(teacher),
        "train.epochs=2",
        "data.limit_train=64",
        "data.limit_test=32",
        "optim.name=adamw",
        "optim.lr=0.001",
    ]
    straight = run(tiny(tmp_path, *extra, name="straight", mode="distill"), mode="distill")
    with pytest.raises(Stop):
        run(tiny(tmp_path, *extra, name="resumed", mode="distill"), mode="distill", on_epoch_end=stop_after(1))
    resumed = run(tiny(tmp_path, *extra, name="resumed", mode="distill"), mode="distill", resume=True)
    a, b = (load_checkpoint(p / "last.pt") for p in (straight.run_dir, resumed.run_dir))
    assert any(k.startswith("methods.") for k in a["model"]) and not any(k.startswith("teacher") for k in a["model"])
    ta, tb = (
        all_tensors({k: a[k] for k in ("model", "optimizer", "rng")}),
        all_tensors({k: b[k] for k in ("model", "optimizer", "rng")}),
    )
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    record = straight.history[-1]
    assert {"loss_task", "train_loss", "test_top1", "test_top5"} <= record.keys()
    assert any(k.startswith("loss_") and k.endswith("/diffusion") for k in record)
    assert any(k.endswith("/gamma") for k in record)  # method stats, averaged per epoch
    assert straight.extra_parameters > 0


@pytest.mark.integration
@needs_fmnist
def test_methods_hear_the_progress_before_every_step_and_variants_resume_bit_identical(tmp_path: Path, monkeypatch) -> None:
    """The engine gives step i the progress epoch + i / steps (of epochs); a DiffKD level with the kd warm-up,
    normalised targets and DPM-Solver++ resumes bit-identical (its statistics are checkpointed)."""
    heard = record_progress(monkeypatch)
    extra = [
        "teacher.name=fmnist_teacher", f"teacher.checkpoint={random_teacher(tmp_path)}", "student.name=fmnist_student",
        "levels=[{student: '@logits', teacher: '@logits', method: diffkd, options: {distance: mse, kd_warmup_epochs: 1.5,"
        " normalize_target: true, sampler: dpm_solver++, inference_steps: 3}}]",
        "data.limit_train=128", "data.limit_test=32", "optim.name=adamw", "optim.lr=0.001", "optim.methods_lr_scale=3",
    ]
    straight = run(tiny(tmp_path, *extra, name="straight", mode="distill"), mode="distill")
    assert heard == [(e + i / 4, 2) for e in range(2) for i in range(4)]  # 128 images, batch 32: 4 steps
    with pytest.raises(Stop):
        run(tiny(tmp_path, *extra, name="resumed", mode="distill"), mode="distill", on_epoch_end=stop_after(1))
    resumed = run(tiny(tmp_path, *extra, name="resumed", mode="distill"), mode="distill", resume=True)
    a, b = (load_checkpoint(p / "last.pt") for p in (straight.run_dir, resumed.run_dir))
    assert any(k.endswith("distance.normalizer.running_var") for k in a["model"])
    rates = sorted({g["lr"] for g in a["optimizer"]["param_groups"]})  # the DiffKD modules learn at 3x the rate
    assert len(rates) == 2 and rates[1] == pytest.approx(3 * rates[0])
    ta, tb = (all_tensors({k: c[k] for k in ("model", "optimizer", "rng")}) for c in (a, b))
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []


@pytest.mark.integration
def test_crd_bank_is_in_the_checkpoint_and_resume_is_bit_identical(tmp_path: Path) -> None:
    """CRD (dataset indices from the engine's data wrapper, a memory bank per side) plus a multi-tap VID level."""
    teacher = random_teacher(tmp_path)
    extra = [
        "teacher.name=fmnist_teacher", f"teacher.checkpoint={teacher}", "student.name=fmnist_student",
        "levels=[{student: '@feature', teacher: '@feature', method: crd, weight: 0.8, options: {negatives: 50}},"
        " {student: [features.1, features.2], teacher: [features.1, features.3], method: vid}]",
        "train.epochs=2", "data.limit_train=64", "data.limit_test=32", "data.batch_size=16",
    ]  # fmt: skip
    straight = run(tiny(tmp_path, *extra, name="straight", mode="distill"), mode="distill")
    with pytest.raises(Stop):
        run(tiny(tmp_path, *extra, name="resumed", mode="distill"), mode="distill", on_epoch_end=stop_after(1))
    first = load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    resumed = run(tiny(tmp_path, *extra, name="resumed", mode="distill"), mode="distill", resume=True)
    a, b = (load_checkpoint(p / "last.pt") for p in (straight.run_dir, resumed.run_dir))
    bank = "methods.crd_feature.memory_student"
    assert a["model"][bank].shape == (64, 128)  # one row per training item
    assert (a["model"]["methods.crd_feature.normalizers"] > 0).all()
    assert a["model"]["methods.crd_feature.labels"].min() >= 0  # every item seen, its class learnt
    assert not torch.equal(first[bank], a["model"][bank])  # the second epoch moved the bank
    ta, tb = (all_tensors({k: c[k] for k in ("model", "optimizer", "rng")}) for c in (a, b))
    assert ta.keys() == tb.keys() and [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    assert a["train_items"] == 64
    from diffkd.visualize import load_run

    rebuilt, _ = load_run(straight.run_dir, which="last")  # as `diffkd visualize` does: the bank sized from the checkpoint
    assert torch.equal(rebuilt.state_dict()[bank], a["model"][bank])
    assert straight.history[-1]["loss_crd_feature"] == resumed.history[-1]["loss_crd_feature"]


@pytest.mark.integration
@needs_fmnist
def test_run_outputs(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, "output.tensorboard=true")
    result = run(cfg, mode="train")
    files = {p.name for p in result.run_dir.iterdir()}
    assert {"config.yaml", "last.pt", "best.pt", "metrics.csv", "curves.png", "tensorboard"} <= files
    assert load_config(result.run_dir / "config.yaml") == cfg
    with open(result.run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    assert list(rows[0])[:4] == ["epoch", "lr", "train_loss", "loss_task"]
    assert {"train_top1", "test_top1", "test_top5", "epoch_seconds", "images_per_s"} <= rows[0].keys()
    assert float(rows[1]["test_top1"]) == pytest.approx(result.final_top1)
    assert result.best_top1 == max(r["test_top1"] for r in result.history)
    assert result.train_seconds > 0 and result.extra_parameters == 0
    assert any((result.run_dir / "tensorboard").iterdir())
    ckpt = load_checkpoint(result.run_dir / "best.pt")
    assert ckpt["best"] == result.best_top1 and isinstance(ckpt["config"], dict)


@pytest.mark.integration
@needs_fmnist
def test_existing_run_dir_is_refused_and_force_moves_it_aside(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, "train.epochs=1")
    run(cfg, mode="train")
    (Path(cfg.output.dir) / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError) as err:
        run(cfg, mode="train")
    assert str(err.value) == (
        f"run directory {cfg.output.dir} already holds a run (config.yaml, last.pt, best.pt, metrics.csv); "
        "pass --resume to continue it, or --force to move it aside to run.old-<time> and start afresh"
    )
    run(cfg, mode="train", force=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine" and (aside[0] / "last.pt").is_file()
    assert not (Path(cfg.output.dir) / "notes.txt").exists()
    with pytest.raises(RunDirError, match="contradict"):
        run(cfg, mode="train", force=True, resume=True)


@pytest.mark.integration
@needs_fmnist
def test_corrupt_checkpoint_is_reported_with_its_name(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, "train.epochs=1")
    run(cfg, mode="train")
    last = Path(cfg.output.dir) / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(
        CheckpointError, match=rf"cannot read checkpoint {re.escape(str(last))}: the file is truncated, corrupt"
    ):
        run(tiny(tmp_path, "train.epochs=2"), mode="train", resume=True)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=rf"cannot read checkpoint {re.escape(str(garbage))}"):
        evaluate_checkpoint(garbage)
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="is not a diffkd run checkpoint"):
        evaluate_checkpoint(plain)


@pytest.mark.integration
@needs_fmnist
def test_resume_with_another_config_is_refused(tmp_path: Path) -> None:
    run(tiny(tmp_path, "train.epochs=1"), mode="train")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(
        ConfigError, match=r"cannot resume .*: the config differs from the run's in optim.lr; resume with"
    ):
        run(tiny(tmp_path, "train.epochs=2", "optim.lr=0.2"), mode="train", resume=True)
    assert (tmp_path / "run" / "config.yaml").read_text() == saved
    result = run(tiny(tmp_path, "train.epochs=2"), mode="train", resume=True)  # more epochs is allowed
    assert [r["epoch"] for r in result.history] == [1, 2]


@pytest.mark.integration
@needs_fmnist
def test_resume_of_a_run_saved_before_a_config_key_existed(tmp_path: Path) -> None:
    """A checkpoint whose config lacks a key the schema gained later (at its default) resumes."""
    run(tiny(tmp_path, "train.epochs=1"), mode="train")
    path = tmp_path / "run" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"]["train"]["label_smoothing"]  # as if written before the key existed
    torch.save(ckpt, path)
    result = run(tiny(tmp_path, "train.epochs=2"), mode="train", resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2]
    ckpt["config"]["train"]["label_smoothing"] = 0.1  # a real change is still refused
    torch.save(ckpt, path)
    with pytest.raises(ConfigError, match="differs from the run's in train.label_smoothing"):
        run(tiny(tmp_path, "train.epochs=3"), mode="train", resume=True)


@pytest.mark.integration
@needs_fmnist
def test_nan_loss_names_term_step_and_epoch_and_keeps_last_checkpoint(tmp_path: Path, monkeypatch) -> None:
    original = ClassificationTask.loss
    calls = {"train": 0}

    def poisoned(self, outputs, targets):
        loss = original(self, outputs, targets)
        if torch.is_grad_enabled():  # training steps only, not evaluation
            calls["train"] += 1
            if calls["train"] == 6:  # epoch 2, its second step: global step 5
                return loss * float("nan")
        return loss

    monkeypatch.setattr(ClassificationTask, "loss", poisoned)
    cfg = tiny(tmp_path)
    digests = {}

    def remember(record: dict[str, Any]) -> None:
        for name in ("last.pt", "best.pt"):
            digests[name] = hashlib.sha256((Path(cfg.output.dir) / name).read_bytes()).hexdigest()

    with pytest.raises(NonFiniteLossError) as err:
        run(cfg, mode="train", on_epoch_end=remember)
    message = str(err.value)
    assert message.startswith("non-finite loss at epoch 2, global step 5: task = nan, total = nan; training stopped")
    assert "last.pt (epoch 1) is left untouched" in message
    assert message.endswith("check the inputs, then rerun with --force to start afresh (it moves this run aside)")
    for name, digest in digests.items():
        assert hashlib.sha256((Path(cfg.output.dir) / name).read_bytes()).hexdigest() == digest
    assert load_checkpoint(Path(cfg.output.dir) / "last.pt")["epoch"] == 1


@pytest.mark.integration
@needs_fmnist
def test_huge_learning_rate_stops_with_a_named_term(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at epoch \d+, global step \d+: task = (nan|inf)"):
        run(tiny(tmp_path, "optim.lr=1e12", "optim.momentum=0.0", "train.epochs=3"), mode="train")


@pytest.mark.integration
@needs_fmnist
def test_ema_weights_are_evaluated_and_exported(tmp_path: Path) -> None:
    from diffkd.engine import export_weights

    result = run(tiny(tmp_path, "train.ema_decay=0.5", "train.epochs=1"), mode="train")
    ckpt = load_checkpoint(result.run_dir / "last.pt")
    assert ckpt["ema"] is not None
    assert not torch.equal(ckpt["ema"]["fc.weight"], ckpt["model"]["fc.weight"])
    exported = torch.load(export_weights(result.run_dir, tmp_path / "s.pt", which="last"), weights_only=True)
    assert all(torch.equal(exported[k], ckpt["ema"][k]) for k in ckpt["ema"])
    evaluated = evaluate_checkpoint(result.run_dir, which="last", device="cpu", limit=64)
    assert evaluated["metrics"]["top1"] == pytest.approx(result.history[-1]["test_top1"])
    assert evaluated["main_metric"] == "top1" and evaluated["images"] == 64


@pytest.mark.integration
@needs_fmnist
def test_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    result = run(tiny(tmp_path, "train.amp=bf16", "train.epochs=1", "data.limit_train=64"), mode="train")
    assert math.isfinite(result.history[-1]["train_loss"])


@needs_fmnist
def test_distill_needs_its_sections_and_a_teacher_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="teacher, student, levels: required for `diffkd distill`"):
        run(tiny(tmp_path, mode="distill"), mode="distill")
    cfg = tiny(tmp_path, "teacher.name=fmnist_teacher", "student.name=fmnist_student",
               "levels=[{student: '@logits', teacher: '@logits', method: kd}]", mode="distill")  # fmt: skip
    with pytest.raises(ConfigError, match="teacher.checkpoint: required"):
        run(cfg, mode="distill")
    cfg = tiny(tmp_path, *distill_overrides(random_teacher(tmp_path)), "levels.0.student=@features", mode="distill")
    with pytest.raises(ConfigError, match=r"levels.0.student: unknown tap alias '@features'"):
        run(cfg, mode="distill")
    assert not Path(cfg.output.dir).exists()  # config mistakes fail before the run directory is made


@needs_fmnist
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_run_matches_the_checkpoint_layout(tmp_path: Path) -> None:
    result = run(tiny(tmp_path, "train.compile=true", "train.epochs=1", "data.limit_train=64"), mode="train")
    ckpt = load_checkpoint(result.run_dir / "last.pt")
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])  # the bare model's keys
    models.create("fmnist_student", num_classes=10).load_state_dict(ckpt["model"])


def test_resume_or_restart_picks_the_flags_a_batch_job_needs(tmp_path):
    from diffkd.engine import resume_or_restart

    assert resume_or_restart(tmp_path / "never-run") == {}
    (tmp_path / "died-early").mkdir()
    (tmp_path / "died-early" / "config.yaml").write_text("task: classification\n")
    assert resume_or_restart(tmp_path / "died-early") == {}  # the plain command restarts it (no checkpoint to lose)
    (tmp_path / "has-checkpoint").mkdir()
    (tmp_path / "has-checkpoint" / "last.pt").write_bytes(b"")
    assert resume_or_restart(tmp_path / "has-checkpoint") == {"resume": True}


# ------------------------------------------------------------------------- faults and bad input (issue 15)


def poison_first_step(monkeypatch) -> None:
    """Make the first training step's loss NaN, as a diverging run would, before any checkpoint exists."""
    original = ClassificationTask.loss
    calls = {"train": 0}

    def poisoned(self, outputs, targets):
        loss = original(self, outputs, targets)
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] == 1:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(ClassificationTask, "loss", poisoned)


@pytest.mark.integration
@needs_fmnist
def test_a_run_stopped_before_its_first_checkpoint_is_restarted_by_the_same_command(tmp_path: Path, monkeypatch) -> None:
    cfg = tiny(tmp_path, "train.epochs=1", "data.limit_train=64")
    poison_first_step(monkeypatch)
    with pytest.raises(NonFiniteLossError) as err:
        run(cfg, mode="train")
    assert "no checkpoint was written, so rerunning the same command starts the run afresh" in str(err.value)
    assert sorted(p.name for p in Path(cfg.output.dir).iterdir()) == ["config.yaml"]
    result = run(cfg, mode="train")  # the same command again: no --resume, no --force
    assert [r["epoch"] for r in result.history] == [1] and (result.run_dir / "last.pt").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # a lone config.yaml is rewritten in place


@pytest.mark.integration
@needs_fmnist
def test_a_failed_attempts_other_outputs_are_moved_aside_not_mixed_in(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, "train.epochs=1", "data.limit_train=64")
    run_dir = Path(cfg.output.dir)
    (run_dir / "tensorboard").mkdir(parents=True)
    (run_dir / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"old attempt")
    (run_dir / "config.yaml").write_text("old attempt")
    run(cfg, mode="train")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "tensorboard" / "events.out.tfevents.1.host").read_bytes() == b"old attempt"
    assert (aside[0] / "config.yaml").read_text() == "old attempt" and not (run_dir / "tensorboard").exists()


@pytest.mark.integration
@needs_fmnist
def test_resume_where_there_is_nothing_to_resume_starts_the_run(tmp_path: Path, caplog) -> None:
    cfg = tiny(tmp_path, "train.epochs=1", "data.limit_train=64")
    Path(cfg.output.dir).mkdir()
    (Path(cfg.output.dir) / "config.yaml").write_text("task: classification\n")  # an attempt that died early
    with caplog.at_level("INFO", logger="diffkd"):
        result = run(cfg, mode="train", resume=True)
    assert [r["epoch"] for r in result.history] == [1]
    assert f"--resume: nothing to resume in {cfg.output.dir} (no last.pt); starting the run afresh" in caplog.text
    fresh = tiny(tmp_path, "train.epochs=1", "data.limit_train=64", name="never-run")
    assert [r["epoch"] for r in run(fresh, mode="train", resume=True).history] == [1]


def test_resume_refuses_a_best_checkpoint_without_last(tmp_path: Path) -> None:
    from diffkd.engine.rundir import check_run_dir

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"")
    for resume in (True, False):
        with pytest.raises(RunDirError, match=r"holds a run \(best.pt\)"):
            check_run_dir(tmp_path / "run", resume=resume, force=False)


@pytest.mark.integration
@needs_fmnist
def test_a_folder_with_files_the_run_did_not_write_is_refused(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, "train.epochs=1", "data.limit_train=64", name="mine")
    mine = Path(cfg.output.dir)
    mine.mkdir()
    (mine / "curves.png").write_bytes(b"my own plot")
    (mine / "tensorboard").mkdir()
    with pytest.raises(RunDirError) as err:
        run(cfg, mode="train")
    assert str(err.value) == (
        f"output.dir {mine} holds files this run did not write (curves.png, tensorboard); choose an empty or new "
        "folder, or pass --force to move it aside to mine.old-<time> and start afresh"
    )
    assert (mine / "curves.png").read_bytes() == b"my own plot" and sorted(p.name for p in mine.iterdir()) == [
        "curves.png", "tensorboard"]  # fmt: skip
    (mine / "tensorboard").rmdir()
    (mine / "config.yaml").write_text("task: classification\n")  # looks like a run's, yet holds a user file
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"holds files this run did not write \(notes.txt\)"):
        run(cfg, mode="train")
    run(cfg, mode="train", force=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("mine.old-")]
    assert len(aside) == 1 and (aside[0] / "curves.png").read_bytes() == b"my own plot"
    empty = tiny(tmp_path, "train.epochs=1", "data.limit_train=64", name="empty")
    Path(empty.output.dir).mkdir()
    run(empty, mode="train")  # an empty existing folder is fine


@pytest.mark.integration
@needs_fmnist
def test_stale_temporaries_are_removed_on_resume_and_restart(tmp_path: Path) -> None:
    from diffkd.atomic import open_temporary

    def debris(folder: Path, name: str) -> Path:
        """The temporary a write killed mid-way leaves (made by the same code as the real writes)."""
        fd, tmp = open_temporary(folder / name)
        os.write(fd, b"x" * 1000)
        os.close(fd)
        return Path(tmp)

    cfg = tiny(tmp_path, "train.epochs=1", "data.limit_train=64")
    run_dir = Path(cfg.output.dir)
    run(cfg, mode="train")
    stale = [debris(run_dir, name) for name in ("last.pt", "best.pt", "metrics.csv", "last.pt")]
    kept = [run_dir / n for n in (".last.pt.mine.tmp", ".last.pt.abcdefghi.tmp", ".notes.txt.abcdefgh.tmp")]
    for path in kept:
        path.write_text("not ours")
    run(tiny(tmp_path, "train.epochs=2", "data.limit_train=64"), mode="train", resume=True)
    assert not any(p.exists() for p in stale) and all(p.read_text() == "not ours" for p in kept)

    other = tiny(tmp_path, "train.epochs=1", "data.limit_train=64", name="died")
    died = Path(other.output.dir)
    died.mkdir()
    (died / "config.yaml").write_text("task: classification\n")
    leftover = debris(died, "last.pt")  # killed while writing its first checkpoint
    run(other, mode="train")
    assert not leftover.exists() and (died / "last.pt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("died.old-")]


def _unsafe_object() -> Any:
    class RunsCode:
        def __reduce__(self):
            return (os.system, ("echo this would run",))

    return {"weights": torch.zeros(2), "payload": RunsCode()}


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {name: tmp_path / f"{name}.pt" for name in ("unsafe", "empty", "random", "text", "truncated")}
    torch.save(_unsafe_object(), files["unsafe"])
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(random.Random(3).randbytes(1000))
    files["text"].write_text("epochs: 3\nthis is a config, not weights\n")
    torch.save({"weight": torch.zeros(100)}, files["truncated"])
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:300])
    return files


FITTING = {
    "unsafe": f"holds objects other than tensors and plain containers ({os.system.__module__}.system); it was refused for safety",
    "empty": "empty file",
    "random": "not a torch checkpoint",
    "text": "not a torch checkpoint",
    "truncated": "the file is truncated, corrupt",
}


@pytest.mark.parametrize("kind", list(FITTING))
def test_unreadable_checkpoints_get_a_fitting_message_from_every_loader(tmp_path: Path, kind: str) -> None:
    from diffkd.engine.checkpoint import load_file

    path = _bad_files(tmp_path)[kind]
    loaders = {
        "engine": (lambda: load_file(path), CheckpointError),
        "models": (lambda: models.load_weights(models.create("fmnist_student", num_classes=10), path), ValueError),
    }
    for load, error in loaders.values():
        with pytest.raises(error) as err:
            load()
        message = str(err.value)
        assert message.startswith(f"cannot read checkpoint {path}: ") and FITTING[kind] in message
        assert "\n" not in message and "weights_only=False" not in message and "weights_only` set to `False" not in message
        assert not any(raw in message for raw in ("EOFError", "KeyError", "IndexError", "UnpicklingError"))


@pytest.mark.integration
@needs_fmnist
def test_a_checkpoint_of_another_architecture_names_both_models_and_a_few_keys(tmp_path: Path) -> None:
    student_run = run(tiny(tmp_path, "train.epochs=1", "data.limit_train=64", name="student"), mode="train")
    cfg = tiny(tmp_path, *distill_overrides(student_run.run_dir), "data.limit_train=64", mode="distill")
    with pytest.raises(CheckpointError) as err:
        run(cfg, mode="distill")
    message = str(err.value)
    assert message.startswith(
        f"teacher checkpoint {student_run.run_dir / 'best.pt'} was saved for model 'fmnist_student' and does not "
        "fit model 'fmnist_teacher': missing features.3.0.weight, "
    )
    assert "wrong shape (file vs model): features.0.0.weight (8, 1, 3, 3) vs (32, 1, 3, 3), " in message
    assert "Error(s) in loading" not in message and "\n" not in message and len(message) < 800

    last = student_run.run_dir / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["model"]["extra.weight"] = ckpt["model"].pop("fc.bias")
    torch.save(ckpt, last)
    with pytest.raises(CheckpointError) as err:
        evaluate_checkpoint(student_run.run_dir, which="last", device="cpu", limit=8)
    assert str(err.value) == (
        f"{last} was saved for model 'fmnist_student' and does not fit model 'fmnist_student': "
        "missing fc.bias; unexpected extra.weight"
    )
    with pytest.raises(CheckpointError, match=r"does not fit this run's modules: missing fc.bias; unexpected extra"):
        run(tiny(tmp_path, "train.epochs=2", "data.limit_train=64", name="student"), mode="train", resume=True)


def test_evaluate_checkpoint_refuses_non_positive_sizes(tmp_path: Path) -> None:
    for key, value in (("batch_size", 0), ("batch_size", -3), ("limit", 0), ("limit", -2)):
        with pytest.raises(ValueError, match=rf"^{key} must be a positive integer, got {value}$"):
            evaluate_checkpoint(tmp_path, **{key: value})


def test_save_atomic_onto_a_directory_refuses_cleanly(tmp_path: Path) -> None:
    from diffkd.atomic import save_atomic

    for overwrite in (True, False):
        with pytest.raises(IsADirectoryError, match=rf"^{re.escape(str(tmp_path))} is a directory; give the path of a file"):
            save_atomic({"w": torch.zeros(1)}, tmp_path, overwrite=overwrite)
    assert list(tmp_path.iterdir()) == []  # no temporary left behind


@needs_fmnist
def test_a_negative_level_weight_in_the_config_names_the_level(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, *distill_overrides(random_teacher(tmp_path)), "levels.0.weight=-1", mode="distill")
    with pytest.raises(ConfigError, match=r"^levels.0: Level weight must be a finite number >= 0 or 'auto', got -1.0$"):
        run(cfg, mode="distill")


def _spatial_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The 4-D weights whose layout differs between the two formats (more than one input channel, k > 1)."""
    return {k: v for k, v in state.items() if v.dim() == 4 and v.shape[1] > 1 and v.shape[-1] > 1}


@pytest.mark.integration
@needs_fmnist
def test_channels_last_lays_out_weights_and_batches(tmp_path: Path, monkeypatch) -> None:
    """train.channels_last: the student's and the teacher's conv weights and every training and test batch
    are channels-last, and the run computes what the default layout does (up to float summation order)."""
    from diffkd.engine import evaluation, learner

    seen: dict[str, list[bool]] = {"train": [], "test": [], "teacher": []}
    compute, call_model = learner.DistillLearner.compute, evaluation.call_model

    def recording_compute(self, call, inputs, targets, indices=None):
        seen["train"].append(inputs.is_contiguous(memory_format=torch.channels_last))
        seen["teacher"] += [w.is_contiguous(memory_format=torch.channels_last)
                            for w in _spatial_weights(self.module.teacher.state_dict()).values()]  # fmt: skip
        return compute(self, call, inputs, targets, indices)

    def recording_forward(model, inputs):
        seen["test"].append(inputs.is_contiguous(memory_format=torch.channels_last))
        return call_model(model, inputs)

    extra = [*distill_overrides(random_teacher(tmp_path)), "train.epochs=1", "data.limit_train=64", "data.limit_test=32"]
    plain = run(tiny(tmp_path, *extra, name="plain", mode="distill"), mode="distill")
    monkeypatch.setattr(learner.DistillLearner, "compute", recording_compute)
    monkeypatch.setattr(evaluation, "call_model", recording_forward)
    result = run(tiny(tmp_path, *extra, "train.channels_last=true", name="nhwc", mode="distill"), mode="distill")

    assert seen["train"] == [True, True] and seen["test"] == [True] and seen["teacher"] and all(seen["teacher"])
    weights = _spatial_weights(load_checkpoint(result.run_dir / "last.pt")["model"])
    student = {k: v for k, v in weights.items() if k.startswith("student.")}
    assert student and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
                           for w in student.values())  # fmt: skip
    plain_weights = _spatial_weights(load_checkpoint(plain.run_dir / "last.pt")["model"])
    assert all(plain_weights[k].is_contiguous() for k in student)  # the default layout, for contrast
    a, b = plain.history[-1], result.history[-1]
    assert math.isfinite(b["train_loss"]) and b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    assert b["test_top1"] == pytest.approx(a["test_top1"], abs=100 / 32 + 1e-9)  # at most one test image flips
