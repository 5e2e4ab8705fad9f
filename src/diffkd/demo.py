"""`diffkd demo`: the main job. On Fashion-MNIST, train a teacher (cached), then one small student
three ways (alone, KD, DiffKD on the last feature map and the logits) with one recipe, and report.

The recipe lives here, not in a YAML file, so the demo runs from an installed package. DiffKD's
feature level uses the paper's linear autoencoder (latent 64 channels): without it the 256-channel
noise predictor costs ~10x a KD step on a CPU (benchmarks/cost.py), which would not fit the time
budget; the logits level is the mlp kind with KL (tau 1), as in the paper.
"""
from __future__ import annotations

import argparse
import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cli import Command
from .config import Config, config_from_dict


@dataclass(frozen=True)
class DemoSize:
    """How much data and how many epochs: `quick` fits 3 minutes on 2 CPU cores, `full` 15."""

    train_items: int
    test_items: int
    teacher_epochs: int
    student_epochs: int


SIZES = {
    "quick": DemoSize(train_items=6000, test_items=2000, teacher_epochs=2, student_epochs=2),
    "full": DemoSize(train_items=15000, test_items=10000, teacher_epochs=5, student_epochs=5),
}

STUDENTS: dict[str, list[dict[str, Any]]] = {
    "student alone": [],
    "KD": [{"student": "@logits", "teacher": "@logits", "method": "kd", "options": {"tau": 4.0}}],
    "DiffKD": [
        {"student": "@feature", "teacher": "@feature", "method": "diffkd", "options": {"latent_channels": 64}},
        {"student": "@logits", "teacher": "@logits", "method": "diffkd", "options": {"distance": "kl", "tau": 1.0}},
    ],
}


def recipe(size: DemoSize, epochs: int, out: Path, device: str, data_root: str | None) -> dict[str, Any]:
    """The shared recipe (data, optimizer, schedule) as a config dict."""
    return {
        "task": "classification",
        "data": {"name": "fashion_mnist", "root": data_root, "batch_size": 64,
                 "limit_train": size.train_items, "limit_test": size.test_items},
        "optim": {"name": "adamw", "lr": 0.01, "weight_decay": 0.05, "no_decay_norm_bias": True},
        "schedule": {"name": "cosine", "warmup_epochs": 0.25},
        "train": {"epochs": epochs, "seed": 0, "device": device},
        "output": {"dir": str(out), "tensorboard": False},
    }


def teacher_config(size: DemoSize, root: Path, device: str, data_root: str | None) -> Config:
    cfg = recipe(size, size.teacher_epochs, root / "teacher", device, data_root)
    cfg["model"] = {"name": "fmnist_teacher"}
    return config_from_dict(cfg)


def student_config(levels: list[dict[str, Any]], size: DemoSize, out: Path, teacher_dir: Path,
                   device: str, data_root: str | None) -> tuple[str, Config]:
    cfg = recipe(size, size.student_epochs, out, device, data_root)
    if not levels:
        cfg["model"] = {"name": "fmnist_student"}
        return "train", config_from_dict(cfg)
    cfg["teacher"] = {"name": "fmnist_teacher", "checkpoint": str(teacher_dir)}
    cfg["student"] = {"name": "fmnist_student"}
    cfg["levels"] = levels
    return "distill", config_from_dict(cfg)


def cached_teacher(cfg: Config) -> tuple[float, float, bool]:
    """(top-1, seconds, reused): reuse a finished teacher run with the same config, else train it."""
    from .config import config_to_dict, load_config
    from .engine import run

    run_dir = Path(cfg.output.dir)
    saved = run_dir / "config.yaml"
    if (run_dir / "best.pt").exists() and saved.exists():
        if config_to_dict(load_config(saved)) == config_to_dict(cfg):
            with open(run_dir / "metrics.csv") as f:
                rows = list(csv.DictReader(f))
            if len(rows) == cfg.train.epochs:
                return float(rows[-1]["test_top1"]), 0.0, True
    result = run(cfg, mode="train", force=run_dir.exists())
    return result.final_top1, result.train_seconds, False


