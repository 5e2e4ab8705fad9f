"""Every loss weight applied once (diffkd.weighting), and weight="auto" checked against sums done here by hand."""
import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from conftest import needs_fmnist, spawn_processes
from diffkd.distiller import Distiller, Level


def tiny_pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """Teacher and student MLPs on 6 inputs with an 8-wide hidden layer ('1') and 3 logits ('2')."""
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return teacher, student


def ce(output, targets):
    return F.cross_entropy(output, targets)


def test_level_and_method_weights_multiply_once():
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, [Level("0", "0", "rkd", weight=0.5, distance_weight=3.0, angle_weight=7.0)],
                  input_shape=(6,))
    out = d(torch.randn(5, 6))
    assert out.weights == {"rkd_0/distance": 1.5, "rkd_0/angle": 3.5}
    for key, weight in out.weights.items():
        assert torch.equal(out.losses[key], weight * out.raw[key])
    assert out.loss.item() == pytest.approx(1.5 * out.raw["rkd_0/distance"].item() + 3.5 * out.raw["rkd_0/angle"].item())


def test_auto_weight_is_ratio_times_mean_task_over_mean_term_and_runs_live_in_the_window():
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, [Level("2", "2", "mse", weight="auto", ratio=0.5, window=3)], input_shape=(6,),
                  task_loss=ce)
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.05)
    torch.manual_seed(1)
    tasks, terms = [], []
    for _ in range(3):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        out = d(x, y)
        assert out.task_loss.item() == pytest.approx(F.cross_entropy(student(x), y).item(), rel=1e-6)
        tasks.append(out.task_loss.item())
        terms.append(out.raw["mse_2"].item())
        running = 0.5 * sum(tasks) / sum(terms)  # the window so far, this step included
        assert out.weights["mse_2"].item() == pytest.approx(running, rel=1e-6)
        assert out.losses["mse_2"].item() == pytest.approx(running * terms[-1], rel=1e-6)
        opt.zero_grad()
        (out.task_loss + out.loss).backward()
        opt.step()
    expected = 0.5 * (sum(tasks) / 3) / (sum(terms) / 3)
    assert d.auto_weights() == {"mse_2": pytest.approx(expected, rel=1e-6)} and d.weighting.fixed.tolist() == [True]
    out = d(torch.randn(8, 6), torch.randint(0, 3, (8,)))
    assert out.losses["mse_2"].item() == pytest.approx(expected * out.raw["mse_2"].item(), rel=1e-6)
    assert d.weighting.window.steps == [3]  # a fixed factor measures nothing more


def test_auto_diffkd_scales_its_kd_term_while_diffusion_keeps_its_weight():
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, [Level("2", "2", "diffkd", weight="auto", window=2)], input_shape=(6,), task_loss=ce)
    kd, task = [], []
    for _ in range(2):
        out = d(torch.randn(8, 6), torch.randint(0, 3, (8,)))
        kd.append(out.raw["diffkd_2/kd"].item())
        task.append(out.task_loss.item())
        assert out.weights["diffkd_2/kd"].item() == pytest.approx(sum(task) / sum(kd), rel=1e-6)
        assert out.weights["diffkd_2/diffusion"] == 1.0  # no AE: the tap widths are equal
    assert d.auto_weights()["diffkd_2"] == pytest.approx(sum(task) / sum(kd), rel=1e-6)


@pytest.mark.parametrize("offset,task,why", [
    (0.0, 1.0, "a term sum of 0: an infinite factor"),
    (1e-3, 1e4, "a term of 1e-3 against a task loss of 1e4: a factor of 1e7, over the cap"),
    (0.5, float("nan"), "a task loss that is not finite"),
])
def test_a_window_not_usable_so_far_trains_without_its_terms_until_it_is(offset, task, why):
    """A window step whose running factor is unusable weighs 0; once the sums are usable it is live again."""
    teacher, student = tiny_pair()
    with torch.no_grad():
        student.load_state_dict(teacher.state_dict())
        student[2].bias.add_(offset)
    d = Distiller(teacher, student, [Level("2", "2", "regression_l1", weight="auto", window=5)], input_shape=(6,))
    x = torch.randn(4, 6)
    out = d(x, task_loss=torch.tensor(task))
    assert out.weights["regression_l1_2"].item() == 0.0, why
    first_term = out.raw["regression_l1_2"].item()
    with torch.no_grad():
        student[2].bias.add_(0.5)
    out = d(x, task_loss=torch.tensor(1.0))
    # a NaN task loss stays in the sums (weight 0 on, and the close refuses the window); the others recover
    expected = (task + 1.0) / (first_term + out.raw["regression_l1_2"].item()) if math.isfinite(task) else 0.0
    assert out.weights["regression_l1_2"].item() == pytest.approx(expected, rel=1e-5)


