"""Issue 22, items 4-16: user mistakes and faults that ended in a traceback or were silently accepted get one
line; frictions a new user hit (import paths from the working directory, non-image files, eval of val/ alone,
file modes, best.pt size, the taps a run resolved, top-5 with few classes)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image
from test_image_folder import folder_run, write_image_folder

import diffkd
from diffkd import models
from diffkd.atomic import save_atomic
from diffkd.cli import main
from diffkd.config import ConfigError, config_from_dict, load_config
from diffkd.data import build_dataset, dataset_info
from diffkd.engine import RunWriteError, export_weights, load_checkpoint, run
from diffkd.engine.checkpoint import FORMAT, VERSION
from diffkd.models import ModelNameError
from diffkd.tasks import build_task

SRC = str(Path(diffkd.__file__).parent.parent)  # where this diffkd is imported from, for child processes

SEQUENTIAL_NETS = '''
from torch import nn


def small_cnn(num_classes, width=4, pretrained=False):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes),
    )
'''


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def folder_yaml(tmp_path: Path, root: Path, **sections: Any) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(folder_run(tmp_path, root, **sections)))
    return path


# ------------------------------------------------------------------------- 4: an unknown timm model


def test_an_unknown_timm_model_names_timms_close_matches(tmp_path: Path, capsys) -> None:
    with pytest.raises(ModelNameError) as err:
        models.create("timm:mobilenetv3_smal_100", num_classes=3)
    assert str(err.value).startswith(
        "unknown timm model 'mobilenetv3_smal_100' (closest matches: timm:mobilenetv3_small_100, "
    )
    assert str(err.value).endswith("); timm.list_models() lists all names")
    with pytest.raises(ModelNameError, match=r"^unknown timm model 'no_such_model' \(no close match\)"):
        models.default_taps("timm:no_such_model")
    root = write_image_folder(tmp_path / "pets", per_class=1)
    config = folder_yaml(tmp_path, root, model={"name": "timm:no_such_model"})
    assert main(["train", str(config)]) == 1
    assert one_line_error(capsys) == (
        "diffkd train: error: model.name: unknown timm model 'no_such_model' (no close match); "
        "timm.list_models() lists all names"
    )


# ------------------------------------------------------------------------- 5: a bad image read by a worker


@pytest.mark.integration
def test_an_unreadable_image_gives_the_same_line_with_workers(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets", per_class=2)
    noisy = tmp_path / "noisy.png"
    Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3)).save(noisy)
    broken = root / "train" / "cat" / "9.png"
    broken.write_bytes(noisy.read_bytes()[:400])  # its header reads, its pixels do not
    lines = []
    for workers in (0, 2):
        config = folder_yaml(tmp_path, root, data={"name": "image_folder", "root": str(root), "image_size": 32,
                                                    "batch_size": 3, "workers": workers})  # fmt: skip
        child = subprocess.run(
            [sys.executable, "-m", "diffkd", "train", str(config), "model.name=resnet8", "--out",
             str(tmp_path / f"run{workers}")],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}, timeout=300,
        )  # fmt: skip
        assert child.returncode == 1, child.stderr
        assert "Traceback" not in child.stderr and "DataLoader worker" not in child.stderr
        lines.append(child.stderr.strip().splitlines()[-1])
    assert lines[0] == lines[1]
    assert lines[0].startswith(f"diffkd train: error: {broken} is not an image PIL can read (OSError: ")


# ------------------------------------------------------------------------- 6: a key given twice in YAML


def test_a_yaml_key_given_twice_is_an_error_naming_both_lines(tmp_path: Path, capsys) -> None:
    config = tmp_path / "twice.yaml"
    config.write_text("model: {name: fmnist_student}\noptim:\n  lr: 0.1\ntrain:\n  epochs: 1\noptim:\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match=rf"^{config}: key 'optim' is given twice \(lines 2 and 6\); keep one$"):
        load_config(config)
    config.write_text("model: {name: fmnist_student}\noptim: {lr: 0.1, lr: 0.5}\n")
    with pytest.raises(ConfigError, match=r"key 'lr' is given twice \(line 2\); keep one$"):
        load_config(config)
    assert main(["train", str(config), "--out", str(tmp_path / "run")]) == 1
    assert one_line_error(capsys).endswith("key 'lr' is given twice (line 2); keep one")
    config.write_text("base: &base {lr: 0.1, momentum: 0.8}\noptim:\n  <<: *base\n  lr: 0.5\nmodel: {name: fmnist_student}\n")
    with pytest.raises(ConfigError, match="unknown key 'base'"):  # a merge key may be overridden: no duplicate
        load_config(config)


# ------------------------------------------------------------------------- 7: integer tap paths


def test_an_integer_tap_is_a_module_path(tmp_path: Path, monkeypatch) -> None:
    from diffkd.engine.learner import DistillLearner

    (tmp_path / "seqnets.py").write_text(textwrap.dedent(SEQUENTIAL_NETS))
    monkeypatch.syspath_prepend(str(tmp_path))
    root = write_image_folder(tmp_path / "pets", per_class=1)
    torch.save(models.create("seqnets:small_cnn", num_classes=3).state_dict(), tmp_path / "teacher.pt")
    config = tmp_path / "distill.yaml"
    config.write_text(yaml.safe_dump(folder_run(tmp_path, root)) + textwrap.dedent(f"""
        teacher: {{name: "seqnets:small_cnn", checkpoint: {tmp_path / 'teacher.pt'}}}
        student: {{name: "seqnets:small_cnn"}}
        levels:
          - {{student: 6, teacher: 6, method: kd}}
          - {{student: [0, 2], teacher: [0, 2], method: vid}}
        """))  # fmt: skip
    cfg = load_config(config)
    assert (cfg.levels[0].student, cfg.levels[1].teacher) == ("6", ["0", "2"])
    assert load_config(config, ["levels.0.teacher=5"]).levels[0].teacher == "5"  # an override too
    learner = DistillLearner(cfg, build_task(cfg))
    assert list(learner.module.methods) == ["kd_6", "vid_0"]
    assert learner.module.probed["student"]["kd_6"].shape == (2, 3)


# ------------------------------------------------------------------------- 8: a full disk, a read-only directory


def test_a_full_disk_names_the_file_and_what_was_saved(tmp_path: Path, monkeypatch) -> None:
    import diffkd.atomic as atomic

    root = write_image_folder(tmp_path / "pets", per_class=1)
    cfg = config_from_dict(folder_run(tmp_path, root, model={"name": "resnet8"}, train={
        "epochs": 2, "device": "cpu", "progress": False}))  # fmt: skip
    opened, real = [], atomic.open_temporary

    def full_on_the_second_last(path: Path) -> tuple[int, str]:
        opened.append(path.name)
        if opened.count("last.pt") == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(atomic, "open_temporary", full_on_the_second_last)
    last = Path(cfg.output.dir) / "last.pt"
    with pytest.raises(RunWriteError) as err:
        run(cfg, mode="train")
    assert str(err.value) == (
        f"cannot write {last} (No space left on device); last saved epoch 1 in {last}; rerun the same command "
        "with --resume to continue from there"
    )
    assert load_checkpoint(last)["epoch"] == 1 and not list(last.parent.glob(".*.tmp"))


def test_a_read_only_place_for_the_run_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    import diffkd.engine.runlock as runlock

    real_open = os.open

    def read_only(path: Any, flags: int, mode: int = 0o777) -> int:
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(runlock.os, "open", read_only)
    root = write_image_folder(tmp_path / "pets", per_class=1)
    config = folder_yaml(tmp_path, root, model={"name": "resnet8"})
    assert main(["train", str(config)]) == 1
    assert one_line_error(capsys) == (
        f"diffkd train: error: cannot write {tmp_path / '.run.lock'} (Read-only file system); nothing was saved "
        f"yet (no checkpoint in {tmp_path / 'run'}); rerunning the same command starts the run afresh"
    )


@pytest.mark.integration
def test_a_file_too_large_stops_the_run_with_one_line(tmp_path: Path) -> None:
    """A real fault: the child may write no file over 64 KiB (RLIMIT_FSIZE), so last.pt fails with EFBIG."""
    import resource

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    root = write_image_folder(tmp_path / "pets", per_class=1)
    config = folder_yaml(tmp_path, root, model={"name": "resnet8"})
    child = subprocess.run(
        [sys.executable, "-m", "diffkd", "train", str(config)], capture_output=True, text=True, preexec_fn=limit,
        env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}, timeout=300,
    )  # fmt: skip
    assert child.returncode == 1, child.stderr
    assert child.stderr.strip().splitlines()[-1] == (
        f"diffkd train: error: cannot write {tmp_path / 'run' / 'last.pt'} (File too large); nothing was saved yet "
        f"(no checkpoint in {tmp_path / 'run'}); rerunning the same command starts the run afresh"
    )
    assert "Traceback" not in child.stderr and not list((tmp_path / "run").glob(".*.tmp"))


# ------------------------------------------------------------------------- 9: options and positionals mixed


def test_export_takes_options_between_its_positionals(tmp_path: Path, capsys) -> None:
    weights = models.create("fmnist_student", num_classes=10).state_dict()
    ckpt = {"format": FORMAT, "version": VERSION, "mode": "train", "model": weights, "ema": None,
            "config": {"model": {"name": "fmnist_student"}}}  # fmt: skip
    (tmp_path / "run").mkdir()
    torch.save(ckpt, tmp_path / "run" / "last.pt")
    out = tmp_path / "x.pt"
    assert main(["export", str(tmp_path / "run"), "--which", "last", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    exported = torch.load(out, weights_only=True)
    assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)
    assert main(["export", "--force", str(tmp_path / "run"), "--which", "last", str(out)]) == 0
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(tmp_path / "run"), "--which", "last", str(out), "extra.pt"])
    assert exit_.value.code == 2 and "unrecognized arguments: extra.pt" in capsys.readouterr().err


# ------------------------------------------------------------------------- 10: import paths from the working directory


def test_an_import_path_missing_everywhere_says_where_python_looked() -> None:
    with pytest.raises(ModelNameError) as err:
        models.create("nowhere_pkg_zz.nets:small_cnn", num_classes=3)
    message = str(err.value)
    assert message.startswith(
        "model 'nowhere_pkg_zz.nets:small_cnn': cannot import module 'nowhere_pkg_zz.nets' (no module named "
        "'nowhere_pkg_zz' in "
    )
    shown = os.getcwd() + " (the working directory)" if sys.path[0] in ("", ".") else sys.path[0]
    assert shown in message
    assert message.endswith("run from the folder that holds nowhere_pkg_zz, or add that folder to PYTHONPATH")


@pytest.mark.integration
def test_the_console_script_imports_models_from_the_working_directory(tmp_path: Path) -> None:
    """A console script's sys.path[0] is its own folder, not the working directory (as a launcher in bin/ here)."""
    project = tmp_path / "project"
    (project / "mypkg").mkdir(parents=True)
    (project / "mypkg" / "__init__.py").write_text("")
    (project / "mypkg" / "nets.py").write_text(textwrap.dedent(SEQUENTIAL_NETS))
    launcher = tmp_path / "bin" / "diffkd"
    launcher.parent.mkdir()
    launcher.write_text("import sys\nfrom diffkd.cli import main\nsys.exit(main())\n")
    root = write_image_folder(tmp_path / "pets", per_class=1)
    config = folder_yaml(tmp_path, root, model={"name": "mypkg.nets:small_cnn"})
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    for command in (["train", str(config)], ["eval", str(tmp_path / "run")]):
        child = subprocess.run([sys.executable, str(launcher), *command], cwd=project, capture_output=True, text=True,
                               env=env, timeout=300)  # fmt: skip
        assert child.returncode == 0, child.stderr


