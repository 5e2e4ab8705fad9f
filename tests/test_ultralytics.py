"""The Ultralytics YOLO integration: short offline trainings of every task on a tiny synthetic set written here."""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

# Ultralytics reads these when imported: no network probe, and a font where its plots look for Arial.ttf.
_CONFIG = Path(tempfile.mkdtemp(prefix="diffkd-yolo-config-"))
(_CONFIG / "Ultralytics").mkdir()
shutil.copy(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf", _CONFIG / "Ultralytics/Arial.ttf")
os.environ["YOLO_OFFLINE"] = "1"
os.environ["YOLO_CONFIG_DIR"] = str(_CONFIG)

from conftest import record_progress  # noqa: E402
from diffkd.integrations import ultralytics as yolo_kd  # noqa: E402

SRC = Path(yolo_kd.__file__).parents[2]
MODELS = {"detect": "yolov8n.yaml", "segment": "yolov8n-seg.yaml", "pose": "yolov8n-pose.yaml", "obb": "yolov8n-obb.yaml"}
FAST = dict(epochs=1, imgsz=64, batch=4, workers=0, device="cpu", plots=False, val=True, amp=False, seed=0,
            deterministic=False, mosaic=0.0, warmup_epochs=0, verbose=False, exist_ok=True)


def write_dataset(root: Path, task: str, images: int = 8, seed: int = 0) -> Path:
    """A YOLO-format set of `images` 64x64 images, each with 1-2 bright rectangles on noise, for `task`; the data yaml."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for n in range(images if split == "train" else images // 2):
            pixels = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
            lines = []
            for _ in range(int(rng.integers(1, 3))):
                cls = int(rng.integers(0, 2))
                w, h = rng.uniform(0.2, 0.45, 2)
                cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
                x0, y0, x1, y1 = (int(v * 64) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
                pixels[y0:y1, x0:x1] = (200, 80 + 120 * cls, 40)
                corners = [cx - w / 2, cy - h / 2, cx + w / 2, cy - h / 2, cx + w / 2, cy + h / 2, cx - w / 2, cy + h / 2]
                if task == "detect":
                    values = [cx, cy, w, h]
                elif task in ("segment", "obb"):
                    values = corners
                else:  # pose: the box and three visible keypoints
                    values = [cx, cy, w, h, cx, cy, 2, cx - w / 4, cy, 2, cx + w / 4, cy, 2]
                lines.append(" ".join([str(cls), *(f"{v:.5f}" for v in values)]))
            Image.fromarray(pixels).save(root / "images" / split / f"{n}.png")
            (root / "labels" / split / f"{n}.txt").write_text("\n".join(lines) + "\n")
    spec = f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: red\n  1: yellow\n"
    if task == "pose":
        spec += "kpt_shape: [3, 3]\nflip_idx: [0, 2, 1]\n"
    (root / "data.yaml").write_text(spec)
    return root / "data.yaml"


def run(tmp_path: Path, task: str, name: str = "run", **kwargs):
    data = write_dataset(tmp_path / f"data-{task}", task) if not (tmp_path / f"data-{task}").exists() else \
        tmp_path / f"data-{task}" / "data.yaml"
    args = {**FAST, "method": "diffkd", "student": MODELS[task], "teacher": MODELS[task].replace("n", "s", 1).replace("v8s", "v8s"),
            "data": str(data), "project": str(tmp_path / "runs"), "name": name, **kwargs}
    return yolo_kd.distill(**args)


def kd_state(trainer) -> dict:
    """A copy of the tensors of the trainer's distillation step (its state also holds the auto window's sums)."""
    return {k: v.detach().clone() for k, v in trainer.kd_step.state_dict().items() if isinstance(v, torch.Tensor)}


def plain_parameter_count(trainer) -> int:
    """The parameters of the student as Ultralytics builds it for this data, without any distillation."""
    return sum(p.numel() for p in trainer.get_model(cfg=MODELS[trainer.args.task], weights=None, verbose=False).parameters())


BLOCK_DIFFKD = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == "diffkd" or name.startswith("diffkd."):
            raise ImportError("diffkd is blocked in this process")
sys.meta_path.insert(0, Blocker())
"""


def load_without_diffkd(path: Path) -> tuple[str, int]:
    """(task, parameter count) of YOLO(path) in a fresh process where importing diffkd fails."""
    script = BLOCK_DIFFKD + f"""
from ultralytics import YOLO
model = YOLO({str(path)!r})
try:
    import diffkd
    print("diffkd importable")
except ImportError:
    pass
print(model.task, sum(p.numel() for p in model.model.parameters()))
"""
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert "diffkd importable" not in lines
    task, count = lines[-1].split()
    return task, int(count)


