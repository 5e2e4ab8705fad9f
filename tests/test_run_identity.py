"""Issue 22, the silent cases: a resumed run refuses another training set or teacher, and never trains
nothing while reporting success; distill checks the teacher run's class names against the data's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import diffkd
from test_image_folder import write_image_folder

from diffkd.config import ConfigError, config_from_dict
from diffkd.engine import load_checkpoint, run
from diffkd.engine.identity import dataset_identity, weights_digest
from diffkd.models.weights import file_sha256

pytestmark = pytest.mark.integration


def folder_config(tmp_path: Path, root: Path, *, name: str = "run", mode: str = "train", epochs: int = 1,
                  **sections: Any) -> Any:
    """resnet8 at 32x32 on an image folder, batch 3, on CPU, quietly."""
    data: dict[str, Any] = {
        "data": {"name": "image_folder", "root": str(root), "image_size": 32, "batch_size": 3},
        "optim": {"lr": 0.01},
        "train": {"epochs": epochs, "device": "cpu", "progress": False},
        "output": {"dir": str(tmp_path / name), "tensorboard": False},
        **sections,
    }
    if mode == "train":
        data["model"] = {"name": "resnet8"}
    return config_from_dict(data)


def distill_sections(teacher: Path | str) -> dict[str, Any]:
    return {
        "teacher": {"name": "resnet8", "checkpoint": str(teacher)},
        "student": {"name": "resnet8"},
        "levels": [{"student": "@logits", "teacher": "@logits", "method": "kd"}],
    }


# ------------------------------------------------------------------------------------ case 1: another training set


def test_resume_on_another_training_set_is_refused_and_a_moved_one_accepted(tmp_path: Path, caplog) -> None:
    big = write_image_folder(tmp_path / "big", per_class=4)  # 12 train images: 4 steps of 3
    small = write_image_folder(tmp_path / "small", per_class=1)  # 3 train images: 1 step
    run(folder_config(tmp_path, big), mode="train")
    last = tmp_path / "run" / "last.pt"
    before = last.read_bytes()
    with pytest.raises(ConfigError) as err:
        run(folder_config(tmp_path, small, epochs=2), mode="train", resume=True)
    message = str(err.value)
    assert message.startswith(f"cannot resume {tmp_path / 'run'}: what it trains on changed since last.pt: ")
    assert "the training set's size (12, now 3)" in message and "\n" not in message
    assert last.read_bytes() == before  # nothing was trained or written

    moved = tmp_path / "elsewhere" / "big"
    shutil.copytree(big, moved)  # the same files in another place: the same training set
    result = run(folder_config(tmp_path, moved, epochs=2), mode="train", resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2] and result.history[-1]["lr"] == 0.01
    ckpt = load_checkpoint(last)
    assert ckpt["step"] == 8 and ckpt["identity"]["train_set"]["items"] == 12
    recorded = json.loads((tmp_path / "run" / "identity.json").read_text())
    assert recorded == {**ckpt["identity"], "diffkd_version": diffkd.__version__} and recorded["teacher"] is None

    with caplog.at_level("INFO", logger="diffkd"):  # a finished run is reread (batch jobs do), saying so
        again = run(folder_config(tmp_path, moved, epochs=2), mode="train", resume=True)
    assert "the run already holds all 2 epochs: nothing left to train" in caplog.text
    assert again.history == result.history and load_checkpoint(last)["step"] == 8

    (big / "train" / "fox" / "0.bmp").rename(big / "train" / "fox" / "9.bmp")  # same size, another file list
    with pytest.raises(ConfigError, match=r"the training set's file list \(digest\) \([0-9a-f]{12}, now [0-9a-f]{12}\)"):
        run(folder_config(tmp_path, big, epochs=3), mode="train", resume=True)
    with pytest.raises(ConfigError, match=r"train.epochs=1 but last.pt already holds 2 epochs; give train.epochs=2"):
        run(folder_config(tmp_path, moved, epochs=1), mode="train", resume=True)


def test_a_resume_whose_schedule_has_no_steps_left_is_refused(tmp_path: Path) -> None:
    """A checkpoint that records no identity (as older ones) still cannot resume where its schedule cannot go on."""
    big = write_image_folder(tmp_path / "big", per_class=4)
    small = write_image_folder(tmp_path / "small", per_class=1)
    run(folder_config(tmp_path, big), mode="train")
    last = tmp_path / "run" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["identity"], ckpt["train_items"]
    torch.save(ckpt, last)
    with pytest.raises(ConfigError) as err:
        run(folder_config(tmp_path, small, epochs=2), mode="train", resume=True)
    assert str(err.value) == (
        f"cannot resume {tmp_path / 'run'}: last.pt stopped after 1 epoch(s) at global step 4, but the training data "
        "now gives 1 steps per epoch, so the schedule would not go on from where it stopped; resume with the run's "
        "data and data.batch_size, or start afresh with --force"
    )


def test_dataset_identity_of_an_image_folder(tmp_path: Path) -> None:
    from diffkd.data import build_dataset

    root = write_image_folder(tmp_path / "pets", per_class=2)
    split = build_dataset("image_folder", "train", root, image_size=16)
    identity = dataset_identity(split, ["cat", "dog", "fox"])
    import hashlib

    lines = sorted(f"{c}/{i}.{fmt}\t{label}" for label, (c, fmt) in enumerate(zip(("cat", "dog", "fox"), ("png", "tiff", "bmp")))
                   for i in range(2))  # fmt: skip
    assert identity == {"items": 6, "classes": ["cat", "dog", "fox"],
                        "files_sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest()}  # fmt: skip


# ------------------------------------------------------------------------------------ case 2: the teacher changed


def test_weights_digest_follows_values_not_layout() -> None:
    from diffkd import models

    torch.manual_seed(0)
    a = models.create("resnet8", num_classes=3)
    b = models.create("resnet8", num_classes=3)
    b.load_state_dict(a.state_dict())
    assert weights_digest(a) == weights_digest(b)
    assert weights_digest(a) == weights_digest(a.to(memory_format=torch.channels_last))
    with torch.no_grad():
        next(b.parameters())[0].add_(1e-3)
    assert weights_digest(a) != weights_digest(b)


def test_resume_after_the_teacher_changed_is_refused_and_config_names_the_teachers_file(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets")
    teacher_cfg = folder_config(tmp_path, root, name="teacher")
    run(teacher_cfg, mode="train")
    student = folder_config(tmp_path, root, name="student", mode="distill", **distill_sections(tmp_path / "teacher"))
    run(student, mode="distill")
    best = tmp_path / "teacher" / "best.pt"
    saved = yaml.safe_load((tmp_path / "student" / "config.yaml").read_text())
    assert saved["teacher"]["sha256"] == file_sha256(best)  # not null: the file the run read
    identity = load_checkpoint(tmp_path / "student" / "last.pt")["identity"]["teacher"]
    assert identity["checkpoint"] == str(best) and identity["file_sha256"] == file_sha256(best)

    moved = tmp_path / "kept" / "teacher.pt"  # the same weights elsewhere, as a plain state dict: the same teacher
    moved.parent.mkdir()
    weights = load_checkpoint(best)["model"]
    torch.save(weights, moved)
    resumed = folder_config(tmp_path, root, name="student", mode="distill", epochs=2, **distill_sections(moved))
    assert [r["epoch"] for r in run(resumed, mode="distill", resume=True).history] == [1, 2]

    run(folder_config(tmp_path, root, name="teacher", train={"epochs": 1, "device": "cpu", "progress": False,
                                                              "seed": 7}), mode="train", force=True)  # fmt: skip
    before = (tmp_path / "student" / "last.pt").read_bytes()
    again = folder_config(tmp_path, root, name="student", mode="distill", epochs=3,
                          **distill_sections(tmp_path / "teacher"))  # fmt: skip
    with pytest.raises(ConfigError) as err:
        run(again, mode="distill", resume=True)
    message = str(err.value)
    assert message.startswith(f"cannot resume {tmp_path / 'student'}: what it trains on changed since last.pt: "
                              "the teacher's weights (digest ")  # fmt: skip
    assert f"from {moved}, now " in message and f"from {best})" in message
    assert (tmp_path / "student" / "last.pt").read_bytes() == before


# ------------------------------------------------------------------------------------ case 3: the teacher's classes


def test_distill_refuses_a_teacher_trained_on_other_classes(tmp_path: Path) -> None:
    shapes = write_image_folder(tmp_path / "shapes", classes=("square", "triangle", "zz_circle"))
    data = write_image_folder(tmp_path / "data", classes=("circle", "square", "triangle"))
    run(folder_config(tmp_path, shapes, name="teacher"), mode="train")
    cfg = folder_config(tmp_path, data, name="student", mode="distill", **distill_sections(tmp_path / "teacher"))
    with pytest.raises(ConfigError) as err:
        run(cfg, mode="distill")
    assert str(err.value) == (
        f"data.root {str(data)!r} has other classes than the teacher's run in {tmp_path / 'teacher'} (missing "
        "['zz_circle'], not in the teacher's run ['circle']); its 3 classes are listed in "
        f"{tmp_path / 'teacher' / 'classes.json'}; distil on the classes the teacher was trained on"
    )
    assert not (tmp_path / "student").exists()
    same = folder_config(tmp_path, shapes, name="student", mode="distill", **distill_sections(tmp_path / "teacher"))
    assert run(same, mode="distill").history  # the teacher's own classes are accepted
