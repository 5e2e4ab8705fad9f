"""DistillationModule: Lightning distilling the user's own LightningModule, checked against formulas and plain runs."""
from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffkd
from conftest import ddp_matches_one_process, one_line, record_progress
from diffkd import Level
from diffkd.data import WithIndices
from diffkd.integrations.lightning import DistillationModule

CLASSES, SIZE = 3, 8


def cnn(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, CLASSES))


class LitStudent(L.LightningModule):
    """What a user writes: forward, an optimizer over self.parameters(), a validation step that logs."""

    def __init__(self, width: int = 4, lr: float = 0.1):
        super().__init__()
        self.net, self.lr = cnn(width), lr

    def forward(self, x):
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


def frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


def module(levels=None, student=None, **options) -> DistillationModule:
    torch.manual_seed(0)
    levels = levels or [Level("net.0", "0", "mse", name="maps"), Level("net.4", "4", "kd", tau=2.0, name="logits")]
    options = {"task_loss": F.cross_entropy, **options}
    return DistillationModule(student or LitStudent(), frozen(cnn(8)), levels, input_shape=(3, SIZE, SIZE), **options)


def loader(n: int = 16, batch: int = 4, indices: bool = False, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (n,), generator=g))
    return torch.utils.data.DataLoader(WithIndices(data) if indices else data, batch_size=batch)


def trainer(tmp_path: Path, **options) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1, default_root_dir=tmp_path)
    return L.Trainer(**{**defaults, **options})


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("teacher,levels,message", [
    (None, [Level("net.4", "4", "kd")], "got levels but no teacher"),
    ("cnn", [], "got a teacher but no levels"),
])
def test_a_teacher_and_levels_come_together(teacher, levels, message):
    with pytest.raises(ValueError, match=message) as exc:
        DistillationModule(LitStudent(), cnn(8) if teacher else None, levels, task_loss=F.cross_entropy,
                           input_shape=(3, SIZE, SIZE))
    one_line(exc)


def test_a_student_output_the_levels_cannot_tap():
    class Pair(LitStudent):
        def forward(self, x):
            return self.net(x), x.mean()

    with pytest.raises(ValueError, match=r"tap 'kd_output' \(path '' = the model, output\) produced a tuple of 2 elements .*"
                                         r"choose one with select") as exc:
        DistillationModule(Pair(), frozen(cnn(8)), [Level("", "4", "kd")], task_loss=F.cross_entropy,
                           input_shape=(3, SIZE, SIZE))
    one_line(exc)


def test_a_teacher_in_training_mode_requiring_grad_is_frozen_and_said_so():
    teacher = cnn(8)
    with pytest.warns(UserWarning, match=r"DistillationModule: the teacher was in training mode and had \d+ parameters "
                                         r"requiring grad; it is frozen"):
        wrapped = DistillationModule(LitStudent(), teacher, [Level("net.4", "4", "kd")], task_loss=F.cross_entropy,
                                     input_shape=(3, SIZE, SIZE))
    wrapped.train()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert wrapped.student.training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module()


def test_batches_it_cannot_split_and_indices_a_method_needs():
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.randint(0, CLASSES, (4,))
    with pytest.raises(ValueError, match=r"reads \(inputs, targets\) batches, got a tuple of 3: pass split_batch=") as exc:
        module().training_step((x, y, y), 0)
    one_line(exc)
    crd = module([Level("net.4", "4", "crd", feat_dim=8, negatives=4)], dataset_size=16)
    with pytest.raises(ValueError, match=r"needs each sample's dataset index: wrap the training set in "
                                         r"diffkd.data.WithIndices") as exc:
        crd.training_step((x, y), 0)
    one_line(exc)


def test_an_optimizer_that_leaves_out_the_method_modules_is_refused():
    class OwnParameters(LitStudent):
        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="the student's configure_optimizers does not optimise the method modules") as exc:
        module(student=OwnParameters()).configure_optimizers()
    one_line(exc)
    wrapped = module()
    config = wrapped.configure_optimizers()  # over self.parameters(): student and methods, the scheduler with them
    params = {id(p) for group in config["optimizer"].param_groups for p in group["params"]}
    assert params == {id(p) for p in wrapped.parameters()} and not hasattr(wrapped.student, "distill_methods")