@pytest.mark.integration
@pytest.mark.parametrize("task", list(MODELS))
def test_each_task_distils_into_plain_checkpoints(tmp_path, one_thread, task):
    snapshots: dict[str, object] = {}

    def before_training(trainer):
        snapshots["kd"] = kd_state(trainer)
        in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
        snapshots["kd_in_optimizer"] = all(id(p) in in_optimizer for p in trainer.kd_step.parameters())
        snapshots["kd_group"] = [g for g in trainer.optimizer.param_groups if g.get("param_group") == "kd"]

    trainer = run(tmp_path, task, callbacks={"on_pretrain_routine_end": [before_training]})
    columns = open(trainer.csv).readline().strip().split(",")
    kd_columns = [c for c in columns if re.fullmatch(r"train/p\d_\w+", c)]
    assert kd_columns == [*(f"train/p{level}_{term}" for level in (3, 4, 5) for term in ("kd", "diff")),
                          *(f"train/p{level}_w" for level in (3, 4, 5))]  # the default weight: auto, logged
    assert not [c for c in columns if re.fullmatch(r"val/p\d_\w+", c)]
    assert [f"train/{name}" for name in trainer.loss_names if re.fullmatch(r"p\d_\w+", name)] == kd_columns
    # the kd modules were optimised: in the optimizer (one group of their own), changed by the steps
    assert snapshots["kd_in_optimizer"] and len(snapshots["kd_group"]) == 1
    assert snapshots["kd_group"][0]["lr"] == pytest.approx(10 * trainer.args.lr0)  # the default kd_lr_scale
    after = trainer.kd_step.state_dict()
    moved = [k for k, v in snapshots["kd"].items() if v.is_floating_point() and not torch.equal(v, after[k])]
    assert any(k.endswith("weight") for k in moved)
    # the student leaves as Ultralytics made it; the EMA holds the student's parameters only
    plain = plain_parameter_count(trainer)
    assert type(trainer.model.criterion).__name__ != "DistillationCriterion"
    ema = trainer.ema.ema
    assert sum(p.numel() for p in ema.parameters()) == plain
    teacher_and_kd = {id(p) for p in (*trainer.kd_teacher.parameters(), *trainer.kd_step.parameters())}
    assert not any(id(p) in teacher_and_kd for p in ema.parameters())
    assert not isinstance(getattr(ema, "criterion", None), yolo_kd.DistillationCriterion)
    for weights in ("best.pt", "last.pt"):
        assert load_without_diffkd(trainer.wdir / weights) == (task, plain)
    assert (trainer.wdir / yolo_kd.STATE_FILE).is_file()


class StopHere(Exception):
    """Raised by a test callback to end a training at a chosen point."""


