"""The benchmark harnesses at a tiny size: tables and plots are produced and well-formed."""
import csv
import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import accuracy, cost, gpu_cost, integration_overhead  # noqa: E402
from conftest import needs_fmnist  # noqa: E402


def test_accuracy_summary_and_outputs(tmp_path):
    rows = [{"method": m, "seed": s, "top1": v, "seconds": 1.0, "extra": 0}
            for m, vals in {"student alone": [80.0, 82.0], "KD": [83.0, 84.0]}.items() for s, v in enumerate(vals)]
    summary = accuracy.summarize(rows, "student alone")
    kd = summary[1]
    assert kd["mean"] == 83.5 and kd["std"] == pytest.approx(statistics.stdev([83.0, 84.0]))
    assert kd["gain"] == pytest.approx(2.5) and summary[0]["gain"] == 0
    table = accuracy.write_outputs(rows, summary, tmp_path, "title")
    assert "| KD | 83.50 ± 0.71 (2) | +2.50 |" in table
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.integration
def test_every_ladder_and_ablation_entry_builds_a_distiller(tmp_path):
    """Each configured method list is valid for the Fashion-MNIST pair (catches typos in options)."""
    from diffkd import models
    from diffkd.config import config_from_dict
    from diffkd.engine.learner import DistillLearner
    from diffkd.tasks import build_task

    weights = tmp_path / "teacher.pt"
    torch.save(models.create("fmnist_teacher").state_dict(), weights)
    entries = [*accuracy.LADDER.items(), *(item for group in accuracy.ABLATIONS.values() for item in group.items())]
    for name, levels in entries:
        if not levels:
            continue
        cfg = config_from_dict({"teacher": {"name": "fmnist_teacher", "checkpoint": str(weights)}, "student": {"name": "fmnist_student"},
                                "levels": levels})
        d = DistillLearner(cfg, build_task(cfg), dataset_size=6000).module  # CRD's memory bank: one row per item
        out = d(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)), torch.tensor([0, 1, 2, 5999]),
                progress=(0.5, 5))  # as the engine gives every step (the kd warm-up rows need it)
        assert torch.isfinite(out.loss), name


def test_tab8_flops_rows_are_counted():
    params, flops = cost.module_flops(64, 64, 3, None)
    assert params == sum(p.numel() for p in __import__("diffkd").DiffKD(64, 64).parameters())
    assert flops > 0


@pytest.mark.integration
@needs_fmnist
def test_accuracy_ladder_end_to_end_then_a_rerun_rereads_every_run(tmp_path, monkeypatch):
    """The whole harness at a tiny size on real Fashion-MNIST: CSV, table and PNG; the students'
    size flags leave the teacher alone; a rerun with one more seed trains only that seed."""
    from diffkd.demo import DemoSize

    monkeypatch.setitem(accuracy.SIZES, "quick", DemoSize(train_items=256, test_items=128, teacher_epochs=1, student_epochs=1))
    small = {"student alone": [], "KD": accuracy.LADDER["KD"], "DiffKD feature+logits": accuracy.LADDER["DiffKD feature+logits"]}
    monkeypatch.setattr(accuracy, "LADDER", small)
    argv = ["ladder", "--quick", "--device", "cpu", "--out", str(tmp_path), "--train-items", "128"]
    assert accuracy.main([*argv, "--seeds", "1"]) == 0
    out = tmp_path / "ladder-128x1"
    with open(out / "results.csv") as f:
        first = list(csv.DictReader(f))
    assert [r["method"] for r in first] == list(small) and all(0 <= float(r["top1"]) <= 100 for r in first)
    assert (tmp_path / "teacher" / "config.yaml").read_text().count("limit_train: 256") == 1
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "| DiffKD feature+logits |" in (out / "table.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*-seed0/last.pt")}
    assert len(stamps) == 3

    assert accuracy.main([*argv, "--seeds", "2"]) == 0
    with open(out / "results.csv") as f:
        second = list(csv.DictReader(f))
    assert second[:3] == first  # seed 0 reread, not retrained: same figures, same checkpoints
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [r["seed"] for r in second[3:]] == ["1"] * 3

    assert accuracy.main([*argv, "--seeds", "2", "--methods", "KD"]) == 0  # a subset of the rows, reread
    with open(out / "results.csv") as f:
        subset = list(csv.DictReader(f))
    assert subset == [r for r in second if r["method"] == "KD"]
    with pytest.raises(SystemExit):
        accuracy.main([*argv, "--methods", "KDD"])