def test_the_student_exports_alone(tmp_path):
    wrapped = module()
    path = wrapped.export_student(tmp_path / "student.pt")
    fresh = LitStudent()
    fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert all(torch.equal(v, wrapped.student.state_dict()[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(FileExistsError):
        wrapped.export_student(tmp_path / "student.pt")
    assert {k.split(".")[0] for k in wrapped.state_dict()} == {"student", "methods"}  # no teacher (nor auto weights)


# ----------------------------------------------------------------------------- training end to end
@pytest.mark.integration
def test_fit_logs_the_loss_by_formula_and_the_students_validation(tmp_path):
    wrapped = module([Level("net.4", "4", "kd", tau=2.0, weight=0.5, name="logits")])
    x, y = next(iter(loader()))
    with torch.no_grad():
        s, t = wrapped.student(x), wrapped.distiller.teacher(x)
    kd = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    run = trainer(tmp_path, max_steps=1, val_check_interval=1, num_sanity_val_steps=0)
    run.fit(wrapped, loader(), loader(8, seed=1))
    logged = run.callback_metrics
    assert logged["train/task_loss_step"].item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-5)
    assert logged["train/logits_step"].item() == pytest.approx(0.5 * kd.item(), rel=1e-5)
    assert logged["train/loss_step"].item() == pytest.approx((F.cross_entropy(s, y) + 0.5 * kd).item(), rel=1e-5)
    assert "val_loss" in logged  # the student's own validation_step, logged through the wrapper


@pytest.mark.integration
def test_checkpoints_hold_the_method_modules_and_resume_them_with_their_own_levels_only(tmp_path):
    first = module()
    run = trainer(tmp_path, max_steps=2)
    run.fit(first, loader())
    run.save_checkpoint(tmp_path / "two.ckpt")
    saved = torch.load(tmp_path / "two.ckpt", weights_only=False)
    assert {k.split(".")[0] for k in saved["state_dict"]} == {"student", "methods"}
    initial = module().methods.state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in first.methods.state_dict().items())  # trained
    optimised = {id(p) for p in first.methods.parameters()}
    assert optimised <= {id(p) for g in run.optimizers[0].param_groups for p in g["params"]}

    again = module()  # untrained method modules, then the checkpoint's
    trainer(tmp_path, max_steps=2).fit(again, loader(), ckpt_path=tmp_path / "two.ckpt")
    for part in ("methods", "student"):
        a, b = getattr(first, part).state_dict(), getattr(again, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part
    # never a silent resume with other levels, nor of a checkpoint that records none
    for levels in ([Level("net.0", "0", "mse", name="maps")],  # no logits level, which holds no state
                   [Level("net.0", "0", "mse", name="maps"), Level("net.4", "4", "kd", tau=4.0, name="logits")]):
        with pytest.raises(ValueError) as exc:
            trainer(tmp_path, max_steps=2).fit(module(levels), loader(), ckpt_path=tmp_path / "two.ckpt")
        assert "the checkpoint was trained with other levels" in one_line(exc)
    checkpoint = torch.load(tmp_path / "two.ckpt", weights_only=False)
    assert checkpoint["diffkd_version"] == diffkd.__version__
    del checkpoint["diffkd_levels"]  # as an earlier diffkd wrote it
    torch.save(checkpoint, tmp_path / "earlier.ckpt")
    with pytest.raises(ValueError) as exc:
        trainer(tmp_path, max_steps=2).fit(module(), loader(), ckpt_path=tmp_path / "earlier.ckpt")
    assert "records no distillation levels: it was written by an earlier diffkd" in one_line(exc)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_two_gloo_processes_under_torchrun_match_one_process_with_the_same_global_batch(tmp_path):
    """Lightning's DDP strategy, CNNs without BatchNorm, mse and kd: 2 x 4 images per step give one process's 8."""
    one, rank0 = ddp_matches_one_process("lightning", tmp_path)
    logged, expected = rank0["history"][0], one["history"][0]
    assert {"train/task_loss_step", "train/feature_step", "train/logits_step", "train/loss_step"} <= logged.keys()
    assert logged == pytest.approx(expected, rel=1e-5)  # each term averaged over both processes (sync_dist)


@pytest.mark.integration
def test_weight_auto_calibrates_against_the_task_loss_and_checkpoints_its_factor(tmp_path):
    levels = [Level("net.4", "4", "kd", tau=2.0, weight="auto", ratio=0.5, window=1, name="logits")]
    wrapped = module(levels)
    x, y = loader(16, batch=16).dataset.tensors
    with torch.no_grad():  # the first step's batch is the whole set: the window (1 step) sees these
        s, t = wrapped.student(x), wrapped.distiller.teacher(x)
    task = F.cross_entropy(s, y)
    kd = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    run = trainer(tmp_path, max_steps=1)
    run.fit(wrapped, loader(16, batch=16))
    factor = wrapped.distiller.auto_weights()["logits"]
    assert factor == pytest.approx(0.5 * task.item() / kd.item(), rel=1e-4)
    logged = run.callback_metrics
    assert logged["train/logits_step"].item() == pytest.approx(0.5 * task.item(), rel=1e-4)  # the window's own step
    assert logged["train/auto_weight/logits"].item() == pytest.approx(factor)
    run.save_checkpoint(tmp_path / "auto.ckpt")
    state = torch.load(tmp_path / "auto.ckpt", weights_only=False)["state_dict"]
    assert state["weighting.factors"].tolist() == pytest.approx([factor]) and state["weighting.fixed"].tolist() == [True]


def test_only_the_steps_the_student_has_are_steps_of_the_wrapper():
    from lightning.pytorch.utilities.model_helpers import is_overridden

    class TrainOnly(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = cnn(4)

        def forward(self, x):
            return self.net(x)

    bare, full = module(student=TrainOnly()), module()
    assert not is_overridden("validation_step", bare) and not is_overridden("test_step", bare)
    assert is_overridden("validation_step", full) and is_overridden("training_step", bare)


@pytest.mark.integration
def test_the_methods_schedules_follow_the_trainers_progress(tmp_path, monkeypatch):
    wrapped = module()
    seen = record_progress(monkeypatch)
    trainer(tmp_path, max_steps=6).fit(wrapped, loader())  # 16 items, batches of 4: 4 steps an epoch, 2 epochs
    assert seen == [(0.0, 2), (0.25, 2), (0.5, 2), (0.75, 2), (1.0, 2), (1.25, 2)]  # before each step


def test_a_teacher_sharing_a_module_with_the_student_or_being_part_of_it_is_refused():
    teacher, student = frozen(cnn(8)), LitStudent(width=8)
    student.net[0] = teacher[0]
    levels = [Level("net.4", "4", "kd")]
    with pytest.raises(ValueError) as exc:
        DistillationModule(student, teacher, levels, task_loss=F.cross_entropy, input_shape=(3, SIZE, SIZE))
    assert "the teacher's module '0' is the student's module 'net.0'" in one_line(exc)
    student = LitStudent(width=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before the warning that it would be frozen
        with pytest.raises(ValueError) as exc:
            DistillationModule(student, student.net, [Level("net.4", "4", "kd")], task_loss=F.cross_entropy,
                               input_shape=(3, SIZE, SIZE))
    assert one_line(exc).startswith("the teacher is the student's module 'net':")
    assert all(p.requires_grad for p in student.parameters())  # nothing was frozen


class WithOwnStep(LitStudent):
    """A student with its own training_step that adds a term beyond the cross-entropy, and logs."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y) + 0.5 * self.net[0].weight.pow(2).sum()
        self.log("own_term", loss.detach())
        return {"loss": loss}


@pytest.mark.integration
def test_the_students_own_training_step_gives_the_task_loss_its_extra_term_kept(tmp_path):
    levels = [Level("net.4", "4", "kd", tau=2.0, weight=0.5, name="logits")]
    torch.manual_seed(0)
    wrapped = DistillationModule(WithOwnStep(), frozen(cnn(8)), levels, input_shape=(3, SIZE, SIZE))
    x, y = next(iter(loader()))
    with torch.no_grad():
        s, t = wrapped.student(x), wrapped.distiller.teacher(x)
        own = F.cross_entropy(s, y) + 0.5 * wrapped.student.net[0].weight.pow(2).sum()
    kd = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    run = trainer(tmp_path, max_steps=1)
    run.fit(wrapped, loader())
    logged = run.callback_metrics
    assert logged["train/task_loss_step"].item() == pytest.approx(own.item(), rel=1e-5)
    assert logged["own_term"].item() == pytest.approx(own.item(), rel=1e-5)  # the student's own log, kept
    assert logged["train/loss_step"].item() == pytest.approx((own + 0.5 * kd).item(), rel=1e-5)


def test_a_task_loss_is_given_once_and_must_be_a_loss():
    with pytest.raises(ValueError) as exc:
        DistillationModule(WithOwnStep(), frozen(cnn(8)), [Level("net.4", "4", "kd")], task_loss=F.cross_entropy,
                           input_shape=(3, SIZE, SIZE))
    assert "has its own training_step, whose loss is the task loss here: drop task_loss=" in one_line(exc)
    with pytest.raises(ValueError) as exc:
        DistillationModule(LitStudent(), frozen(cnn(8)), [Level("net.4", "4", "kd")], input_shape=(3, SIZE, SIZE))
    assert "give task_loss=fn(student_output, targets)" in one_line(exc)
    x, y = next(iter(loader()))
    wrapped = module(task_loss=lambda output, targets: None)
    with pytest.raises(ValueError) as exc:
        wrapped.distiller(x, y)
    assert "the task_loss function returned NoneType; it must return the task loss" in one_line(exc)

    class TwoForwards(LitStudent):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y) + F.cross_entropy(self(x.flip(3)), y)

    class NoLoss(LitStudent):
        def training_step(self, batch, batch_idx):
            self(batch[0])

    for student, expected in ((TwoForwards(), "ran its forward 2 times"), (NoLoss(), "returned NoneType")):
        wrapped = DistillationModule(student, frozen(cnn(8)), [Level("net.4", "4", "kd")], input_shape=(3, SIZE, SIZE))
        wrapped._current_fx_name = "training_step"
        with pytest.raises(ValueError) as exc:
            wrapped._distil_own_step((x, y), 0, x, y, None)
        assert expected in one_line(exc)