def teacher_file(path: Path, cfg: str = "yolov8s.yaml", seed: int = 0, nc: int = 2) -> Path:
    """A YOLO checkpoint as Ultralytics writes one ({"model": the model in half precision, ...}), of random weights."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    model = DetectionModel(cfg, nc=nc, verbose=False)
    model.task = "detect"
    torch.save({"model": model.half(), "train_args": {}, "date": "2026-12-07"}, path)
    return path


@pytest.mark.integration
def test_resume_restores_kd_modules_and_their_optimizer_state(tmp_path, one_thread):
    saved: dict[str, object] = {}

    def stop_after_first_save(trainer):
        saved["kd"] = kd_state(trainer)
        params = list(trainer.kd_step.parameters())
        saved["exp_avg"] = [trainer.optimizer.state[p]["exp_avg"].clone() for p in params]
        raise StopHere

    teacher = teacher_file(tmp_path / "teacher.pt")
    with pytest.raises(StopHere):
        run(tmp_path, "detect", teacher=str(teacher), epochs=2, optimizer="AdamW", nbs=4,
            callbacks={"on_model_save": [stop_after_first_save]})
    last = tmp_path / "runs" / "run" / "weights" / "last.pt"
    restored: dict[str, object] = {}

    def after_setup(trainer):
        restored["kd"] = kd_state(trainer)
        restored["exp_avg"] = [trainer.optimizer.state[p]["exp_avg"].clone() for p in trainer.kd_step.parameters()]
        restored["settings"] = trainer.kd_settings
        raise StopHere

    with pytest.raises(StopHere):
        yolo_kd.distill(resume=str(last), callbacks={"on_pretrain_routine_end": [after_setup]})
    assert restored["settings"].teacher == str(teacher)
    assert restored["kd"].keys() == saved["kd"].keys()
    for key, value in saved["kd"].items():
        assert torch.equal(restored["kd"][key], value), key
    assert len(restored["exp_avg"]) == len(saved["exp_avg"]) > 0
    for found, expected in zip(restored["exp_avg"], saved["exp_avg"]):  # last.pt keeps optimizer state in fp16
        torch.testing.assert_close(found, expected, atol=1e-3, rtol=1e-2)
    # a checkpoint Ultralytics' trainer wrote reads safely, as a teacher too
    assert isinstance(yolo_kd.load_teacher(str(last), "detect", {"nc": 2, "channels": 3}), torch.nn.Module)
    # never a silent resume with other kd modules, settings or teacher weights
    with pytest.raises(ValueError) as excinfo:
        yolo_kd.distill(teacher="yolov8m.yaml", resume=str(last))
    assert f"teacher is {str(teacher)!r} there, 'yolov8m.yaml' given" in one_line_error(excinfo)
    with pytest.raises(ValueError) as excinfo:
        yolo_kd.distill(resume=str(last), kd_weight=0.5, method="mse")
    message = one_line_error(excinfo)
    assert "method is 'diffkd' there, 'mse' given" in message and "kd_weight is 'auto' there, 0.5 given" in message
    yolo_kd.resumed_settings(restored["settings"], {"kd_weight": "auto", "teacher": str(teacher)})  # the same: accepted
    original = teacher.read_bytes()
    for other in (teacher_file(tmp_path / "other.pt", seed=1), teacher_file(tmp_path / "wider.pt", "yolov8m.yaml")):
        teacher.write_bytes(other.read_bytes())  # same path, other weights (then another width)
        with pytest.raises(ValueError) as excinfo:
            yolo_kd.distill(resume=str(last))
        assert f"teacher {teacher} has changed since the run started" in one_line_error(excinfo)
    teacher.write_bytes(original)
    state_file = last.parent / yolo_kd.STATE_FILE
    state = torch.load(state_file, weights_only=True)
    assert [snap["epoch"] for snap in state["snapshots"]] == [0]
    torch.save({**state, "snapshots": [{**snap, "epoch": 1} for snap in state["snapshots"]]}, state_file)
    with pytest.raises(ValueError) as excinfo:
        yolo_kd.distill(resume=str(last))
    assert "holds the kd modules of epoch 2 but last.pt is from epoch 1" in one_line_error(excinfo)
    torch.save({k: v for k, v in state.items() if k != "format"}, state_file)  # as an earlier diffkd wrote it
    with pytest.raises(ValueError) as excinfo:
        yolo_kd.distill(resume=str(last))
    assert "was written by diffkd 0.2.0 (no format number)" in one_line_error(excinfo)
    for damaged in (b"", b"PK\x03\x04 truncated"):
        state_file.write_bytes(damaged)
        with pytest.raises(ValueError) as excinfo:
            yolo_kd.distill(resume=str(last))
        message = one_line_error(excinfo)
        assert "cannot read checkpoint" in message and "weights_only" not in message
        assert "resume from another checkpoint (with its own kd_modules.pt), or start a new run" in message
    state_file.unlink()
    with pytest.raises(ValueError) as excinfo:
        yolo_kd.distill(resume=str(last))
    assert "kd_modules.pt is missing" in one_line_error(excinfo)


@pytest.mark.integration
def test_a_stop_between_the_two_saves_resumes_from_the_older_pair(tmp_path, one_thread, monkeypatch):
    """kd_modules.pt is written before last.pt and keeps the save before: a stop between the two writes of epoch 2
    leaves last.pt of epoch 1 beside a kd file that still holds epoch 1's modules, which resume takes."""
    from ultralytics.engine.trainer import BaseTrainer

    saves: list[dict] = []
    plain_save = BaseTrainer.save_model

    def save_once(trainer):
        saves.append(kd_state(trainer))
        if len(saves) == 2:
            raise StopHere  # after kd_modules.pt of epoch 2, before last.pt of epoch 2
        return plain_save(trainer)

    monkeypatch.setattr(BaseTrainer, "save_model", save_once)
    with pytest.raises(StopHere):
        run(tmp_path, "detect", epochs=3, val=False)
    monkeypatch.undo()
    last = tmp_path / "runs" / "run" / "weights" / "last.pt"
    state = torch.load(last.parent / yolo_kd.STATE_FILE, weights_only=True)
    assert [snap["epoch"] for snap in state["snapshots"]] == [1, 0]
    restored = {}

    def after_setup(trainer):
        restored.update(kd_state(trainer))
        raise StopHere

    with pytest.raises(StopHere):
        yolo_kd.distill(resume=str(last), callbacks={"on_pretrain_routine_end": [after_setup]})
    assert restored.keys() == saves[0].keys()
    assert all(torch.equal(restored[k], v) for k, v in saves[0].items())
    assert any(not torch.equal(saves[1][k], v) for k, v in saves[0].items() if v.is_floating_point())


@pytest.mark.integration
def test_a_finished_run_says_so_on_resume_and_a_random_teacher_is_named(tmp_path, one_thread, capsys):
    import logging

    from ultralytics.utils import LOGGER

    from diffkd.cli import main

    class Kept(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    kept = Kept()
    LOGGER.addHandler(kept)
    data = write_dataset(tmp_path / "data", "detect")
    given = {**FAST, "method": "diffkd", "epochs": 1, "val": False, "project": tmp_path / "runs", "name": "done"}
    pairs = [f"{k}={v}" for k, v in given.items()]
    try:
        assert main(["yolo", "student=yolov8n.yaml", "teacher=yolov8s.yaml", f"data={data}", *pairs]) == 0
    finally:
        LOGGER.removeHandler(kept)
    warned = [line for line in kept.lines if "distilled from random weights" in line]
    assert len(warned) == 1 and "\n" not in warned[0]  # one warning line, at the start
    assert kept.lines.index(warned[0]) < next(i for i, line in enumerate(kept.lines) if "Starting training" in line)
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1].endswith("(distilled from a random teacher: a model .yaml)")
    state = torch.load(tmp_path / "runs/done/weights" / yolo_kd.STATE_FILE, weights_only=True)
    assert state["teacher"]["random_weights"] is True
    with pytest.raises(ValueError) as excinfo:
        yolo_kd.distill(resume=str(tmp_path / "runs/done/weights/last.pt"))
    assert "is finished (all its epochs are trained): there is nothing to resume" in one_line_error(excinfo)