def test_breakdown_counts_step_flops_and_groups_profiled_time():
    """A KD step's FLOPs equal a count by hand: teacher forward, student forward + weight and input
    gradients (no input gradient for the image), 2 FLOPs per multiply-add."""
    batch = 2
    teacher_macs = 28 * 28 * 32 * 9 * 1 + 14 * 14 * 64 * 9 * 32 + 7 * 7 * 128 * 9 * 64 + 7 * 7 * 256 * 9 * 128 + 256 * 10
    student_convs = [28 * 28 * 8 * 9 * 1, 14 * 14 * 16 * 9 * 8, 7 * 7 * 32 * 9 * 16]
    student_fc = 32 * 10
    student_macs = 3 * (sum(student_convs) + student_fc) - student_convs[0]
    step, _ = cost.make_step(cost.METHODS["kd"], batch, torch.device("cpu"))
    assert cost.step_gflops(step) * 1e9 == 2 * batch * (teacher_macs + student_macs)
    kinds = cost.profile_ms(step, torch.device("cpu"), rounds=1)
    assert kinds["convolutions and matmuls"] > 0 and kinds["batch norms"] > 0
    assert set(kinds) <= set(cost.KINDS.values()) | {"other"}


def test_gpu_targets_are_checked_against_the_issue_limits():
    result = {
        "r34_r18": {"bf16": {"diffkd_b1": {"vs_kd": 1.19, "mem_vs_kd": 1.30}, "b1_feature_module_fwd_bwd": {"ms": 12.0}},
                    "fp32": {"diffkd_b1": {"vs_kd": 1.35, "mem_vs_kd": None}}},
        "fmnist": {"diffkd": {"vs_kd": 2.5}},
    }
    targets = gpu_cost.check_targets(result)
    assert {name: t["met"] for name, t in targets.items()} == {
        "B1 step, bf16, vs KD": True, "B1 step, fp32, vs KD": True,
        "B1 feature module fwd+bwd, bf16, ms": False, "B1 peak memory, bf16, vs KD": False,
        "Fashion-MNIST DiffKD step vs KD": False,
    }  # memory on CPU (None) and rows not run are left out, not failed
    assert targets["B1 step, bf16, vs KD"] == {"value": 1.19, "limit": 1.20, "met": True}


@pytest.mark.integration
def test_activation_memory_counts_what_recomputation_saves():
    """R34->R18 at a tiny size: KD is the unit, DiffKD keeps more activations than KD, and the
    recomputing B1 level keeps fewer than the plain one (the same parameters)."""
    import argparse

    rows = gpu_cost.activation_memory(argparse.Namespace(size=32, batch=2), torch.device("cpu"))
    assert rows["kd"]["activations_vs_kd"] == 1.0
    assert rows["diffkd_b1"]["activation_mb_per_image"] > rows["kd"]["activation_mb_per_image"]
    assert rows["diffkd_b1_recompute"]["activation_mb_per_image"] < rows["diffkd_b1"]["activation_mb_per_image"]
    assert rows["diffkd_b1_recompute"]["trainable_param_mb"] == rows["diffkd_b1"]["trainable_param_mb"]


@pytest.mark.integration
def test_integration_overhead_times_both_adapters_against_the_plain_loop():
    rows = integration_overhead.main(["--steps", "2", "--warmup", "1"])
    assert len(rows) == 4 and "DistillationTrainer" in rows[2] and "DistillationModule" in rows[3]
    for row in rows[2:]:
        steps, plain, adapter, ratio = (float(v) for v in row.strip("| ").split(" | ")[1:])
        assert steps == 2 and plain > 0 and adapter > 0 and ratio == pytest.approx(adapter / plain, abs=2e-3)