def test_auto_levels_without_a_ratio_share_the_task_loss_evenly():
    """Three auto levels: the two without a ratio take 1/3 each; the one with its own keeps it."""
    teacher, student = tiny_pair()
    levels = [Level("0", "0", "mse", weight="auto", window=2, name="a"), Level("2", "2", "kd", weight="auto", window=2),
              Level("1", "1", "mse", weight="auto", window=2, ratio=2.0, name="c"), Level("2", "2", "mse", weight=0.5)]
    d = Distiller(teacher, student, levels, input_shape=(6,), task_loss=ce)
    task, raw = [], {"a": [], "kd_2": [], "c": []}
    for _ in range(2):
        out = d(torch.randn(8, 6), torch.randint(0, 3, (8,)))
        task.append(out.task_loss.item())
        for name in raw:
            raw[name].append(out.raw[name].item())
    expected = {"a": 1 / 3, "kd_2": 1 / 3, "c": 2.0}
    assert d.auto_weights() == {n: pytest.approx(r * sum(task) / sum(raw[n]), rel=1e-6) for n, r in expected.items()}
    out = d(torch.randn(8, 6), torch.randint(0, 3, (8,)))
    assert out.weights["mse_2"] == 0.5  # a number weight is untouched


def test_calibrate_names_the_unit_and_an_unknown_term_is_refused():
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, [Level("2", "2", "diffkd", weight="auto", window=1, calibrate=["kd", "diffusion"])],
                  input_shape=(6,), task_loss=ce)
    out = d(torch.randn(8, 6), torch.randint(0, 3, (8,)))
    expected = out.task_loss.item() / (out.raw["diffkd_2/kd"].item() + out.raw["diffkd_2/diffusion"].item())
    assert d.auto_weights()["diffkd_2"] == pytest.approx(expected, rel=1e-6)
    bad = Distiller(teacher, student, [Level("2", "2", "diffkd", weight="auto", calibrate="kld")], input_shape=(6,),
                    task_loss=ce)
    with pytest.raises(ValueError, match=r"calibrate names \['kld'\], but the method's terms are \['kd', 'diffusion'\]"):
        bad(torch.randn(8, 6), torch.randint(0, 3, (8,)))


def test_auto_without_a_task_loss_is_one_line():
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, [Level("2", "2", "kd", weight="auto")], input_shape=(6,))
    with pytest.raises(ValueError) as info:
        d(torch.randn(4, 6))
    assert "weight='auto', which calibrates against the task loss" in str(info.value) and "\n" not in str(info.value)
    out = d(torch.randn(4, 6), task_loss=torch.tensor(2.0))  # a task loss given per call works too
    assert out.task_loss.item() == 2.0


@pytest.mark.parametrize("kwargs,message", [
    ({"weight": "auto", "ratio": 0}, "ratio (weighted terms / task loss for weight='auto') must be a finite number > 0"),
    ({"weight": "auto", "ratio": float("nan")}, "must be a finite number > 0"),
    ({"weight": "auto", "window": 0}, "window (calibration steps for weight='auto') must be an integer >= 1"),
    ({"weight": 2.0, "ratio": 1.0}, "ratio only apply to weight='auto', but the weight is 2.0"),
    ({"weight": "Auto"}, "must be a finite number >= 0 or 'auto', got 'Auto'"),
])
def test_bad_auto_settings_are_one_line(kwargs, message):
    with pytest.raises(ValueError) as info:
        Level("2", "2", "kd", **kwargs)
    assert message in str(info.value)


def test_a_term_of_about_zero_is_refused_naming_it_and_its_mean():
    teacher, _ = tiny_pair()
    student = copy.deepcopy(teacher)  # the same function as the teacher, so the kd term is exactly 0
    d = Distiller(teacher, student, [Level("2", "2", "kd", weight="auto", window=2)], input_shape=(6,), task_loss=ce)
    d(torch.randn(4, 6), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError, match=r"level 'kd_2' .* its terms \(all terms\) averaged 0; .* give it a number weight"):
        d(torch.randn(4, 6), torch.randint(0, 3, (4,)))


