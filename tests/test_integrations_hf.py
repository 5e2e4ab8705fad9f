"""DistillationTrainer: the Hugging Face Trainer distilling its student, checked against formulas and plain runs."""
from __future__ import annotations

import importlib
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset

import diffkd
from conftest import ddp_matches_one_process, one_line, record_progress
from diffkd import Level
from diffkd.integrations.transformers import INDEX_COLUMN, DISTILLER_FILE, DistillationTrainer

CLASSES = 3


def vit(layers: int, width: int) -> transformers.ViTForImageClassification:
    config = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=width, num_hidden_layers=layers,
                                    num_attention_heads=2, intermediate_size=2 * width, num_labels=CLASSES)
    return transformers.ViTForImageClassification(config)


class Pictures(Dataset):
    """Fixed random 16x16 images as dict items; `label` names the label column, `indices` adds each item's index."""

    def __init__(self, n: int = 16, label: str = "labels", indices: bool = False, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
        self.label, self.indices = label, indices

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        item = {"pixel_values": self.x[i], self.label: self.y[i]}
        return {**item, INDEX_COLUMN: i} if self.indices else item


class Net(nn.Module):
    """A small CNN called as a Hugging Face model is: net(pixel_values=..., labels=...) -> {"loss", "logits"}."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, CLASSES)

    def forward(self, pixel_values, labels=None):
        logits = self.head(self.body(pixel_values))
        return {"logits": logits} if labels is None else {"loss": F.cross_entropy(logits, labels), "logits": logits}


def arguments(tmp_path: Path, **options) -> transformers.TrainingArguments:
    defaults = dict(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=2, report_to=[],
                    use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1, seed=0)
    return transformers.TrainingArguments(**{**defaults, **options})


def frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("teacher,levels,message", [
    (None, [Level("head", "head", "kd")], "got levels but no teacher"),
    ("net", None, "got a teacher but no levels"),
    ("net", [], "got a teacher but no levels"),
    (None, None, "needs teacher=... .* and levels="),
])
def test_a_teacher_and_levels_come_together(tmp_path, teacher, levels, message):
    teacher = Net(8) if teacher else None
    with pytest.raises(ValueError, match=message) as exc:
        DistillationTrainer(model=Net(4), teacher=teacher, levels=levels, args=arguments(tmp_path), train_dataset=Pictures())
    one_line(exc)


def test_a_student_output_the_levels_cannot_tap(tmp_path):
    with pytest.raises(ValueError, match=r"tap 'kd_output' \(path '' = the model, output\) produced a dict .*choose one "
                                         r"with select") as exc:  # the student returns {"loss", "logits"}
        DistillationTrainer(model=Net(4), teacher=frozen(Net(8)), levels=[Level("", "", "kd")], args=arguments(tmp_path),
                            train_dataset=Pictures())
    one_line(exc)


def test_remove_unused_columns_dropping_the_indices_a_method_needs(tmp_path):
    levels = [Level("head", "head", "crd", feat_dim=8, negatives=4)]
    with pytest.raises(ValueError, match=r"level 'crd_head' needs the batch's dataset indices in column 'indices', .*"
                                         r"remove_unused_columns=True\) drops it .*pass remove_unused_columns=False") as exc:
        DistillationTrainer(model=Net(4), teacher=frozen(Net(8)), levels=levels, args=arguments(tmp_path),
                            train_dataset=Pictures(indices=True))
    one_line(exc)
    with pytest.raises(ValueError, match="add an 'indices' column"):
        DistillationTrainer(model=Net(4), teacher=frozen(Net(8)), levels=levels,
                            args=arguments(tmp_path, remove_unused_columns=False), train_dataset=Pictures())
    trainer = DistillationTrainer(model=Net(4), teacher=frozen(Net(8)), levels=levels,
                                  args=arguments(tmp_path, remove_unused_columns=False), train_dataset=Pictures(indices=True))
    assert trainer.distiller.needs_indices  # kept, and taken out of the student's inputs (Net takes no indices)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert torch.isfinite(trainer.compute_loss(trainer.distiller, batch))


def test_remove_unused_columns_dropping_the_labels_a_method_needs(tmp_path):
    with pytest.raises(ValueError, match=r"level 'dkd_head' needs the batch's targets in column 'labels', .*"
                                         r"remove_unused_columns=True\) dropped the dataset's column\(s\) 'target' "
                                         r"\(not arguments of the student's forward\); name the label column 'labels'") as exc:
        DistillationTrainer(model=Net(4), teacher=frozen(Net(8)), levels=[Level("head", "head", "dkd")],
                            args=arguments(tmp_path), train_dataset=Pictures(label="target"))
    one_line(exc)


def test_a_teacher_in_training_mode_requiring_grad_is_frozen_and_said_so(tmp_path):
    teacher = Net(8)
    with pytest.warns(UserWarning, match=r"the teacher was in training mode and had \d+ parameters requiring grad; it "
                                         r"is frozen .* as the Distiller does"):
        trainer = DistillationTrainer(model=Net(4), teacher=teacher, levels=[Level("head", "head", "kd")],
                                      args=arguments(tmp_path), train_dataset=Pictures())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    trainer.distiller.train()
    assert not teacher.training
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a frozen teacher in eval mode: nothing to say
        DistillationTrainer(model=Net(4), teacher=frozen(Net(8)), levels=[Level("head", "head", "kd")],
                            args=arguments(tmp_path), train_dataset=Pictures())


def test_a_teacher_that_takes_no_keywords_needs_teacher_inputs(tmp_path):
    teacher = frozen(nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, CLASSES)))
    with pytest.raises(ValueError, match=r"the teacher's forward takes no 'pixel_values' .*pass teacher_inputs=") as exc:
        DistillationTrainer(model=Net(4), teacher=teacher, levels=[Level("head", "3", "kd")], args=arguments(tmp_path),
                            train_dataset=Pictures())
    one_line(exc)
    trainer = DistillationTrainer(model=Net(4), teacher=teacher, levels=[Level("head", "3", "kd")], args=arguments(tmp_path),
                                  train_dataset=Pictures(), teacher_inputs=lambda batch: batch["pixel_values"])
    assert trainer.distiller.teacher_taps.taps["kd_head"].path == "3"


@pytest.mark.parametrize("module,extra", [("transformers", "diffkd[hf]"), ("lightning", "diffkd[lightning]")])
def test_a_missing_framework_is_one_line_naming_the_extra(monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import of it fails
    monkeypatch.delitem(sys.modules, f"diffkd.integrations.{module}", raising=False)
    with pytest.raises(ImportError) as exc:
        importlib.import_module(f"diffkd.integrations.{module}")
    assert one_line(exc) == f"diffkd.integrations.{module} needs {module}: pip install {extra}"


def test_a_transformers_older_than_the_trainer_api_it_relies_on_is_refused(monkeypatch):
    monkeypatch.delattr(transformers.Trainer, "loss_is_scaled_for_ga")  # added in transformers 5.19
    monkeypatch.delitem(sys.modules, "diffkd.integrations.transformers")
    with pytest.raises(ImportError, match=r"needs transformers >= 5.19, found .*: pip install -U 'transformers>=5.19'$") as exc:
        importlib.import_module("diffkd.integrations.transformers")
    one_line(exc)


# ----------------------------------------------------------------------------- the loss, by formula
def test_the_loss_is_the_students_own_plus_the_weighted_terms_and_evaluation_sees_the_student_alone(tmp_path):
    torch.manual_seed(0)
    student, teacher = Net(4), frozen(Net(8))
    trainer = DistillationTrainer(model=student, teacher=teacher, levels=[Level("head", "head", "kd", tau=2.0, weight=0.5)],
                                  args=arguments(tmp_path), train_dataset=Pictures())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    x, y = batch["pixel_values"], batch["labels"]
    s, t = student(x)["logits"], teacher(x)["logits"]
    kd = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    expected = F.cross_entropy(s, y) + 0.5 * kd
    assert trainer.compute_loss(trainer.distiller, dict(batch)).item() == pytest.approx(expected.item(), rel=1e-5)
    assert trainer.compute_loss(trainer.model, dict(batch)).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    logs = {"loss": 0.0}
    trainer.log(logs)
    assert logs["task_loss"] == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-5)
    assert logs["distill/kd_head"] == pytest.approx(0.5 * kd.item(), rel=1e-5)


def test_an_optimizer_given_without_the_method_modules_is_refused(tmp_path):
    student = Net(4)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    trainer = DistillationTrainer(model=student, teacher=frozen(Net(8)), levels=[Level("body", "body", "mse")],
                                  args=arguments(tmp_path), train_dataset=Pictures(), optimizers=(optimizer, None))
    with pytest.raises(ValueError, match="does not cover the method modules") as exc:
        trainer.train()
    one_line(exc)


# ----------------------------------------------------------------------------- training end to end
def vit_trainer(tmp_path: Path, **options) -> DistillationTrainer:
    torch.manual_seed(0)
    levels = [Level("@feature", "@feature", "mse", name="tokens"), Level("@logits", "@logits", "kd", name="logits")]
    return DistillationTrainer(model=vit(1, 16), teacher=frozen(vit(2, 32)), levels=levels,
                               args=arguments(tmp_path, **options), train_dataset=Pictures(), eval_dataset=Pictures(8, seed=1))


@pytest.mark.integration
def test_training_logs_each_term_checkpoints_the_methods_and_saves_the_student_alone(tmp_path):
    trainer = vit_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-3)
    assert trainer.distiller.student_taps.taps["tokens"].path == "vit.layernorm"  # @feature probed on the first items
    teacher_before = {k: v.clone() for k, v in trainer.distiller.teacher.state_dict().items()}
    methods_before = {k: v.clone() for k, v in trainer.distiller.methods.state_dict().items()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    for log in logs:  # the logged loss is the task loss plus the weighted terms
        assert log["loss"] == pytest.approx(log["task_loss"] + log["distill/tokens"] + log["distill/logits"], rel=1e-5)
    assert all(torch.equal(v, trainer.distiller.teacher.state_dict()[k]) for k, v in teacher_before.items())
    methods = trainer.distiller.methods.state_dict()
    assert any(not torch.equal(v, methods[k]) for k, v in methods_before.items())  # optimised
    saved = torch.load(tmp_path / "run" / "checkpoint-4" / DISTILLER_FILE, weights_only=True)["state"]
    assert saved.keys() == {f"methods.{k}" for k in methods}  # fixed weights: no weighting state
    assert all(torch.equal(saved[f"methods.{k}"], v) for k, v in methods.items())

    trainer.save_model(str(tmp_path / "student"))
    assert not (tmp_path / "student" / DISTILLER_FILE).exists()
    keys = set(load_file(tmp_path / "student" / "model.safetensors"))
    assert len(keys) == len(trainer.model.state_dict())  # the student's tensors alone (named as transformers saves them)
    assert not any(k.startswith(("methods.", "student.", "teacher")) for k in keys)
    loaded = transformers.ViTForImageClassification.from_pretrained(tmp_path / "student")
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in loaded.state_dict().items())

    metrics = trainer.evaluate()  # the student alone: its own loss on the eval set
    eval_set = trainer.eval_dataset
    with torch.no_grad():
        expected = loaded(pixel_values=eval_set.x, labels=eval_set.y).loss
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)


def cnn_trainer(tmp_path: Path, **options) -> DistillationTrainer:
    torch.manual_seed(0)
    levels = [Level("body.0", "body.0", "mse", name="maps"), Level("head", "head", "kd", name="logits")]
    return DistillationTrainer(model=Net(4), teacher=frozen(Net(8)), levels=levels, args=arguments(tmp_path, **options),
                               train_dataset=Pictures())


@pytest.mark.integration
@pytest.mark.parametrize("build", [cnn_trainer, vit_trainer], ids=["torch-student", "vit-student"])
def test_resume_from_checkpoint_restores_the_method_modules(tmp_path, build):
    """The ViT student too, which transformers 5.25's own resume leaves partly unloaded (it misnames its layers)."""
    whole = build(tmp_path / "whole", max_steps=4, save_strategy="steps", save_steps=2, learning_rate=0.1)
    whole.train()
    resumed = build(tmp_path / "whole", max_steps=4, save_strategy="no", learning_rate=0.1,
                    output_dir=str(tmp_path / "resumed"))
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "run" / "checkpoint-2"))
    for part in ("methods", "student"):
        a, b = getattr(whole.distiller, part).state_dict(), getattr(resumed.distiller, part).state_dict()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), part

    saved = tmp_path / "whole" / "run" / "checkpoint-2" / DISTILLER_FILE
    written = torch.load(saved, weights_only=True)
    assert written["format"] == 1 and written["diffkd_version"] == diffkd.__version__
    torch.save(written["state"], saved)  # as an earlier diffkd wrote it: the bare state dict
    with pytest.raises(ValueError) as exc:
        build(tmp_path / "earlier", max_steps=4).train(resume_from_checkpoint=str(saved.parent))
    assert "was written by an earlier diffkd (no format number)" in one_line(exc)
    saved.write_bytes(saved.read_bytes()[:100])  # truncated, as by a full disk
    with pytest.raises(ValueError) as exc:
        build(tmp_path / "again", max_steps=4).train(resume_from_checkpoint=str(saved.parent))
    assert "truncated, corrupt or incomplete" in one_line(exc) and "weights_only" not in str(exc.value)
    saved.unlink()
    with pytest.raises(ValueError, match=f"{DISTILLER_FILE} is missing: resume_from_checkpoint needs a checkpoint "
                                                "written by DistillationTrainer") as exc:
        build(tmp_path / "again", max_steps=4).train(resume_from_checkpoint=str(tmp_path / "whole" / "run" / "checkpoint-2"))
    one_line(exc)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_two_gloo_processes_under_torchrun_match_one_process_with_the_same_global_batch(tmp_path):
    """CNNs without BatchNorm, deterministic methods (mse, kd): 2 x 4 images per step give one process's 8."""
    one, rank0 = ddp_matches_one_process("hf", tmp_path)
    logged = [{k: v for k, v in h.items() if k.startswith(("distill/", "task_loss"))} for h in rank0["history"] if "loss" in h]
    expected = [{k: v for k, v in h.items() if k.startswith(("distill/", "task_loss"))} for h in one["history"] if "loss" in h]
    assert len(logged) == 3 and logged[0].keys() == {"task_loss", "distill/feature", "distill/logits"}
    for a, b in zip(logged, expected):  # each term averaged over both processes is the one-process term
        assert a == pytest.approx(b, rel=1e-5)
    json.dumps(logged)  # plain floats, as the Trainer's loggers need


