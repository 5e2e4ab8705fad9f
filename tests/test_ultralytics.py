"""The Ultralytics YOLO integration: short offline trainings of every task on a tiny synthetic set written here."""
from __future__ import annotations

import os
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
    args = {**FAST, "student": MODELS[task], "teacher": MODELS[task].replace("n", "s", 1).replace("v8s", "v8s"),
            "data": str(data), "project": str(tmp_path / "runs"), "name": name, **kwargs}
    return yolo_kd.distill(**args)