def test_a_tiny_term_would_be_an_absurd_weight_and_is_refused():
    teacher, student = tiny_pair()
    with torch.no_grad():
        student.load_state_dict(teacher.state_dict())
        student[2].bias.add_(1e-4)  # |student - teacher| = 1e-4 on every logit
    d = Distiller(teacher, student, [Level("2", "2", "regression_l1", weight="auto", window=1)], input_shape=(6,))
    with pytest.raises(ValueError, match=r"averaged 0.0001 against a task loss of 1e\+03, so the weight would be "
                                         r"1e\+07 \(> 1e\+06\): the terms are ~0"):
        d(torch.randn(4, 6), task_loss=torch.tensor(1e3))


def test_a_term_that_is_not_finite_in_the_window_is_refused():
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, [Level("2", "2", "regression_l1", weight="auto", window=1)], input_shape=(6,))
    x = torch.randn(4, 6)
    x[0, 0] = float("nan")  # both logits go NaN on that row, and so does the term
    with pytest.raises(ValueError, match=r"its terms \(all terms\) averaged nan; weight='auto' needs them finite"):
        d(x, task_loss=torch.tensor(1.0))


@pytest.mark.parametrize("calibrate", [[], [1], 3])
def test_calibrate_must_name_terms(calibrate):
    with pytest.raises(ValueError, match=r"calibrate must name the level's terms to calibrate"):
        Level("2", "2", "kd", weight="auto", calibrate=calibrate)


def test_a_task_loss_that_is_zero_or_not_finite_is_refused():
    teacher, student = tiny_pair()
    for value, shown in ((0.0, "averaged 0;"), (float("inf"), "averaged inf;")):
        d = Distiller(teacher, student, [Level("2", "2", "mse", weight="auto", window=1)], input_shape=(6,))
        with pytest.raises(ValueError, match=rf"the task loss {shown} weight='auto' needs a finite task loss > 0"):
            d(torch.randn(4, 6), task_loss=torch.tensor(value))


def test_the_first_epoch_ends_a_longer_window():
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, [Level("2", "2", "mse", weight="auto", window=100)], input_shape=(6,), task_loss=ce)
    tasks, terms = [], []
    for step in range(4):
        out = d(torch.randn(8, 6), torch.randint(0, 3, (8,)), progress=(step / 4, 3))
        tasks.append(out.task_loss.item())
        terms.append(out.raw["mse_2"].item())
    assert d.weighting.fixed.tolist() == [False]  # open: its factor is the running one
    assert d.auto_weights()["mse_2"] == pytest.approx(sum(tasks) / sum(terms), rel=1e-6)
    d(torch.randn(8, 6), torch.randint(0, 3, (8,)), progress=(1.0, 3))  # the second epoch's first step closes it
    assert d.weighting.fixed.tolist() == [True]
    assert d.auto_weights()["mse_2"] == pytest.approx(sum(tasks) / sum(terms), rel=1e-6)


def test_eval_steps_neither_measure_nor_need_the_task_loss():
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, [Level("2", "2", "mse", weight="auto", window=1)], input_shape=(6,))
    d.eval()
    out = d(torch.randn(4, 6))
    assert out.losses["mse_2"].item() == 0.0 and d.auto_weights()["mse_2"] == 0.0


def test_calibrated_weights_are_in_the_state_dict_and_a_reload_never_recalibrates():
    teacher, student = tiny_pair()
    make = lambda: Distiller(teacher, student, [Level("2", "2", "mse", weight="auto", window=2)], input_shape=(6,),
                             task_loss=ce)
    d = make()
    for _ in range(2):
        d(torch.randn(8, 6), torch.randint(0, 3, (8,)))
    factor = d.auto_weights()["mse_2"]
    assert factor > 0 and "weighting.factors" in d.state_dict()
    fresh = make()
    fresh.load_state_dict(d.state_dict())
    out = fresh(torch.randn(8, 6), torch.randint(0, 3, (8,)))
    assert out.losses["mse_2"].item() == pytest.approx(factor * out.raw["mse_2"].item(), rel=1e-6)
    assert fresh.auto_weights()["mse_2"] == factor and fresh.weighting.window.steps == [2]


def test_fixed_weights_add_nothing_to_the_state_dict():
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, [Level("2", "2", "mse", weight=2.0)], input_shape=(6,))
    assert not any(k.startswith("weighting.") for k in d.state_dict())