@pytest.mark.integration
def test_the_trainer_rebuilds_as_ultralytics_ddp_launcher_rebuilds_it(tmp_path, one_thread):
    """Ultralytics' DDP launcher pickles the trainer's class, args and callbacks (cloudpickle, which takes Ultralytics'
    lambda callbacks) and rebuilds the trainer from them in a new process. Here: the class by reference with pickle,
    the settings in the callbacks entry that carries them, and a training by the rebuilt trainer."""
    import pickle

    data = write_dataset(tmp_path / "data", "detect")
    settings = yolo_kd.KDSettings(MODELS["detect"].replace("n", "s", 1), method="mse")
    from ultralytics.utils import callbacks as ultralytics_callbacks

    events = ultralytics_callbacks.get_default_callbacks()
    events[yolo_kd.SETTINGS_KEY] = [yolo_kd.Preflight(settings)]
    overrides = {**FAST, "model": MODELS["detect"], "data": str(data), "project": str(tmp_path / "runs"), "name": "ddp"}
    trainer = yolo_kd.DistillationDetectionTrainer(overrides=overrides, _callbacks=events)
    by_reference = pickle.dumps(type(trainer))
    assert b"diffkd.integrations.ultralytics" in by_reference and len(by_reference) < 200
    state = tmp_path / "state.pkl"
    state.write_bytes(pickle.dumps({"trainer": type(trainer), "args": vars(trainer.args),
                                    "settings": trainer.callbacks[yolo_kd.SETTINGS_KEY]}))
    script = f"""
import pickle, torch
torch.set_num_threads(1)
from ultralytics.utils import DEFAULT_CFG_DICT, callbacks
state = pickle.loads(open({str(state)!r}, "rb").read())
events = callbacks.get_default_callbacks()
events["{yolo_kd.SETTINGS_KEY}"] = state["settings"]
cfg = DEFAULT_CFG_DICT.copy()
cfg.update(save_dir="")
trainer = state["trainer"](cfg=cfg, overrides=state["args"], _callbacks=events)
trainer.train()
print(type(trainer).__name__, trainer.kd_settings.method, sorted(trainer.kd_step.methods))
"""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "DistillationDetectionTrainer mse ['p3', 'p4', 'p5']"
    assert (tmp_path / "runs" / "ddp" / "weights" / yolo_kd.STATE_FILE).is_file()


# ------------------------------------------------------------------------------------------- bad input, one line each
def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("method, reason", [("crd", "index in the training set"), ("kd", "class scores"),
                                            ("reviewkd", "lists of taps")])
def test_a_method_yolo_cannot_feed_is_refused(method, reason):
    with pytest.raises(ValueError) as excinfo:
        yolo_kd.KDSettings("teacher.pt", method=method)
    assert reason in one_line_error(excinfo) and "diffkd, mse, cwd, fgd, mgd, pkd" in str(excinfo.value)


def test_settings_are_checked():
    assert yolo_kd.KDSettings("t.pt", method="diffkd", kd_weight="auto").kd_weight == "auto"
    for weight in (-1.0, "half", True):
        with pytest.raises(ValueError, match=">= 0 or 'auto'"):
            yolo_kd.KDSettings("t.pt", method="diffkd", kd_weight=weight)
    with pytest.raises(ValueError, match="autoencoder"):
        yolo_kd.KDSettings("t.pt", method="mse", kd_latent=64)
    with pytest.raises(ValueError, match="layer indices"):
        yolo_kd.KDSettings("t.pt", method="diffkd", teacher_layers=("a",))
    assert yolo_kd.KDSettings("t.pt", method="diffkd", teacher_layers=[15, 18]).teacher_layers == (15, 18)


def test_data_that_would_download_is_refused(tmp_path):
    with pytest.raises(ValueError) as excinfo:
        yolo_kd.check_data("coco8.yaml")
    assert "download" in one_line_error(excinfo) and "allow_download" in str(excinfo.value)
    spec = tmp_path / "d.yaml"
    spec.write_text("path: x\ntrain: images\nval: images\nnames: {0: a}\ndownload: https://example.com/d.zip\n")
    with pytest.raises(ValueError) as excinfo:
        yolo_kd.check_data(str(spec))
    assert "`download:` key" in one_line_error(excinfo)
    with pytest.raises(ValueError, match="URL"):
        yolo_kd.check_data("https://example.com/d.zip")
    yolo_kd.check_data(str(write_dataset(tmp_path / "ok", "detect", images=2)))  # on disk, no download key: fine


def teacher_data(task: str = "detect", nc: int = 2) -> dict:
    return {"nc": nc, "names": {i: str(i) for i in range(nc)}, "channels": 3, **({"kpt_shape": [3, 3]} if task == "pose" else {})}


