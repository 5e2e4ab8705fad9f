"""Accuracy ladder on Fashion-MNIST: every method on one teacher/student pair and one recipe, N seeds.

    python benchmarks/accuracy.py ladder [--seeds 3] [--quick] [--out runs/bench-accuracy]
    python benchmarks/accuracy.py nfe | latent | anm | placement       # the paper's ablations
    python benchmarks/accuracy.py warmup | normalize | sampler | standardize | combined   # DiffKD variants (issue 17)
    python benchmarks/accuracy.py baselines   # RKD, PKT, VID, CRD, ReviewKD, SRRL beside the anchors
    python benchmarks/accuracy.py ladder --methods "student alone" DIST   # a subset of a table's rows

Writes results.csv (one row per run), table.md (mean ± std over seeds, gain over the student
alone) and accuracy.png (bars with std error bars) into the output folder; the teacher is trained
once per output folder (cached, as in `diffkd demo`), and `--train-items` / `--epochs` change only the
students, so several student sizes share one teacher. The outputs are rewritten after every run, and
a rerun resumes unfinished runs and rereads finished ones. Same command on a GPU: add `--device cuda`.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path
from typing import Any

from diffkd.config import config_from_dict
from diffkd.demo import SIZES, DemoSize, cached_teacher, recipe, teacher_config

FEATURE = {"student": "@feature", "teacher": "@feature"}
LOGITS = {"student": "@logits", "teacher": "@logits"}


def diffkd_level(where: dict, **options: Any) -> dict:
    return {**where, "method": "diffkd", "options": options}


FEATURE_DIFFKD = {"latent_channels": 64}  # the demo's CPU setting (see diffkd.demo)
LADDER: dict[str, list[dict]] = {
    "student alone": [],
    "KD": [{**LOGITS, "method": "kd", "options": {"tau": 4.0}}],
    "MSE": [{**FEATURE, "method": "mse"}],
    "DIST": [{**LOGITS, "method": "dist"}],
    "DKD": [{**LOGITS, "method": "dkd", "options": {"warmup_epochs": 1}}],
    "DiffKD feature": [diffkd_level(FEATURE, **FEATURE_DIFFKD)],
    "DiffKD logits": [diffkd_level(LOGITS, distance="kl", tau=1.0)],
    "DiffKD feature+logits": [diffkd_level(FEATURE, **FEATURE_DIFFKD), diffkd_level(LOGITS, distance="kl", tau=1.0)],
    "DiffKD+DIST": [diffkd_level(FEATURE, **FEATURE_DIFFKD), diffkd_level(LOGITS, distance="dist")],
    # the issue-17 variants chosen from the ablation-size groups below (docs/benchmarks.md)
    "DiffKD normalised": [diffkd_level(FEATURE, normalize_target=True, **FEATURE_DIFFKD)],
    "DiffKD normalised+DPM": [diffkd_level(FEATURE, normalize_target=True, sampler="dpm_solver++", **FEATURE_DIFFKD)],
    # weight: auto (issue 24): the level's kd term (DIST: its loss) scaled to the cross-entropy over the first 100 steps
    "DiffKD feature auto": [{**diffkd_level(FEATURE, **FEATURE_DIFFKD), "weight": "auto"}],
    "DIST auto": [{**LOGITS, "method": "dist", "weight": "auto"}],
}
# The paper's other baselines at their papers' default weights (DESIGN.md 4b). Stages of the Fashion-MNIST
# pair (diffkd.models.fashion) matched by size: student 8@28, 16@14, 32@7; teacher 32@28, 64@14, 256@7.
STUDENT_STAGES, TEACHER_STAGES = ["features.0", "features.1", "features.2"], ["features.0", "features.1", "features.3"]
BASELINES: dict[str, list[dict]] = {
    "RKD": [{**FEATURE, "method": "rkd"}],  # distance 25 + angle 50 on the pooled feature
    "PKT": [{**FEATURE, "method": "pkt", "weight": 30000.0}],
    "VID": [{"student": STUDENT_STAGES, "teacher": TEACHER_STAGES, "method": "vid"}],
    "CRD": [{**FEATURE, "method": "crd", "weight": 0.8}],  # 16384 negatives of other classes, T 0.07
    # CIFAR weight 5; its 20-epoch ramp shortened to 1 epoch on this 5-epoch recipe, as DKD's above (a per-epoch
    # ramp (epoch + 1) / 1: the full weight from the first step)
    "ReviewKD": [{"student": STUDENT_STAGES, "teacher": TEACHER_STAGES, "method": "reviewkd", "weight": 5.0,
                  "options": {"warmup_epochs": 1}}],
    "SRRL": [{**FEATURE, "method": "srrl", "options": {"teacher_head": "fc"}}],
}
LADDER.update(BASELINES)
ALONE = {"student alone": []}  # every ablation carries the baseline, so its gains are read at its own size
ABLATIONS: dict[str, dict[str, list[dict]]] = {
    "nfe": {**ALONE, **{f"NFE {k}": [diffkd_level(FEATURE, inference_steps=k, **FEATURE_DIFFKD)] for k in (1, 2, 3, 5, 8)}},
    "latent": {
        **ALONE,
        **{f"latent {c}": [diffkd_level(FEATURE, latent_channels=c)] for c in (16, 32, 64, 128)},
        "no AE (256)": [diffkd_level(FEATURE)],
    },
    "anm": {**ALONE, **{f"ANM {'on' if on else 'off'}": [diffkd_level(FEATURE, adaptive_noise=on, **FEATURE_DIFFKD)]
                        for on in (True, False)}},
    "placement": {k: LADDER[k] for k in ("student alone", "DiffKD feature", "DiffKD logits", "DiffKD feature+logits")},
    "baselines": {**{k: LADDER[k] for k in ("student alone", "KD", "DIST", "DiffKD feature")}, **BASELINES},
}
# Beyond the paper (issue 17): each group beside its own student alone and the default DiffKD feature row
# (the same configs in every group: their finished runs may be copied between group folders and are reread).
DEFAULT = {**ALONE, "DiffKD feature": LADDER["DiffKD feature"]}
LS_RECIPE = {"tau": 2.0, "standardize": True}  # logit standardization's recipe: tau 2, KD weight 9 (CE weight 1)
ABLATIONS.update({
    "warmup": {**DEFAULT, **{f"warm-up {e} epoch{'s' if e > 1 else ''}": [diffkd_level(FEATURE, kd_warmup_epochs=e, **FEATURE_DIFFKD)]
                             for e in (1, 2)}},
    "normalize": {**DEFAULT, "normalised target": LADDER["DiffKD normalised"]},
    "sampler": {  # DiffKD feature is DDIM at NFE 5
        **DEFAULT,
        **{f"DDIM NFE {k}": [diffkd_level(FEATURE, inference_steps=k, **FEATURE_DIFFKD)] for k in (1, 2, 3)},
        **{f"DPM-Solver++ NFE {k}": [diffkd_level(FEATURE, inference_steps=k, sampler="dpm_solver++", **FEATURE_DIFFKD)]
           for k in (1, 2, 3, 5)},
    },
    "standardize": {
        **DEFAULT,
        "KD": LADDER["KD"],
        "KD+LS": [{**LOGITS, "method": "kd", "weight": 9.0, "options": LS_RECIPE}],
        "DiffKD logits": LADDER["DiffKD logits"],
        "DiffKD logits+LS": [diffkd_level(LOGITS, distance="kl", tau=1.0, standardize=True)],
        "DiffKD logits+LS tau2 w9": [diffkd_level(LOGITS, distance="kl", kd_weight=9.0, **LS_RECIPE)],
    },
    # the two options that came out above the default at the paper's NFE, together
    "combined": {**DEFAULT, "normalised+DPM-Solver++": LADDER["DiffKD normalised+DPM"]},
})


def run_method(levels: list[dict], seed: int, size: DemoSize, out: Path, teacher_dir: Path, device: str,
               data_root: str | None) -> dict:
    """Train one student with `levels` (empty: alone) and return its final test top-1 and cost."""
    from diffkd.engine import resume_or_restart, run

    cfg = recipe(size, size.student_epochs, out, device, data_root)
    cfg["train"]["seed"] = seed
    if levels:
        cfg.update(teacher={"name": "fmnist_teacher", "checkpoint": str(teacher_dir)},
                   student={"name": "fmnist_student"}, levels=levels)
    else:
        cfg["model"] = {"name": "fmnist_student"}
    result = run(config_from_dict(cfg), mode="distill" if levels else "train", **resume_or_restart(out))
    return {"top1": result.final_top1, "seconds": result.train_seconds, "extra": result.extra_parameters}


def summarize(rows: list[dict], baseline: str | None) -> list[dict]:
    """Mean, std over seeds and gain over the baseline method, in the order methods first appear."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    summary = []
    for m in methods:
        values = [r["top1"] for r in rows if r["method"] == m]
        summary.append({"method": m, "mean": statistics.mean(values),
                        "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values),
                        "seconds": statistics.mean(r["seconds"] for r in rows if r["method"] == m)})
    base = next((s["mean"] for s in summary if s["method"] == baseline), None)
    for s in summary:
        s["gain"] = s["mean"] - base if base is not None else float("nan")
    return summary


