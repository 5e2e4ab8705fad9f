"""Segmentation benchmark on Fashion-MNIST mosaics: student alone, DIST, DiffKD (DIST distance) and CWD on the logits map.

Trains the teacher once (or reuses its run), then each method for each seed through the engine, and
writes results.json and results.md (mean and spread of the best and final val mIoU over seeds).
A rerun resumes unfinished runs from their last.pt and rereads finished ones, so adding a seed or a
method costs only the new runs.

    python benchmarks/segmentation.py        # CPU size: 64x64 canvases, R34 (width 1/4) -> R18 (width 1/8)
    python benchmarks/segmentation.py --grid 4 --train 20000 --val 2000 --teacher deeplabv3_resnet101 \
        --teacher-width 0.5 --width 0.25 --teacher-epochs 40 --epochs 40 --batch-size 32 --workers 8 \
        --threads 0 --seeds 0 1 2 --device cuda --out runs/bench/seg_gpu

On a CPU shared with other work, `--threads 1` (the default) is far faster than letting every
process spin several OpenMP threads.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from diffkd.config import Config, load_config
from diffkd.engine import resume_or_restart, run
from diffkd.segmentation import mosaic

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "segmentation"
# "*_auto" keep the recipe and let `weight: auto` scale the level so that it equals the segmentation loss over
# the first 100 steps (ratio 1; diffkd: its kd term, while its diffusion loss keeps weight 1).
AUTO = ("levels.0.weight=auto",)
METHODS = {  # name -> (config file, engine mode, overrides)
    "student": ("mosaic_student.yaml", "train", ()),
    "kd": ("mosaic_kd.yaml", "distill", ()),
    "dist": ("mosaic_dist.yaml", "distill", ()),
    "diffkd": ("mosaic_diffkd.yaml", "distill", ()),
    "cwd": ("mosaic_cwd.yaml", "distill", ()),
    "diffkd_auto": ("mosaic_diffkd.yaml", "distill", AUTO),
    "cwd_auto": ("mosaic_cwd.yaml", "distill", AUTO),
}
DEFAULT_METHODS = ("student", "dist", "diffkd", "cwd")
log = logging.getLogger("diffkd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench/segmentation", help="folder for the runs and the results")
    p.add_argument("--data", help="mosaic folder (default OUT/data, generated from the size flags if missing)")
    p.add_argument("--grid", type=int, default=2, help="cells per canvas side (canvas = grid * cell pixels)")
    p.add_argument("--cell", type=int, default=32)
    p.add_argument("--train", type=int, default=6000, help="training canvases")
    p.add_argument("--val", type=int, default=1000, help="validation canvases")
    p.add_argument("--teacher", default="deeplabv3_resnet34")
    p.add_argument("--student", default="deeplabv3_resnet18")
    p.add_argument("--teacher-width", type=float, default=0.25, help="width multiplier of the teacher")
    p.add_argument("--width", type=float, default=0.125, help="width multiplier of the student")
    p.add_argument("--teacher-epochs", type=int, default=16)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(METHODS))
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    return p.parse_args(argv)


def make_config(file: str, args: argparse.Namespace, run_dir: Path, data: Path, seed: int, epochs: int,
                teacher_dir: Path | None, extra: tuple[str, ...] = ()) -> Config:
    """A mosaic recipe with the benchmark's sizes as overrides."""
    canvas = args.grid * args.cell
    overrides = [
        f"data.root={data}", f"data.batch_size={args.batch_size}", f"data.workers={args.workers}",
        f"segmentation.crop_size=[{canvas},{canvas}]", f"segmentation.width_mult={args.width}",
        f"segmentation.teacher_width_mult={args.teacher_width}",
        f"optim.lr={args.lr}", f"train.epochs={epochs}", f"train.seed={seed}", f"train.device={args.device}",
        "train.progress=false", "output.tensorboard=false", f"output.dir={run_dir}", *extra,
    ]  # fmt: skip
    cfg = load_config(CONFIGS / file, overrides)
    for section in ("model", "student"):
        if getattr(cfg, section) is not None:
            getattr(cfg, section).name = args.student
    if cfg.teacher is not None:
        cfg.teacher.name, cfg.teacher.checkpoint = args.teacher, str(teacher_dir)
    return cfg


def train_teacher(args: argparse.Namespace, out: Path, data: Path) -> dict[str, Any]:
    """The teacher's run (reused when OUT/teacher already holds a finished one)."""
    run_dir = out / "teacher"
    summary = run_dir / "summary.json"
    if summary.is_file():
        log.info("reusing the teacher in %s", run_dir)
        return json.loads(summary.read_text())
    cfg = make_config("mosaic_teacher.yaml", args, run_dir, data, 0, args.teacher_epochs, None)
    cfg.model.name, cfg.segmentation.width_mult = args.teacher, args.teacher_width
    result = run(cfg, mode="train", **resume_or_restart(run_dir))
    record = {"best_miou": result.best_top1, "final_miou": result.final_top1, "train_seconds": result.train_seconds}
    summary.write_text(json.dumps(record, indent=1))
    return record


def spread(values: list[float]) -> str:
    """mean ± sample standard deviation (just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(results: dict[str, Any]) -> str:
    """The markdown table of one benchmark."""
    teacher, width = results["teacher"], results["args"]["teacher_width"]
    rows = [
        "| method | best val mIoU | final val mIoU | seeds | train s / run | extra params |",
        "|---|---|---|---|---|---|",
        (
            f"| teacher ({results['teacher_name']}, width {width}) | {teacher['best_miou']:.2f} | "
            f"{teacher['final_miou']:.2f} | 1 | {teacher['train_seconds']:.0f} | - |"
        ),
    ]
    for method, runs in results["methods"].items():
        best = [r["best_miou"] for r in runs]
        final = [r["final_miou"] for r in runs]
        seconds = statistics.mean(r["train_seconds"] for r in runs)
        rows.append(f"| {method} ({results['student_name']}, width {results['args']['width']}) | {spread(best)} | {spread(final)} | {len(runs)} | "
                    f"{seconds:.0f} | {runs[0]['extra_parameters']:,} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = mosaic.MosaicSpec(grid=args.grid, cell=args.cell, train=args.train, val=args.val)
    data = mosaic.ensure(Path(args.data) if args.data else out / "data", spec)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "args": vars(args), "teacher_name": args.teacher, "student_name": args.student,
        "teacher": train_teacher(args, out, data), "methods": {},
    }  # fmt: skip
    for method in args.methods:
        file, mode, extra = METHODS[method]
        for seed in args.seeds:
            cfg = make_config(file, args, out / f"{method}_seed{seed}", data, seed, args.epochs, out / "teacher", extra)
            result = run(cfg, mode=mode, **resume_or_restart(Path(cfg.output.dir)))
            results["methods"].setdefault(method, []).append({
                "seed": seed, "best_miou": result.best_top1, "final_miou": result.final_top1,
                "train_seconds": result.train_seconds, "extra_parameters": result.extra_parameters,
                "history": [{k: v for k, v in h.items() if not k.startswith(("train_iou_", "test_iou_"))} for h in result.history],
            })  # fmt: skip
            (out / "results.json").write_text(json.dumps(results, indent=1))
    results["wall_seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = table(results)
    (out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