def test_a_teacher_that_is_not_a_yolo_checkpoint_is_refused(tmp_path):
    state_dict = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(2, 2)}, state_dict)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for path in (state_dict, garbage):
        with pytest.raises(ValueError) as excinfo:
            yolo_kd.load_teacher(str(path), "detect", teacher_data())
        assert "is not an Ultralytics YOLO checkpoint" in one_line_error(excinfo)
    with pytest.raises(ValueError, match="is not a file"):
        yolo_kd.load_teacher(str(tmp_path / "missing.pt"), "detect", teacher_data())


def test_a_teacher_of_another_task_or_class_count_is_refused(tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    data = teacher_data()
    with pytest.raises(ValueError) as excinfo:
        yolo_kd.load_teacher("yolov8s-seg.yaml", "detect", data)
    assert "is a segment model but the student is a detect model" in one_line_error(excinfo)
    checkpoint = tmp_path / "three_classes.pt"
    model = DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    model.task = "detect"
    torch.save({"model": model}, checkpoint)
    with pytest.raises(ValueError) as excinfo:
        yolo_kd.load_teacher(str(checkpoint), "detect", data)
    assert "predicts 3 classes but the data has 2" in one_line_error(excinfo)
    with pytest.raises(ValueError, match="is a detect model but the student is a pose model"):
        yolo_kd.load_teacher(str(checkpoint), "pose", teacher_data("pose"))
    teacher = yolo_kd.load_teacher(str(checkpoint), "detect", teacher_data(nc=3))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_student_layers_must_be_inputs_of_its_head():
    from ultralytics.nn.tasks import DetectionModel

    student, teacher = (DetectionModel(cfg, nc=2, verbose=False) for cfg in ("yolov8n.yaml", "yolo11s.yaml"))
    with pytest.raises(ValueError, match=r"student layers \[12\] are not inputs of the student's head \[15, 18, 21\]"):
        yolo_kd.build_levels(student, teacher, yolo_kd.KDSettings("t.pt", method="diffkd", student_layers=(12, 15, 18)), 64, 3)
    with pytest.raises(ValueError, match="2 student maps .* but 3 teacher maps"):
        yolo_kd.build_levels(student, teacher, yolo_kd.KDSettings("t.pt", method="diffkd", student_layers=(15, 18)), 64, 3)
    # another family and width: the v8n's head inputs 15/18/21 pair with the 11s's 16/19/22
    step, levels = yolo_kd.build_levels(student, teacher, yolo_kd.KDSettings("t.pt", method="cwd"), 64, 3)
    assert [(lv.name, lv.student_position, lv.teacher_layer) for lv in levels] == [("p3", 0, 16), ("p4", 1, 19), ("p5", 2, 22)]
    assert isinstance(step.methods["p3"], yolo_kd.Projected)  # 64 -> 128 channels


def test_layer_outputs_are_the_maps_the_head_reads():
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=2, verbose=False).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        read = model(images)[1]["feats"]
        ours = yolo_kd.layer_outputs(model, images, {15, 18, 21})
    assert [tuple(x.shape) for x in read] == [(2, 64, 8, 8), (2, 128, 4, 4), (2, 256, 2, 2)]
    for mine, theirs in zip((ours[15], ours[18], ours[21]), read):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    model.train()
    train_preds = model(images)
    assert [x.shape for x in yolo_kd.head_inputs(train_preds)] == [x.shape for x in read]
    with pytest.raises(ValueError, match="no 'feats'"):
        yolo_kd.head_inputs({"boxes": torch.zeros(1)})


