"""benchmarks/gpu_check.py on the CPU: the cheap module case, the failure handling, and (slow) every case."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import gpu_check  # noqa: E402
from conftest import needs_fmnist  # noqa: E402

HEADER_KEYS = {"device", "device_name", "torch", "cuda", "python", "command", "started", "workdir"}


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_relative_differences_by_hand() -> None:
    got = {"a": torch.tensor([1.0, 2.5]), "b": torch.tensor([0.1])}
    want = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.3])}
    diffs = gpu_check.relative_differences(got, want)
    assert diffs["a"] == pytest.approx(0.5 / 2.0) and diffs["b"] == pytest.approx(0.2 / 1.0)  # scale max(1, |want|)
    with pytest.raises(gpu_check.CheckFailed, match=r"only in one side \['b'\]"):
        gpu_check.relative_differences({"a": got["a"]}, want)


def test_module_fast_path_case_writes_its_json(tmp_path: Path) -> None:
    report = tmp_path / "check.json"
    argv = ["--device", "cpu", "--only", "module_fast_fp32", "--json", str(report), "--workdir", str(tmp_path / "w")]
    assert gpu_check.main(argv) == 0
    data = _read(report)
    assert HEADER_KEYS <= data["header"].keys() and data["header"]["device"] == "cpu"
    assert data["header"]["torch"] == torch.__version__ and data["header"]["command"][-len(argv):] == argv
    (case,) = data["cases"]
    assert (case["name"], case["status"], data["summary"]) == ("module_fast_fp32", "ok", {"ok": 1, "failed": 0, "skipped": 0})
    worst = case["details"]["worst"]
    assert worst.keys() == gpu_check.FAST_PATH_VARIANTS.keys()
    assert all(0 <= w["relative_diff"] <= 1e-5 and w["tensors"] > 20 for w in worst.values())
    assert any(w["relative_diff"] > 0 for w in worst.values())  # the two paths really compute differently


def test_a_failing_case_is_recorded_and_the_rest_still_run(tmp_path: Path, monkeypatch, capsys) -> None:
    """A raising case is recorded as failed with its error; the JSON on disk already says so when the next
    case starts; a case needing it is skipped with the reason; the next independent case runs; exit 1."""
    report = tmp_path / "check.json"
    seen_by_second: list[dict] = []

    def boom(check):
        raise ValueError("boom: the first line\nand a second line")

    real = gpu_check.CASES["module_fast_bf16"].run

    def second(check):
        seen_by_second.append(_read(report))
        return real(check)

    for name, run in (("module_fast_fp32", boom), ("train_fp32", boom), ("module_fast_bf16", second)):
        monkeypatch.setitem(gpu_check.CASES, name, dataclasses.replace(gpu_check.CASES[name], run=run))
    argv = ["--device", "cpu", "--json", str(report), "--workdir", str(tmp_path / "w"),
            "--only", "module_fast_fp32", "module_fast_bf16", "distill_fp32"]  # fmt: skip
    assert gpu_check.main(argv) == 1

    (first,) = seen_by_second[0]["cases"]
    assert first["name"] == "module_fast_fp32" and first["status"] == "failed"
    assert first["error"]["type"] == "ValueError" and first["error"]["message"] == "boom: the first line"
    assert "Traceback" in first["error"]["tail"] and "in boom" in first["error"]["tail"]
    cases = {c["name"]: c for c in _read(report)["cases"]}
    assert list(cases) == ["module_fast_fp32", "module_fast_bf16", "train_fp32", "distill_fp32"]
    assert cases["module_fast_bf16"]["status"] == "ok" and cases["train_fp32"]["status"] == "failed"
    assert cases["distill_fp32"] | {"seconds": 0} == {
        "name": "distill_fp32", "what": cases["distill_fp32"]["what"], "status": "skipped",
        "reason": "needs train_fp32, which did not succeed", "seconds": 0,
    }  # fmt: skip
    assert _read(report)["summary"] == {"ok": 1, "failed": 2, "skipped": 1}
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("module_fast_fp32") and "failed" in line and "ValueError: boom" in line for line in printed)


def test_a_command_that_fails_or_hangs_is_reported_with_its_output(tmp_path: Path) -> None:
    check = gpu_check.Check("cpu", tmp_path, None, timeout=1.0, ddp_procs=1)
    env = dict(os.environ)
    with pytest.raises(gpu_check.CommandFailed, match="^exit status 3: last words$") as failed:
        check.command("fails", [sys.executable, "-c", "print('first'); print('last words'); raise SystemExit(3)"], env)
    assert failed.value.output_tail == "first\nlast words\n"
    with pytest.raises(gpu_check.CommandFailed, match="^timed out after 1 s"):
        check.command("hangs", [sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"], env)
    assert (tmp_path / "logs" / "hangs.log").read_text().endswith("started\n")


def test_only_adds_what_a_case_needs_and_refuses_unknown_names() -> None:
    assert [c.name for c in gpu_check.selected(["eval", "module_compile"])] == [
        "module_compile", "train_fp32", "distill_fp32", "eval"
    ]  # fmt: skip
    with pytest.raises(SystemExit, match="unknown case\\(s\\) evaluate; --list shows the"):
        gpu_check.selected(["evaluate"])


@needs_fmnist
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_every_case_passes_on_the_cpu(tmp_path: Path) -> None:
    """The whole script as a user runs it: every case ok, but fp16 (skipped: needs CUDA)."""
    report = tmp_path / "gpu_check.json"
    command = [sys.executable, str(gpu_check.ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu",
               "--json", str(report), "--workdir", str(tmp_path / "w")]  # fmt: skip
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    data = _read(report)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert HEADER_KEYS <= data["header"].keys()
    cases = {c["name"]: c for c in data["cases"]}
    assert list(cases) == list(gpu_check.CASES)
    skipped = {n: c["reason"] for n, c in cases.items() if c["status"] == "skipped"}
    assert skipped.keys() == {"train_fp16", "distill_fp16"} and all("needs CUDA" in r for r in skipped.values())
    assert all(c["status"] == "ok" and c["details"] and c["seconds"] > 0 for n, c in cases.items() if n not in skipped)
    assert cases["resume"]["details"]["bit_identical"] and cases["resume"]["details"]["max_abs_diff"] == 0
    assert (cases["ddp"]["details"]["processes"], cases["ddp"]["details"]["backend"]) == (2, "gloo")
    assert data["summary"] == {"ok": len(cases) - 2, "failed": 0, "skipped": 2}