def write_report(rows: list[dict[str, Any]], teacher_top1: float, out: Path) -> str:
    """table.md, table.csv and accuracy.png in `out`; returns the markdown table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows[0]["top1"]
    lines = [f"Teacher (fmnist_teacher) top-1: {teacher_top1:.2f}", "",
             "| method | top-1 (%) | gain over student | train time (s) | extra parameters |",
             "|---|---|---|---|---|"]
    for r in rows:
        r["gain"] = r["top1"] - base
        lines.append(f"| {r['method']} | {r['top1']:.2f} | {r['gain']:+.2f} | {r['seconds']:.1f} | {r['extra']:,} |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "top1", "gain", "seconds", "extra"])
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar([r["method"] for r in rows], [r["top1"] for r in rows], color=["#999", "#6a9fd4", "#d46a6a"])
    ax.axhline(teacher_top1, color="k", ls="--", lw=1, label=f"teacher {teacher_top1:.2f}")
    low = min(min(r["top1"] for r in rows), teacher_top1)
    ax.set_ylim(low - 2, max(teacher_top1, max(r["top1"] for r in rows)) + 1)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Fashion-MNIST: fmnist_student")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    return table


def run_demo(size_name: str, root: Path, device: str = "auto", data_root: str | None = None,
             size: DemoSize | None = None) -> tuple[Path, str]:
    """Run the whole demo; returns (results directory, markdown table)."""
    from .engine import run

    size = size or SIZES[size_name]
    root = Path(root)
    t_cfg = teacher_config(size, root, device, data_root)
    teacher_top1, teacher_seconds, reused = cached_teacher(t_cfg)
    print(f"teacher: top-1 {teacher_top1:.2f}" + (" (cached)" if reused else f" ({teacher_seconds:.0f} s)"), flush=True)
    results = root / time.strftime("students-%Y%m%d-%H%M%S")
    rows = []
    for method, levels in STUDENTS.items():
        out = results / method.lower().replace(" ", "_")
        mode, cfg = student_config(levels, size, out, root / "teacher", device, data_root)
        result = run(cfg, mode=mode)
        rows.append({"method": method, "top1": result.final_top1, "seconds": result.train_seconds,
                     "extra": result.extra_parameters})
        print(f"{method}: top-1 {result.final_top1:.2f} ({result.train_seconds:.0f} s)", flush=True)
    return results, write_report(rows, teacher_top1, results)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a smaller run (about 3 minutes on 2 CPU cores)")
    parser.add_argument("--out", default=None, help="demo directory (default runs/demo or runs/demo-quick)")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    parser.add_argument("--data-root", default=None, help="Fashion-MNIST folder if not the Debian one")


def _run(args: argparse.Namespace) -> int:
    name = "quick" if args.quick else "full"
    root = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo"))
    start = time.perf_counter()
    results, table = run_demo(name, root, args.device, args.data_root)
    print("\n" + table)
    print(f"wrote {results}/table.md, table.csv, accuracy.png ({time.perf_counter() - start:.0f} s in all)")
    return 0


COMMAND = Command(
    "the main job: teacher, then student alone / KD / DiffKD on Fashion-MNIST, and a table",
    "Train a Fashion-MNIST teacher (cached in the demo directory: a second run reuses it), then the same\n"
    "small student alone, with KD, and with DiffKD (last feature map + logits) under one recipe, and\n"
    "print accuracy, gain over the student alone, training time and extra parameters. The table\n"
    "(markdown + CSV) and a bar chart go into a new students-<time> folder of the demo directory.\n\n"
    "example:\n  diffkd demo --quick\n  diffkd demo --device cuda --out runs/demo-gpu",
    _arguments,
    _run,
)