def test_fgd_boxes_come_from_the_batch_in_pixels():
    batch = {"img": torch.zeros(2, 3, 40, 80), "batch_idx": torch.tensor([0.0, 1.0, 1.0]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.25, 0.5], [0.25, 0.25, 0.1, 0.2], [0.5, 0.5, 0.5, 0.5]])}
    boxes = yolo_kd.batch_boxes(batch, oriented=False)
    assert boxes.frame == (40, 80)
    torch.testing.assert_close(boxes.per_image[0], torch.tensor([[30.0, 10.0, 50.0, 30.0]]))
    torch.testing.assert_close(boxes.per_image[1], torch.tensor([[16.0, 6.0, 24.0, 14.0], [20.0, 10.0, 60.0, 30.0]]))
    # oriented: a 40 x 10 px box turned by 90 degrees stands 10 wide and 40 tall; by 45 degrees it is 25*sqrt(2) square
    rotated = {"img": torch.zeros(1, 3, 100, 100), "batch_idx": torch.zeros(2),
               "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.1, math.pi / 2], [0.5, 0.5, 0.4, 0.1, math.pi / 4]])}
    boxes = yolo_kd.batch_boxes(rotated, oriented=True).per_image[0]
    half = 25 * math.sqrt(2) / 2
    torch.testing.assert_close(boxes, torch.tensor([[45.0, 30.0, 55.0, 70.0], [50 - half, 50 - half, 50 + half, 50 + half]]))


def test_the_criterion_never_travels_with_a_copy_of_the_student():
    import copy

    from ultralytics.nn.tasks import DetectionModel

    student = DetectionModel("yolov8n.yaml", nc=2, verbose=False)
    student.args = __import__("ultralytics.utils", fromlist=["DEFAULT_CFG"]).DEFAULT_CFG
    base = student.init_criterion()
    step = yolo_kd.DistillationStep(torch.nn.ModuleDict(), yolo_kd.LossWeights({}, {}))
    student.criterion = yolo_kd.DistillationCriterion(base, student, step, [], False, lambda: (0, 1), set())
    assert not any("criterion" in name for name, _ in student.named_modules())
    assert copy.deepcopy(student).criterion is None
    assert student.criterion.hyp is base.hyp  # the base criterion's attributes pass through


def test_parse_pairs_reads_values_as_ultralytics_cli_does():
    parsed = yolo_kd.parse_pairs(["epochs=3", "lr0=1e-3", "amp=False", "teacher_layers=[15,18,21]", "name=run1",
                                  "device=0", "cache=none"])
    assert parsed == {"epochs": 3, "lr0": 0.001, "amp": False, "teacher_layers": [15, 18, 21], "name": "run1",
                      "device": 0, "cache": None}
    with pytest.raises(ValueError, match="is not key=value"):
        yolo_kd.parse_pairs(["epochs"])


def test_the_cli_gives_one_line_for_bad_input(tmp_path, capsys):
    from diffkd.cli import main

    data = write_dataset(tmp_path / "data", "detect", images=2)
    for pairs, expected in ((["method=crd"], "index in the training set"), (["epohcs=3"], "did you mean 'epochs'"),
                            (["model=yolov8n.yaml"], "student="),
                            ([], "give method= (one of diffkd, mse, cwd, fgd, mgd, pkd): diffkd yolo has no default")):
        status = main(["yolo", "student=yolov8n.yaml", "teacher=yolov8s.yaml", f"data={data}", *pairs,
                       f"project={tmp_path / 'runs'}", "name=bad"])
        err = capsys.readouterr().err.strip()
        assert status == 1 and len(err.splitlines()) == 1 and expected in err, err
        assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.integration
def test_without_ultralytics_the_import_names_the_extra(tmp_path):
    script = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name == "ultralytics" or name.startswith("ultralytics."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Blocker())
from diffkd.cli import main
sys.exit(main(["yolo", "student=yolov8n.yaml"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 1
    assert done.stderr.strip() == ("diffkd yolo: error: diffkd's YOLO integration needs Ultralytics, which is not "
                                   "installed: pip install diffkd[ultralytics]")


def average_worker(rank: int, world: int, port: int, results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    used, unused = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))
    used.grad = torch.full((3,), float(rank + 1))
    if rank == 1:
        unused.grad = torch.full((2,), 4.0)  # used on one rank only: the other counts as zero
    yolo_kd.average_gradients([used, unused], world)
    results[rank] = (used.grad.tolist(), unused.grad.tolist())
    dist.destroy_process_group()


@pytest.mark.integration
def test_kd_gradients_are_averaged_over_ranks_as_ddp_does():
    from conftest import spawn_processes

    results = spawn_processes(average_worker)
    assert results[0] == results[1] == ([1.5, 1.5, 1.5], [2.0, 2.0])


@pytest.mark.integration
def test_auto_weights_calibrate_against_the_per_image_task_loss(tmp_path, one_thread):
    trainer = run(tmp_path, "detect", method="mse", kd_weight="auto")
    weights = trainer.kd_step.weighting
    factors = weights.current()
    assert sorted(factors) == ["p3", "p4", "p5"] and all(0 < f < 1e6 for f in factors.values())
    # the window closed at the first epoch's end (2 steps); the task loss it measured is the per-image sum of
    # Ultralytics' loss items, whose epoch means are results.csv's train columns
    assert weights.window.steps == [2, 2, 2] and weights.fixed.all()
    rows = trainer.read_results_csv()
    task = sum(rows[f"train/{k}"][-1] for k in ("box_loss", "cls_loss", "dfl_loss"))
    for i, level in enumerate(weights.auto_levels):
        assert float(weights.window.sums[i, 0]) / 2 == pytest.approx(task, rel=1e-4)
        share = 1 / 3  # three auto levels share the task loss evenly
        assert factors[level] == pytest.approx(share * float(weights.window.sums[i, 0] / weights.window.sums[i, 1]), rel=1e-6)
        assert f"train/{level}_w" in rows
    saved = torch.load(trainer.wdir / yolo_kd.STATE_FILE, weights_only=True)["snapshots"][0]["step"]
    assert torch.equal(saved["weighting.factors"], weights.factors.cpu())


def test_the_criterion_adds_weighted_kd_terms_as_ultralytics_sums_its_loss():
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    torch.manual_seed(0)
    student, teacher = (DetectionModel(cfg, nc=2, verbose=False) for cfg in ("yolov8n.yaml", "yolov8s.yaml"))
    student.args = DEFAULT_CFG
    teacher.eval()
    settings = yolo_kd.KDSettings("t.pt", method="mse", kd_weight=0.5)
    step, levels = yolo_kd.build_levels(student, teacher, settings, 64, 3)
    criterion = yolo_kd.DistillationCriterion(student.init_criterion(), teacher, step, levels, False, lambda: (0, 1), set())
    batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [1.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.2, 0.2]])}
    student.train()
    preds = student(batch["img"])
    loss, items = criterion(preds, batch)
    plain_loss, _ = student.init_criterion()(preds, batch)
    with torch.no_grad():
        teacher_maps = yolo_kd.layer_outputs(teacher, batch["img"], {15, 18, 21})
    expected = []
    for name, layer, student_map in zip(("p3", "p4", "p5"), (15, 18, 21), preds["feats"]):
        projected = step.methods[name].connector(student_map)
        value = 0.5 * ((projected - teacher_maps[layer]) ** 2).mean()  # level weight x FitNet MSE
        torch.testing.assert_close(items[f"{name}_mse"], value.detach())
        expected.append(value)
    torch.testing.assert_close(loss[:-1], plain_loss)
    torch.testing.assert_close(loss[-1], 2 * sum(expected))  # x batch size, as Ultralytics' own terms