def _ddp_worker(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    teacher, student = tiny_pair()
    d = Distiller(teacher, student, [Level("2", "2", "mse", weight="auto", window=2)], input_shape=(6,))
    ddp = torch.nn.parallel.DistributedDataParallel(d)  # it copies process 0's buffers at every forward
    torch.manual_seed(10 + rank)  # each process sees other data and another task loss
    sums = torch.zeros(2, dtype=torch.float64)
    used = []
    for step in range(2):
        task = torch.tensor(1.0 + rank + step)
        out = ddp(torch.randn(4, 6), task_loss=task)
        out.loss.backward()
        step_sums = torch.tensor([task.item(), out.raw["mse_2"].item()], dtype=torch.float64)
        dist.all_reduce(step_sums)
        sums += step_sums
        used.append((out.weights["mse_2"].item(), (sums[0] / sums[1]).item()))
    results[rank] = (d.auto_weights()["mse_2"], used)
    dist.destroy_process_group()


@pytest.mark.integration
def test_ddp_processes_calibrate_on_every_process_statistics_and_agree():
    """Every step of the window, open (the running factor) or closing, uses both processes' figures."""
    results = spawn_processes(_ddp_worker)
    (w0, used0), (w1, used1) = results[0], results[1]
    assert [u for u, _ in used0] == [u for u, _ in used1]  # the same weight on both, every step
    for weight, expected in used0:
        assert weight == pytest.approx(expected, rel=1e-6)
    assert w0 == w1 == used0[-1][0] and math.isfinite(w0)


def test_a_run_resumed_inside_the_window_carries_its_sums_on():
    teacher, student = tiny_pair()
    make = lambda: Distiller(teacher, student, [Level("2", "2", "mse", weight="auto", window=3)], input_shape=(6,))
    d = make()
    first = d(torch.randn(4, 6), task_loss=torch.tensor(2.0))
    fresh = make()
    fresh.load_state_dict(d.state_dict())
    second = fresh(torch.randn(4, 6), task_loss=torch.tensor(3.0))
    terms = first.raw["mse_2"].item() + second.raw["mse_2"].item()
    assert fresh.weighting.window.steps == [2] and fresh.weighting.fixed.tolist() == [False]
    assert second.weights["mse_2"].item() == pytest.approx(5.0 / terms, rel=1e-6)


@pytest.mark.integration
@needs_fmnist
def test_engine_logs_checkpoints_and_resumes_auto_weights_without_recalibrating(tmp_path, caplog):
    from test_engine import Stop, all_tensors, distill_overrides, random_teacher, stop_after, tiny

    from diffkd.engine import run
    from diffkd.engine.checkpoint import load_checkpoint

    teacher = random_teacher(tmp_path)
    extra = [*distill_overrides(teacher), "train.epochs=2", "data.limit_train=64", "data.limit_test=32",
             "levels.0.weight=auto", "levels.1.weight=auto", "levels.1.window=1"]  # 2 steps an epoch: level 0's
    # window (100) ends with the first epoch, level 1's after one step
    with caplog.at_level("INFO", logger="diffkd"):
        straight = run(tiny(tmp_path, *extra, name="straight", mode="distill"), mode="distill")
    assert sum("auto weight: level" in r.message for r in caplog.records) == 2  # printed once each
    with pytest.raises(Stop):
        run(tiny(tmp_path, *extra, name="resumed", mode="distill"), mode="distill", on_epoch_end=stop_after(1))
    caplog.clear()
    with caplog.at_level("INFO", logger="diffkd"):
        resumed = run(tiny(tmp_path, *extra, name="resumed", mode="distill"), mode="distill", resume=True)
    assert not any("auto weight: level" in r.message for r in caplog.records)  # never recalibrated
    a, b = (load_checkpoint(p / "last.pt") for p in (straight.run_dir, resumed.run_dir))
    ta, tb = all_tensors({k: a[k] for k in ("model", "optimizer")}), all_tensors({k: b[k] for k in ("model", "optimizer")})
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    factors = a["model"]["weighting.factors"]
    assert bool((factors > 0).all())
    header = (straight.run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    columns = [c for c in header if c.startswith("weight_")]
    assert len(columns) == 2 and columns[0].startswith("weight_mse") and columns[1].startswith("weight_diffkd")
    assert [straight.history[-1][c] for c in columns] == pytest.approx(factors.tolist())
