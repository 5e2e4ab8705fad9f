"""data.name=image_folder: the user's own images, their class names kept by the run and checked by eval/visualize."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffkd.cli import main
from diffkd.config import ConfigError, config_from_dict
from diffkd.data import build_dataset, dataset_info
from diffkd.data.imagenet import MEAN, STD
from diffkd.engine import run

CLASSES = ("cat", "dog", "fox")
FORMATS = ("png", "tiff", "bmp")  # one per class: PIL reads them all (lossless, so colours are exact)


def colour(label: int, index: int) -> tuple[int, int, int]:
    """A solid colour per image, different for every class and image."""
    return (40 + 80 * label, 30 * index % 256, 200 - 50 * label)


def write_image_folder(root: Path, classes: tuple[str, ...] = CLASSES, per_class: int = 2, size: int = 40) -> Path:
    """root/{train,val}/<class>/<i>.<fmt>: solid-colour images, a format per class, plus a hidden file."""
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            fmt = FORMATS[label % len(FORMATS)]
            for i in range(per_class):
                Image.new("RGB", (size + 8 * i, size), colour(label, i)).save(folder / f"{i}.{fmt}")
            (folder / ".DS_Store").write_bytes(b"\x00not an image")
    return root


def test_classes_labels_and_imagenet_transforms(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets")
    info = dataset_info("image_folder", root)
    assert (info.num_classes, info.classes, info.input_size) == (3, CLASSES, (3, 224, 224))
    test = build_dataset("image_folder", "test", root, image_size=16)
    assert len(test) == 6 and [label for _, label in test.samples] == [0, 0, 1, 1, 2, 2]
    for index, (image, label) in enumerate(test):
        assert image.shape == (3, 16, 16)
        rgb = torch.tensor(colour(label, index % 2), dtype=torch.float32) / 255  # a solid image stays solid
        expected = (rgb - torch.tensor(MEAN)) / torch.tensor(STD)
        torch.testing.assert_close(image, expected.view(3, 1, 1).expand(3, 16, 16), atol=1e-5, rtol=0)
    train = build_dataset("image_folder", "train", root, image_size=16, limit=3)
    assert len(train) == 3 and train[0][0].shape == (3, 16, 16)  # RandomResizedCrop + flip at image_size


def _break(root: Path, how: str) -> None:
    if how == "class sets differ":
        (root / "val" / "fox").rename(root / "val" / "wolf")
    elif how == "empty class folder":
        for image in (root / "train" / "dog").glob("*.tiff"):
            image.unlink()
    elif how == "unreadable file":
        (root / "train" / "cat" / "notes.png").write_text("not an image")
    elif how == "no val folder":
        shutil.rmtree(root / "val")


@pytest.mark.parametrize(
    "how, message",
    [
        ("class sets differ", r"train/ and val/ have different class folders \(only in train: \['fox'\]; only in val: \['wolf'\]\)"),
        ("empty class folder", r"class folder .*train/dog holds no images"),
        ("unreadable file", r"train/cat/notes.png is not an image PIL can read"),
        ("no val folder", r"has no val/ folder; it must be laid out as <root>/train/<class>/<image>"),
    ],
)
def test_bad_image_folders(tmp_path: Path, how: str, message: str) -> None:
    root = write_image_folder(tmp_path / "pets")
    _break(root, how)
    with pytest.raises((ValueError, OSError), match=message):
        build_dataset("image_folder", "train", root, image_size=16)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data.root '.*nowhere' \(data.name=image_folder\) not found"):
        dataset_info("image_folder", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"data.root: required for data.name=image_folder"):
        dataset_info("image_folder")


def folder_run(tmp_path: Path, root: Path, **sections: object) -> dict:
    """A tiny CPU run on an image folder at 32x32 (2 steps of 3 images, one epoch)."""
    return {
        "data": {"name": "image_folder", "root": str(root), "image_size": 32, "batch_size": 3},
        "optim": {"lr": 0.01},
        "train": {"epochs": 1, "device": "cpu", "progress": False},
        "output": {"dir": str(tmp_path / "run"), "tensorboard": False},
        **sections,
    }


@pytest.mark.integration
def test_run_keeps_class_names_for_eval_and_visualize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_image_folder(tmp_path / "pets")
    torch.manual_seed(0)
    from diffkd import models

    teacher = tmp_path / "teacher.pt"
    torch.save(models.create("resnet8", num_classes=3).state_dict(), teacher)
    cfg = config_from_dict(folder_run(
        tmp_path, root,
        teacher={"name": "resnet8", "checkpoint": str(teacher)},
        student={"name": "resnet8"},
        levels=[{"student": "@feature", "teacher": "@feature", "method": "diffkd", "options": {"latent_channels": 8}}],
    ))
    result = run(cfg, mode="distill")
    run_dir = result.run_dir
    assert json.loads((run_dir / "classes.json").read_text()) == list(CLASSES)

    assert main(["eval", str(run_dir)]) == 0
    assert "3 classes (as in the run): cat, dog, fox" in capsys.readouterr().out
    assert main(["visualize", str(run_dir), "--images", "2", "--out", str(tmp_path / "pictures")]) == 0
    assert "on 2 test images (cat, dog)" in capsys.readouterr().out  # evenly spaced: items 0 and 3 of 6

    other = write_image_folder(tmp_path / "zoo", classes=("cat", "dog", "owl"))
    assert main(["eval", str(run_dir), "--data-root", str(other)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "has other classes than the run" in err and "missing ['fox'], not in the run ['owl']" in err

    (run_dir / "classes.json").unlink()
    with pytest.raises(ConfigError, match=r"classes.json not found: the run's class names are needed"):
        run(cfg, mode="distill", resume=True)

    for name in ("last.pt", "best.pt", "metrics.csv", "curves.png"):  # as if it died before its first checkpoint
        (run_dir / name).unlink()
    (run_dir / "classes.json").write_text("[]")
    run(cfg, mode="distill")  # the same command starts it again (classes.json is the run's own file)
    assert json.loads((run_dir / "classes.json").read_text()) == list(CLASSES)


@pytest.mark.integration
def test_model_class_count_follows_the_folders(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets", classes=("a", "b", "c", "d"), per_class=1)
    cfg = config_from_dict(folder_run(tmp_path, root, model={"name": "resnet8"}))
    cfg.data.batch_size = 2
    from diffkd.engine.learner import PlainLearner
    from diffkd.tasks import build_task

    assert PlainLearner(cfg, build_task(cfg)).student.fc.out_features == 4