# ------------------------------------------------------------------------- 11, 12: image folders


def test_files_without_an_image_extension_are_skipped_and_counted(tmp_path: Path, caplog) -> None:
    root = write_image_folder(tmp_path / "pets", per_class=2)
    (root / "train" / "cat" / "README.md").write_text("# cats\n")
    (root / "train" / "dog" / "notes.txt").write_text("good dogs\n")
    with caplog.at_level(logging.INFO, logger="diffkd"):
        split = build_dataset("image_folder", "train", root, image_size=16)
    assert len(split) == 6 and all(path.suffix in (".png", ".tiff", ".bmp") for path, _ in split.samples)
    assert f"image folder {root / 'train'}: skipped 2 file(s) without an image extension (cat/README.md, dog/notes.txt)" \
        in caplog.text  # fmt: skip
    (root / "train" / "cat" / "broken.JPG").write_text("not an image")  # an image extension: still an error
    with pytest.raises(ValueError, match=r"train/cat/broken.JPG is not an image PIL can read"):
        build_dataset("image_folder", "train", root, image_size=16)


def test_a_folder_with_val_alone_gives_its_classes(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets")
    import shutil

    shutil.rmtree(root / "train")
    assert dataset_info("image_folder", root).classes == ("cat", "dog", "fox")
    assert len(build_dataset("image_folder", "test", root, image_size=16)) == 6
    with pytest.raises(FileNotFoundError, match="has no train/ folder"):  # training still needs train/
        build_dataset("image_folder", "train", root, image_size=16)


# ------------------------------------------------------------------------- 13: file modes follow the umask


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        path = save_atomic({"w": torch.zeros(2)}, tmp_path / "student.pt")
        plain = tmp_path / "plain"
        plain.write_bytes(b"")  # what open() makes under this umask
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == mode == stat.S_IMODE(plain.stat().st_mode)


# ------------------------------------------------------------------------- 14, 15, 16, 12: a run's files and reports


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A teacher trained on a 3-class image folder and a student distilled from its run dir (DiffKD + KD)."""
    base = tmp_path_factory.mktemp("runs")
    root = write_image_folder(base / "pets")
    teacher = run(config_from_dict(folder_run(base, root, model={"name": "resnet8"}) | {
        "output": {"dir": str(base / "teacher"), "tensorboard": False}}), mode="train")  # fmt: skip
    handler = _Lines()
    logging.getLogger("diffkd").addHandler(handler)
    logging.getLogger("diffkd").setLevel(logging.INFO)
    try:
        student = run(config_from_dict(folder_run(
            base, root, teacher={"name": "resnet8", "checkpoint": str(teacher.run_dir)}, student={"name": "resnet8"},
            levels=[{"student": "@feature", "teacher": "@feature", "method": "diffkd", "options": {"latent_channels": 8}},
                    {"student": "@logits", "teacher": "@logits", "method": "kd"}],
        ) | {"output": {"dir": str(base / "student"), "tensorboard": False}}), mode="distill")  # fmt: skip
    finally:
        logging.getLogger("diffkd").removeHandler(handler)
        logging.getLogger("diffkd").setLevel(logging.NOTSET)
    return {"base": base, "root": root, "teacher": teacher, "student": student, "log": handler.lines}


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.integration
def test_best_checkpoint_holds_what_eval_export_visualize_and_a_teacher_need(runs: dict[str, Any], capsys) -> None:
    student_dir, base = runs["student"].run_dir, runs["base"]
    best, last = load_checkpoint(student_dir / "best.pt"), load_checkpoint(student_dir / "last.pt")
    assert {"optimizer", "scaler", "rng"} <= last.keys() and not {"optimizer", "scaler", "rng"} & best.keys()
    assert best.keys() | {"optimizer", "scaler", "rng"} == last.keys()
    assert (student_dir / "best.pt").stat().st_size < (student_dir / "last.pt").stat().st_size
    assert main(["eval", str(student_dir)]) == 0  # best.pt
    assert f"({student_dir / 'best.pt'}, epoch 1)" in capsys.readouterr().out
    exported = torch.load(export_weights(student_dir, base / "student.pt"), weights_only=True)
    assert all(torch.equal(exported[k[len("student."):]], v) for k, v in best["model"].items() if k.startswith("student."))
    assert main(["visualize", str(student_dir), "--images", "2", "--out", str(base / "pictures")]) == 0
    assert (base / "pictures" / "features.png").is_file()
    assert runs["student"].history  # the student's teacher was read from the teacher run's best.pt
    assert load_checkpoint(student_dir / "last.pt")["identity"]["teacher"]["checkpoint"] == str(
        runs["teacher"].run_dir / "best.pt")  # fmt: skip


@pytest.mark.integration
def test_distill_logs_each_levels_resolved_taps(runs: dict[str, Any]) -> None:
    taps = [line for line in runs["log"] if line.startswith("level ")]
    assert taps == [
        "level diffkd_feature (diffkd): student @feature -> layer3 (B,64,8,8) map; teacher @feature -> layer3 (B,64,8,8) map",
        "level kd_logits (kd): student @logits -> fc (B,3) vector; teacher @logits -> fc (B,3) vector",
    ]


def test_levels_are_named_alike_by_a_config_and_the_python_api(tmp_path: Path) -> None:
    from diffkd import Distiller, Level
    from diffkd.engine.learner import DistillLearner

    root = write_image_folder(tmp_path / "pets", per_class=1)
    torch.save(models.create("resnet8", num_classes=3).state_dict(), tmp_path / "teacher.pt")
    specs = [("@feature", "@feature", "mse"), ("@logits", "@logits", "kd"), ("layer2", "layer2", "mse")]
    cfg = config_from_dict(folder_run(
        tmp_path, root, teacher={"name": "resnet8", "checkpoint": str(tmp_path / "teacher.pt")},
        student={"name": "resnet8"}, levels=[{"student": s, "teacher": t, "method": m} for s, t, m in specs],
    ))  # fmt: skip
    from_config = list(DistillLearner(cfg, build_task(cfg)).module.methods)
    api = Distiller(models.create("resnet8", num_classes=3), models.create("resnet8", num_classes=3),
                    [Level(s, t, m) for s, t, m in specs], input_shape=(3, 32, 32))  # fmt: skip
    assert from_config == list(api.methods) == ["mse_feature", "kd_logits", "mse_layer2"]


@pytest.mark.integration
def test_eval_of_a_val_folder_alone_and_no_top5_with_three_classes(runs: dict[str, Any], capsys) -> None:
    import shutil

    val_only = runs["base"] / "val-only"
    shutil.copytree(runs["root"] / "val", val_only / "val")
    assert main(["eval", str(runs["student"].run_dir), "--data-root", str(val_only)]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("top1 ") and "top5" not in line and "on 6 test images" in line
    assert "test_top5" not in runs["student"].history[0] and "test_top1" in runs["student"].history[0]


def test_top5_is_reported_only_above_five_classes(tmp_path: Path) -> None:
    for count, keys in ((3, ["top1"]), (5, ["top1"]), (6, ["top1", "top5"])):
        root = write_image_folder(tmp_path / f"c{count}", classes=tuple(f"k{i}" for i in range(count)), per_class=1)
        cfg = config_from_dict(folder_run(tmp_path, root))
        metrics = build_task(cfg).metrics()
        logits = torch.eye(count)[[1, 0]]  # sample 0 predicts class 1, sample 1 predicts class 0
        metrics.update(logits, torch.tensor([1, 1]))
        assert list(metrics.compute(lambda t: t)) == keys
        assert metrics.compute(lambda t: t)["top1"] == 50.0