def test_the_benchmark_exports_coco_mosaics_to_yolo_labels(tmp_path):
    import json

    sys.path.insert(0, str(SRC.parent))
    from benchmarks.yolo import export_yolo

    mosaics = tmp_path / "mosaics"
    for split in ("train", "val"):
        (mosaics / split).mkdir(parents=True)
        Image.fromarray(np.zeros((40, 80), np.uint8)).save(mosaics / split / "000001.png")
    (mosaics / "annotations").mkdir()
    document = {"images": [{"id": 1, "file_name": "000001.png", "width": 80, "height": 40}],
                "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 4, 20, 8]}],
                "categories": [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)]}
    for split in ("train", "val"):
        (mosaics / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
    spec = export_yolo(mosaics, tmp_path / "yolo")
    # category 3 -> class 2; centre (20, 8) and size (20, 8) over an 80 x 40 image
    assert (tmp_path / "yolo/labels/train/000001.txt").read_text() == "2 0.250000 0.200000 0.250000 0.200000\n"
    assert (tmp_path / "yolo/images/val/000001.png").is_file()
    assert 'names:\n  0: "c1"\n  1: "c2"\n  2: "c3"\n' in spec.read_text()
    assert export_yolo(mosaics, tmp_path / "yolo") == spec  # written once, then reused


# ------------------------------------------------------------------------------------------- issue 32: files, pairing, folders
class RunsCode:
    """Unpickling this runs a shell command (what a hostile checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_unread_wherever_it_is_given(tmp_path):
    data = write_dataset(tmp_path / "data", "detect", images=2)
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.pt"
    torch.save({"model": RunsCode(marker), "train_args": {}}, hostile)
    cases = {"teacher": dict(student="yolov8n.yaml", teacher=str(hostile)),
             "student": dict(student=str(hostile), teacher="yolov8s.yaml"),
             "pretrained": dict(student="yolov8n.yaml", teacher="yolov8s.yaml", pretrained=str(hostile))}
    for role, given in cases.items():
        with pytest.raises(ValueError) as excinfo:
            yolo_kd.distill(**given, data=str(data), project=str(tmp_path / "runs"), name=role, **FAST_ARGS)
        message = one_line_error(excinfo)
        assert f"{role} {hostile} is refused for safety: it holds posix.system" in message, message
        assert not marker.exists() and not (tmp_path / "runs" / role).exists()
    # the kd modules beside a resumed last.pt are read by diffkd's own safe reader
    run_dir = tmp_path / "runs" / "resumed" / "weights"
    run_dir.mkdir(parents=True)
    last = teacher_file(run_dir / "last.pt", "yolov8n.yaml")
    checkpoint = torch.load(last, weights_only=False)
    torch.save({**checkpoint, "epoch": 0}, last)
    torch.save({"format": yolo_kd.STATE_FORMAT, "settings": RunsCode(marker)}, run_dir / yolo_kd.STATE_FILE)
    with pytest.raises(ValueError) as excinfo:
        yolo_kd.distill(resume=str(last))
    assert "refused for safety" in one_line_error(excinfo) and not marker.exists()
    # a checkpoint as Ultralytics writes one still loads
    teacher = yolo_kd.load_teacher(str(teacher_file(tmp_path / "genuine.pt")), "detect", teacher_data())
    assert not teacher.training


FAST_ARGS = {"method": "diffkd", **{k: v for k, v in FAST.items() if k != "exist_ok"}}  # a new run (no default method)


def test_maps_of_different_strides_are_paired_only_when_asked_and_the_head_is_no_map():
    from ultralytics.nn.tasks import DetectionModel

    student, teacher = (DetectionModel(cfg, nc=2, verbose=False) for cfg in ("yolov8n.yaml", "yolov8s.yaml"))
    for layers, expected in (({"teacher_layers": (15, 15, 15)}, "student layer 18 is a 4x4 map (stride 16) but teacher "
                                                                "layer 15 is 8x8 (stride 8)"),
                             ({"teacher_layers": (15,), "student_layers": (21,)}, "student layer 21 is a 2x2 map (stride "
                                                                                  "32) but teacher layer 15 is 8x8")):
        with pytest.raises(ValueError) as excinfo:
            yolo_kd.build_levels(student, teacher, yolo_kd.KDSettings("t.pt", method="diffkd", **layers), 64, 3)
        message = one_line_error(excinfo)
        assert expected in message and "resize_maps=True" in message, message
    _, levels = yolo_kd.build_levels(student, teacher, yolo_kd.KDSettings("t.pt", method="mse", teacher_layers=(15,),
                                                                             student_layers=(21,), resize_maps=True), 64, 3)
    assert [(lv.name, lv.teacher_layer) for lv in levels] == [("p5", 15)]
    with pytest.raises(ValueError) as excinfo:
        yolo_kd.build_levels(student, teacher, yolo_kd.KDSettings("t.pt", method="diffkd", teacher_layers=(15, 18, 22)), 64, 3)
    assert "teacher layer 22 (Detect) gives no feature map" in one_line_error(excinfo)


def test_a_run_folder_in_use_is_refused_and_failed_checks_leave_no_folder(tmp_path):
    from diffkd.engine.runlock import RunLock

    data = write_dataset(tmp_path / "data", "detect", images=2)
    folder = tmp_path / "runs" / "busy"
    held = RunLock(folder)
    held.acquire()  # another live run (here: this process) writes the folder
    try:
        with pytest.raises(ValueError) as excinfo:
            yolo_kd.distill("yolov8n.yaml", "yolov8s.yaml", data=str(data), project=str(tmp_path / "runs"),
                            name="busy", exist_ok=True, **FAST_ARGS)
        assert "is already in use" in one_line_error(excinfo) and "name= (or project=)" in str(excinfo.value)
        assert not folder.exists()  # nothing written into it
    finally:
        held.release()
    three_classes = teacher_file(tmp_path / "three.pt", nc=3)
    for teacher, expected in ((str(three_classes), "predicts 3 classes but the data has 2"),
                              ("yolov8s-seg.yaml", "is a segment model")):
        with pytest.raises(ValueError) as excinfo:
            yolo_kd.distill("yolov8n.yaml", teacher, data=str(data), project=str(tmp_path / "runs"), name="failed",
                            **FAST_ARGS)
        assert expected in one_line_error(excinfo)
        assert not (tmp_path / "runs" / "failed").exists()
    with pytest.raises(ValueError) as excinfo:
        yolo_kd.distill("yolov8n.yaml", "yolov8s.yaml", data=str(data), project=str(tmp_path / "runs"), name="failed",
                        teacher_layers=[15, 15, 15], **FAST_ARGS)
    assert "stride" in one_line_error(excinfo) and not (tmp_path / "runs" / "failed").exists()


def test_an_unknown_method_gets_the_methods_yolo_takes():
    with pytest.raises(ValueError) as excinfo:
        yolo_kd.KDSettings("t.pt", method="difkd")
    message = one_line_error(excinfo)
    assert "unknown method 'difkd' (did you mean 'diffkd'?)" in message
    assert message.endswith("YOLO distillation takes one of diffkd, mse, cwd, fgd, mgd, pkd")
    assert "crd" not in message and "regression_l1" not in message


@pytest.mark.integration
def test_diffkds_kd_warmup_moves_within_an_epoch_as_in_the_engine(tmp_path, one_thread, monkeypatch):
    """8 images in batches of 4: 2 steps an epoch, so a 1-epoch warm-up weighs the kd term 0, then 1/2, then 1."""
    heard = record_progress(monkeypatch)
    trainer = run(tmp_path, "detect", epochs=2, val=False, method_options={"kd_warmup_epochs": 1.0}, kd_lr_scale=3.0)
    assert heard == [(0.0, 2), (0.5, 2), (1.0, 2), (1.5, 2)]
    kd_group, = (g for g in trainer.optimizer.param_groups if g.get("param_group") == "kd")
    assert kd_group["initial_lr"] == pytest.approx(3.0 * trainer.args.lr0)  # kd_lr_scale: of the student's rate
    warmup = trainer.kd_step.weighting.schedules["p3"]["kd"]
    assert [warmup(epoch) for epoch, _ in heard] == [0.0, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("method", ["cwd", "fgd", "mgd", "pkd", "diffkd"])
def test_every_method_yolo_takes_runs_through_the_criterion(method):
    """One loss evaluation per method on a v8n student and a wider v8s teacher (cwd through its projector, fgd with
    the batch's boxes): finite, each kd term its own column."""
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    torch.manual_seed(0)
    student, teacher = (DetectionModel(cfg, nc=2, verbose=False) for cfg in ("yolov8n.yaml", "yolov8s.yaml"))
    student.args = DEFAULT_CFG
    step, levels = yolo_kd.build_levels(student, teacher.eval(), yolo_kd.KDSettings("t.pt", method=method), 64, 3)
    criterion = yolo_kd.DistillationCriterion(student.init_criterion(), teacher, step, levels, False, lambda: (0, 1),
                                              set())
    batch = {"img": torch.rand(2, 3, 64, 64), "batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[0.0], [1.0]]),
             "bboxes": torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.2, 0.2]])}
    loss, items = criterion(student.train()(batch["img"]), batch)
    assert torch.isfinite(loss).all() and loss[-1] > 0
    assert {k.split("_")[0] for k in criterion.columns} == {"p3", "p4", "p5"}
