"""The `diffkd` command end to end (train, distill, eval, export) on a small slice of Fashion-MNIST."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffkd import models
from diffkd.cli import COMMANDS, main
from diffkd.engine import evaluated_weights, load_checkpoint

CONFIGS = Path(__file__).parent.parent / "configs" / "fashion_mnist"
SMALL = [
    "data.limit_train=64",
    "data.limit_test=64",
    "data.batch_size=32",
    "train.epochs=1",
    "train.device=cpu",
    "output.tensorboard=false",
]


def _have_fashion_mnist() -> bool:
    from diffkd.data import build_dataset

    try:
        build_dataset("fashion_mnist", "test", limit=1)
    except (FileNotFoundError, ValueError):
        return False
    return True


needs_fmnist = pytest.mark.skipif(not _have_fashion_mnist(), reason="Fashion-MNIST is not installed")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_has_useful_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: diffkd {command}" in text and "example:" in text and f"diffkd {command} " in text


def test_python_m_diffkd_lists_the_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "diffkd", "--help"], capture_output=True, text=True, check=True).stdout
    assert all(name in out for name in ("train", "distill", "eval", "export"))


@needs_fmnist
def test_train_distill_eval_export(tmp_path: Path, capsys) -> None:
    teacher_dir, student_dir = tmp_path / "teacher", tmp_path / "diffkd"
    assert main(["train", str(CONFIGS / "teacher.yaml"), *SMALL, "--out", str(teacher_dir)]) == 0
    assert "train done: best top1" in capsys.readouterr().out

    # the shipped DiffKD config (feature map MSE + logits KL), its teacher being the run just made
    assert (
        main(
            [
                "distill",
                str(CONFIGS / "diffkd.yaml"),
                "--out",
                str(student_dir),
                f"teacher.checkpoint={teacher_dir}",
                *SMALL,
            ]
        )
        == 0
    )
    assert "distill done" in capsys.readouterr().out
    ckpt = load_checkpoint(student_dir / "best.pt")
    assert ckpt["mode"] == "distill" and any(k.startswith("methods.") for k in ckpt["model"])

    assert main(["eval", str(student_dir), "--limit", "64"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("top1 ") and "top5 " in line and "on 64 test images" in line
    assert float(line.split()[1]) == pytest.approx(ckpt["history"][-1]["test_top1"], abs=0.01)

    out = tmp_path / "exported" / "student.pt"
    assert main(["export", str(student_dir), str(out)]) == 0
    weights = torch.load(out, weights_only=True)
    student = models.create("fmnist_student", num_classes=10)
    student.load_state_dict(weights, strict=True)
    expected = evaluated_weights(ckpt)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)
    before = out.read_bytes()
    assert main(["export", str(student_dir), str(out)]) == 1  # an existing file is never replaced silently
    assert "refusing to overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["export", str(student_dir), str(out), "--force"]) == 0

    assert main(["export", str(teacher_dir)]) == 0  # a train run exports its model
    models.create("fmnist_teacher", num_classes=10).load_state_dict(
        torch.load(teacher_dir / "student.pt", weights_only=True)
    )


@needs_fmnist
def test_run_dir_flags(tmp_path: Path, capsys) -> None:
    args = ["train", str(CONFIGS / "student.yaml"), "--out", str(tmp_path / "s"), *SMALL]
    assert main(args) == 0
    assert main(args) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert main([*args, "--resume", "train.epochs=2"]) == 0  # an override after the flags
    assert load_checkpoint(tmp_path / "s" / "last.pt")["epoch"] == 2
    assert main([*args, "--force"]) == 0
    assert len(list(tmp_path.glob("s.old-*"))) == 1


def test_user_errors_print_one_line(tmp_path: Path, capsys) -> None:
    assert main(["train", str(CONFIGS / "student.yaml"), "optim.lrr=0.1", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "diffkd train: error: unknown key 'optim.lrr'. Did you mean 'optim.lr'? Valid keys in optim: "
        "name, lr, momentum, nesterov, weight_decay, no_decay_norm_bias, eps, alpha, betas"
    )
    assert main(["eval", str(tmp_path / "nowhere")]) == 1
    assert "checkpoint or run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(CONFIGS / "student.yaml"), "--resume", "--force"])