def write_outputs(rows: list[dict], summary: list[dict], out: Path, title: str) -> str:
    """results.csv, table.md and accuracy.png; returns the markdown table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "seed", "top1", "seconds", "extra"])
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| method | top-1 mean ± std (n) | gain | train s |", "|---|---|---|---|"]
    lines += [f"| {s['method']} | {s['mean']:.2f} ± {s['std']:.2f} ({s['n']}) | {s['gain']:+.2f} | {s['seconds']:.0f} |"
              for s in summary]
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(f"{title}\n\n{table}")
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(summary)), 3.4))
    ax.bar(range(len(summary)), [s["mean"] for s in summary], yerr=[s["std"] for s in summary], capsize=3, color="#6a9fd4")
    ax.set_xticks(range(len(summary)), [s["method"] for s in summary], rotation=30, ha="right", fontsize=8)
    low = min(s["mean"] - s["std"] for s in summary)
    ax.set_ylim(low - 1, max(s["mean"] + s["std"] for s in summary) + 0.5)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["ladder", *ABLATIONS])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the demo's quick size (smoke test)")
    parser.add_argument("--out", default="runs/bench-accuracy")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root")
    parser.add_argument("--train-items", type=int, help="override the size's training items")
    parser.add_argument("--epochs", type=int, help="override the size's student epochs")
    parser.add_argument("--methods", nargs="+", metavar="METHOD", help="run only these rows of the table (names as listed)")
    args = parser.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    students = DemoSize(args.train_items or size.train_items, size.test_items, size.teacher_epochs,
                        args.epochs or size.student_epochs)
    root = Path(args.out)
    teacher_top1, _, _ = cached_teacher(teacher_config(size, root, args.device, args.data_root))
    methods = LADDER if args.what == "ladder" else ABLATIONS[args.what]
    if args.methods:
        unknown = [m for m in args.methods if m not in methods]
        if unknown:
            parser.error(f"unknown method(s) {unknown} for {args.what}; choose from {list(methods)}")
        methods = {m: methods[m] for m in args.methods}
    out = root / (args.what if students == size else f"{args.what}-{students.train_items}x{students.student_epochs}")
    out.mkdir(parents=True, exist_ok=True)
    title = (f"Fashion-MNIST fmnist_teacher ({teacher_top1:.2f}) -> fmnist_student, {students.train_items} train items, "
             f"{students.student_epochs} epochs, {args.seeds} seeds: {args.what}")
    rows, table = [], ""
    for seed in range(args.seeds):
        for method, levels in methods.items():
            run_dir = out / "runs" / f"{method.replace(' ', '_').replace('+', 'plus')}-seed{seed}"
            r = run_method(levels, seed, students, run_dir, root / "teacher", args.device, args.data_root)
            rows.append({"method": method, "seed": seed, **r})
            print(f"{method} seed {seed}: top-1 {r['top1']:.2f} ({r['seconds']:.0f} s)", flush=True)
            table = write_outputs(rows, summarize(rows, "student alone"), out, title)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
