"""The `diffkd` command end to end (train, distill, eval, export) on a small slice of Fashion-MNIST."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import needs_fmnist
from diffkd import models
from diffkd.cli import COMMANDS, main
from diffkd.engine import evaluated_weights, load_checkpoint

from conftest import needs_fmnist

CONFIGS = Path(__file__).parent.parent / "configs" / "fashion_mnist"
SMALL = [
    "data.limit_train=64",
    "data.limit_test=64",
    "data.batch_size=32",
    "train.epochs=1",
    "train.device=cpu",
    "output.tensorboard=false",
]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_has_useful_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: diffkd {command}" in text and "example:" in text and f"diffkd {command} " in text


@pytest.mark.integration
def test_python_m_diffkd_lists_the_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "diffkd", "--help"], capture_output=True, text=True, check=True).stdout
    assert all(name in out for name in ("train", "distill", "eval", "export"))


@pytest.mark.integration
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
    assert main(["export", str(student_dir), str(tmp_path), "--force"]) == 1  # onto a directory
    assert capsys.readouterr().err.strip() == (
        f"diffkd export: error: {tmp_path} is a directory; give the path of a file to write"
    )

    assert main(["export", str(teacher_dir)]) == 0  # a train run exports its model
    models.create("fmnist_teacher", num_classes=10).load_state_dict(
        torch.load(teacher_dir / "student.pt", weights_only=True)
    )


@pytest.mark.integration
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
        "name, lr, momentum, nesterov, weight_decay, no_decay_norm_bias, eps, alpha, betas, methods_lr_scale"
    )
    assert main(["eval", str(tmp_path / "nowhere")]) == 1
    assert "checkpoint or run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", str(CONFIGS / "student.yaml"), "--resume", "--force"])


# ------------------------------------------------------------------------- faults and bad input (issue 15)


def test_an_override_without_equals_is_named_wherever_it_stands(tmp_path: Path, capsys) -> None:
    config = str(CONFIGS / "student.yaml")
    for argv in (
        ["train", config, "--out", str(tmp_path / "x"), "optim.lr"],
        ["train", config, "--out", str(tmp_path / "x"), "train.epochs=1", "optim.lr"],
        ["distill", config, "optim.lr", "--out", str(tmp_path / "x")],
    ):
        assert main(argv) == 1
        assert capsys.readouterr().err.strip() == (
            f"diffkd {argv[0]}: error: override 'optim.lr': expected key=value, e.g. optim.lr=0.05"
        )
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(["train", config, "--out", str(tmp_path / "x"), "--nope"])  # an unknown flag stays argparse's
    assert "unrecognized arguments: --nope" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--batch-size", "-3"), ("--limit", "0"), ("--limit", "-2")])
def test_eval_refuses_non_positive_sizes(tmp_path: Path, capsys, flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(tmp_path), flag, value])
    assert exit_.value.code == 2
    assert f"diffkd eval: error: argument {flag}: must be a positive integer, got '{value}'" in capsys.readouterr().err


@pytest.mark.integration
@needs_fmnist
def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved(tmp_path: Path, capsys, monkeypatch) -> None:
    from diffkd.tasks.classification import ClassificationTask

    def interrupted(self, outputs, targets):
        raise KeyboardInterrupt

    monkeypatch.setattr(ClassificationTask, "loss", interrupted)
    out = tmp_path / "s"
    assert main(["train", str(CONFIGS / "student.yaml"), "--out", str(out), *SMALL]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"diffkd train: interrupted: nothing was saved yet (no checkpoint in {out}); rerunning the same command "
        "starts the run afresh"
    )
    assert not any("Traceback" in line for line in err)


@pytest.mark.integration
@needs_fmnist
@pytest.mark.parametrize("signame,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_mid_training_exits_quietly_and_says_what_was_saved(tmp_path: Path, signame: str, status: int) -> None:
    import signal
    import time

    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "diffkd", "train", str(CONFIGS / "student.yaml"), "--out", str(out), *SMALL,
        "train.epochs=10000", "data.limit_test=32", "train.progress=false",
    ]  # fmt: skip
    # A shell runs background jobs with SIGINT ignored; give the child Python's usual Ctrl-C handling.
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / "last.pt").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # now inside a later epoch (or a checkpoint write)
    child.send_signal(getattr(signal, signame))
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == status, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    saved = load_checkpoint(out / "last.pt")["epoch"]
    how = "interrupted" if signame == "SIGINT" else "interrupted by SIGTERM"
    assert stderr.strip().splitlines()[-1] == (
        f"diffkd train: {how}: last saved epoch {saved} in {out / 'last.pt'}; "
        "rerun the same command with --resume to continue from there"
    )
    assert not list(out.glob(".*.tmp"))  # an interrupted write removes its temporary
