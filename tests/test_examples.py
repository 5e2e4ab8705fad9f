"""Every script in examples/ runs at its tiny size (--tiny) and prints what it found."""

from __future__ import annotations

import math
import runpy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from test_image_folder import write_image_folder

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str) -> Callable[[list[str]], Any]:
    """The `main` of examples/<name>.py (loaded, not run as __main__)."""
    return runpy.run_path(str(EXAMPLES / f"{name}.py"))["main"]


def test_every_example_is_tested() -> None:
    tested = {"own_loop_image_folder", "sequences_1d", "vit_teacher_cnn_student", "huggingface_model", "hf_trainer",
              "lightning_module"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


@pytest.mark.integration
def test_own_loop_on_an_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_image_folder(tmp_path / "pets", per_class=4)
    accuracy = example("own_loop_image_folder")(["--data", str(root), "--tiny"])
    out = capsys.readouterr().out
    assert "student taps found: {'feature': 'layer3', 'logits': 'fc'}" in out and "step 1: loss" in out
    assert 0 <= accuracy <= 100 and "on 12 images of 3 classes (cat, dog, fox)" in out


@pytest.mark.integration
def test_sequences_1d(capsys: pytest.CaptureFixture[str]) -> None:
    result = example("sequences_1d")(["--tiny"])
    out = capsys.readouterr().out
    assert "student taps: Taps(feature={'path': 'encoder', 'layout': 'sequence'}, logits='fc')" in out
    assert set(result) == {"teacher", "student"} and all(0 <= v <= 100 for v in result.values())


@pytest.mark.integration
def test_vit_teacher_cnn_student(capsys: pytest.CaptureFixture[str]) -> None:
    shapes = example("vit_teacher_cnn_student")(["--tiny"])
    assert shapes == {"teacher": (4, 192, 2, 2), "student": (4, 64, 8, 8)}  # 4 patch tokens folded 2x2
    assert "prefix_tokens=1" in capsys.readouterr().out


@pytest.mark.integration
def test_huggingface_model(capsys: pytest.CaptureFixture[str]) -> None:
    loss = example("huggingface_model")(["--tiny"])
    assert math.isfinite(loss)
    assert "{'tokens': 'vit.layernorm', 'logits': 'classifier'} prefix tokens dropped: 1" in capsys.readouterr().out


@pytest.mark.integration
def test_hf_trainer(capsys: pytest.CaptureFixture[str]) -> None:
    result = example("hf_trainer")(["--tiny"])
    out = capsys.readouterr().out
    assert "student taps: {'tokens': 'vit.layernorm', 'logits': 'classifier'}" in out
    assert {"task_loss", "distill/logits", "distill/tokens/diffusion", "distill/tokens/ae", "distill/tokens/kd"} <= result.keys()
    assert result["reloaded"] == result["student"]  # from_pretrained gives the trained student back
    terms = sum(v for k, v in result.items() if k.startswith("distill/"))
    assert result["loss"] == pytest.approx(result["task_loss"] + terms, rel=1e-4)


@pytest.mark.integration
def test_lightning_module(capsys: pytest.CaptureFixture[str]) -> None:
    result = example("lightning_module")(["--tiny"])
    out = capsys.readouterr().out
    assert "student taps: {'maps': 'net.5', 'logits': 'net.8'}" in out
    assert result["reloaded"] == result["student"]  # the exported student, loaded into a plain LitClassifier
    terms = sum(v for k, v in result.items() if k.startswith("train/") and k.endswith("_epoch")
                and k not in ("train/loss_epoch", "train/task_loss_epoch"))
    assert result["train/loss_epoch"] == pytest.approx(result["train/task_loss_epoch"] + terms, rel=1e-4)