@pytest.mark.integration
def test_weight_auto_calibrates_against_the_students_own_loss_and_resumes_its_factor(tmp_path):
    torch.manual_seed(0)
    student, teacher, data = Net(4), frozen(Net(8)), Pictures(8)
    with torch.no_grad():  # the first step's batch is the whole set: the window (1 step) sees these
        s, t = student(data.x)["logits"], teacher(data.x)["logits"]
    task = F.cross_entropy(s, data.y)
    kd = F.kl_div(F.log_softmax(s / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4
    levels = [Level("head", "head", "kd", tau=2.0, weight="auto", ratio=0.5, window=1, name="logits")]
    options = dict(per_device_train_batch_size=8, max_steps=2, save_strategy="steps", save_steps=1, learning_rate=0.1)
    trainer = DistillationTrainer(model=student, teacher=teacher, levels=levels, args=arguments(tmp_path, **options),
                                  train_dataset=data)
    trainer.train()
    factor = trainer.distiller.auto_weights()["logits"]
    assert factor == pytest.approx(0.5 * task.item() / kd.item(), rel=1e-4)
    first, second = [h for h in trainer.state.log_history if "loss" in h]
    assert first["distill/logits"] == pytest.approx(0.5 * task.item(), rel=1e-4)  # the window's step uses its factor
    assert first["loss"] == pytest.approx(first["task_loss"] + first["distill/logits"], rel=1e-4)
    assert first["auto_weight/logits"] == second["auto_weight/logits"] == pytest.approx(factor)
    assert second["distill/logits"] > 0
    saved = torch.load(tmp_path / "run" / "checkpoint-1" / DISTILLER_FILE, weights_only=True)["state"]
    assert saved["weighting.factors"].tolist() == pytest.approx([factor]) and saved["weighting.fixed"].tolist() == [True]

    torch.manual_seed(0)
    resumed = DistillationTrainer(model=Net(4), teacher=frozen(Net(8)), levels=levels, train_dataset=data,
                                  args=arguments(tmp_path, **{**options, "output_dir": str(tmp_path / "resumed")}))
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert resumed.distiller.auto_weights()["logits"] == pytest.approx(factor)  # kept, not recalibrated


@pytest.mark.integration
def test_the_methods_schedules_follow_the_trainers_progress(tmp_path, monkeypatch):
    trainer = cnn_trainer(tmp_path, max_steps=6)  # 16 items, batches of 4: 4 steps an epoch, 2 epochs
    seen = record_progress(monkeypatch)
    trainer.train()
    assert seen == [(0.0, 2), (0.25, 2), (0.5, 2), (0.75, 2), (1.0, 2), (1.25, 2)]  # before each step


def test_a_teacher_sharing_a_module_with_the_student_or_being_it_is_refused(tmp_path):
    teacher, student = frozen(vit(2, 16)), vit(1, 16)
    student.vit.embeddings = teacher.vit.embeddings  # a user's shortcut: reuse the teacher's embeddings
    levels = [Level("@logits", "@logits", "kd")]
    with pytest.raises(ValueError) as exc:
        DistillationTrainer(model=student, teacher=teacher, levels=levels, args=arguments(tmp_path), train_dataset=Pictures())
    assert "the teacher's module 'vit.embeddings' is the student's module 'vit.embeddings'" in one_line(exc)
    student = vit(1, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before the warning that it would be frozen
        with pytest.raises(ValueError) as exc:
            DistillationTrainer(model=student, teacher=student, levels=levels, args=arguments(tmp_path),
                                train_dataset=Pictures())
    assert one_line(exc).startswith("the teacher is the student:")
    assert all(p.requires_grad for p in student.parameters())  # nothing was frozen
