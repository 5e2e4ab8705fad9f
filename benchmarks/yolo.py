"""YOLO benchmark inside Ultralytics' own trainer: a YOLOv8n student alone, with Ultralytics' native KD, and with
diffkd's methods from a YOLOv8s teacher, in two workflows on Fashion-MNIST mosaics (offline, real training).

Mosaics on textured canvases, 1-6 items at 22-56 px. Two tasks with other classes:
- Source task: trousers, sandals, sneakers, bags and ankle boots. YOLOv8s and YOLOv8n are trained on it once: they
  stand for the COCO weights a YOLO user starts from.
- Target task: the five tops (T-shirt, pullover, dress, coat, shirt), which look alike. The teacher is the source
  YOLOv8s fine-tuned on it.
- Workflow `scratch`: students from random weights, a long schedule. Workflow `finetune`: students from the source
  YOLOv8n, a short schedule (how most YOLO users work).

Everything is cached in OUT (a cached stage whose spec changed is refused) and every run is its own process that
writes its result.json, so an interrupted benchmark continues where it stopped and a rerun rewrites the tables from
the finished runs. Scored: Ultralytics' validator on the final epoch's EMA (no selection on the scored set).

    OMP_NUM_THREADS=1 python benchmarks/yolo.py --out runs/bench/yolo --workflows scratch finetune --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write  # noqa: E402  (benchmarks/results.py)

SOURCE_CLASSES = (1, 5, 7, 8, 9)  # Trouser, Sandal, Sneaker, Bag, Ankle boot
TARGET_CLASSES = (0, 2, 3, 4, 6)  # T-shirt/top, Pullover, Dress, Coat, Shirt
ITEMS = dict(background="texture", max_items=6, min_scale=0.8, max_scale=2.0)  # every task's canvases and items


@dataclass(frozen=True)
class Row:
    """One row of the table: how a student is trained (`method` None: Ultralytics alone, "native": its own KD)."""

    label: str
    method: str | None = None
    kd_weight: float | str = "auto"
    options: dict[str, Any] = field(default_factory=dict)
    kd_lr_scale: float | None = None  # None: the integration's default


# Every diffkd row uses one weight rule, fixed before any row ran: kd_weight=auto, so that the distillation terms of
# the three neck levels together equal Ultralytics' task loss (box + cls + dfl) over the first epoch (the paper's
# "a similar amount of loss value"). Apart from that, each method keeps its own defaults.
ROWS: dict[str, Row] = {
    "student": Row("student alone"),
    "native": Row("Ultralytics native KD (dis 6)", "native"),
    "mse": Row("mse (FitNet)", "mse"),
    "cwd": Row("cwd", "cwd"),
    "fgd": Row("fgd", "fgd"),
    "mgd": Row("mgd", "mgd"),
    "pkd": Row("pkd", "pkd"),
    "diffkd": Row("DiffKD (preset)", "diffkd"),
}


@dataclass(frozen=True)
class Workflow:
    """Where the students train (the target task, or the source task for tuning), from which teacher, how they start
    and for how long; `fraction` of the training images."""

    label: str
    task: str
    teacher: str
    pretrained: bool
    epochs: int
    fraction: float = 1.0


WORKFLOWS = {
    # Schedules short enough that the teacher is at least 1.5x the student alone (seed 0: 10 epochs 0.370, 5 epochs
    # 0.403, teacher 0.648; the first setting's 20 and 8 epochs gave 1.35x and 1.41x)
    "scratch": Workflow("from scratch", "target", "teacher", False, 10),
    "finetune": Workflow("fine-tuning pretrained weights", "target", "teacher", True, 5),
    # Options are searched here only, never on the rows reported: the source task's classes, its own teacher, 800 of
    # its training images, from scratch.
    "tuning": Workflow("tuning setting (source task)", "source", "source-teacher", False, 10, fraction=0.4),
}
# Rows run only on the tuning setting: the options a preset is chosen among.
PAPER_MSE = {"distance": "mse", "tau": None, "kd_weight": 1.0}  # the paper's main detection row, weights by auto
TUNING_ROWS: dict[str, Row] = {
    "diffkd_mse_auto": Row("DiffKD, MSE, auto (kd calibrated)", "diffkd", options=PAPER_MSE, kd_lr_scale=1.0),
    "diffkd_paper": Row("DiffKD, attention-MSE x5 (the integration's old default)", "diffkd", 1.0,
                        options={"distance": "attention_mse", "tau": 0.5, "kd_weight": 5.0}, kd_lr_scale=1.0),
    "diffkd_mse_auto_lr3": Row("DiffKD, MSE, auto, kd lr x3", "diffkd", options=PAPER_MSE, kd_lr_scale=3.0),
    "diffkd_mse_auto_lr10": Row("DiffKD, MSE, auto, kd lr x10", "diffkd", options=PAPER_MSE, kd_lr_scale=10.0),
    "mse_lr10": Row("mse (FitNet), kd lr x10", "mse", kd_lr_scale=10.0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench/yolo", help="folder for the data, the cached models, the runs, the results")
    p.add_argument("--canvas", type=int, default=128, help="mosaic side in pixels, also imgsz")
    p.add_argument("--source-images", type=int, default=2000)
    p.add_argument("--train-images", type=int, default=800, help="target training images")
    p.add_argument("--val-images", type=int, default=400, help="target validation images (the scored set)")
    p.add_argument("--teacher", default="yolov8s.yaml")
    p.add_argument("--student", default="yolov8n.yaml")
    p.add_argument("--source-epochs", type=int, default=20)
    p.add_argument("--teacher-epochs", type=int, default=40)
    p.add_argument("--epochs", type=int, help="override every workflow's student epochs (for quick checks)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=[*ROWS, *TUNING_ROWS])
    p.add_argument("--workflows", nargs="+", default=["scratch", "finetune"], choices=list(WORKFLOWS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action="store_true", help="mixed precision (Ultralytics' amp=True; a GPU check)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--data-root", help="Fashion-MNIST folder (default: diffkd's usual places)")
    p.add_argument("--prepare", action="store_true", help="only build the data and the cached models")
    p.add_argument("--profile", action="store_true",
                   help="only time the parts of a step (CPU seconds per batch, random weights): where the time goes")
    p.add_argument("--results", help="also write benchmarks/results/<RESULTS>.json (the file the docs' tables are "
                                     "rendered from), e.g. --results yolo")
    p.add_argument("--run", help=argparse.SUPPRESS)  # WORKFLOW/ROW: one run, in its own process
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    p.add_argument("--stage", help=argparse.SUPPRESS)  # one cached model, in its own process
    return p.parse_args(argv)


def offline_ultralytics(folder: Path) -> None:
    """Set before Ultralytics is imported: no network probes, settings in `folder`, a font where its plots look."""
    (folder / "Ultralytics").mkdir(parents=True, exist_ok=True)
    font = folder / "Ultralytics" / "Arial.ttf"
    if not font.exists():
        import matplotlib

        shutil.copy(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf", font)
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_CONFIG_DIR"] = str(folder)


# ----------------------------------------------------------------------------------------------- data
def export_yolo(mosaics: Path, out: Path) -> Path:
    """The COCO-format mosaics as a YOLO data folder (images/, labels/, data.yaml), written once; the yaml's path."""
    if (out / "data.yaml").is_file():
        return out / "data.yaml"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    names: dict[int, str] = {}
    for split in ("train", "val"):
        document = json.loads((mosaics / "annotations" / f"instances_{split}.json").read_text())
        names = {c["id"] - 1: c["name"] for c in document["categories"]}
        lines: dict[int, list[str]] = {image["id"]: [] for image in document["images"]}
        sizes = {image["id"]: (image["width"], image["height"]) for image in document["images"]}
        for a in document["annotations"]:
            (x, y, w, h), (width, height) = a["bbox"], sizes[a["image_id"]]
            lines[a["image_id"]].append(f"{a['category_id'] - 1} {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} "
                                        f"{w / width:.6f} {h / height:.6f}")
        (tmp / "images" / split).mkdir(parents=True)
        (tmp / "labels" / split).mkdir(parents=True)
        for image in document["images"]:
            shutil.copy(mosaics / split / image["file_name"], tmp / "images" / split / image["file_name"])
            label = tmp / "labels" / split / Path(image["file_name"]).with_suffix(".txt").name
            label.write_text("".join(f"{line}\n" for line in lines[image["id"]]))
    yaml_names = "".join(f"  {i}: {json.dumps(name)}\n" for i, name in sorted(names.items()))
    (tmp / "data.yaml").write_text(f"path: {out.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{yaml_names}")
    tmp.rename(out)
    return out / "data.yaml"


def task_data(args: argparse.Namespace, out: Path, task: str) -> Path:
    """The source or target task's YOLO data yaml (mosaics generated and exported once)."""
    from diffkd.detection.mosaics import MosaicSpec, ensure_mosaics

    if task == "source":
        spec = MosaicSpec(canvas=args.canvas, train_images=args.source_images, val_images=200, classes=SOURCE_CLASSES,
                          seed=1, **ITEMS)
    else:
        spec = MosaicSpec(canvas=args.canvas, train_images=args.train_images, val_images=args.val_images,
                          classes=TARGET_CLASSES, seed=0, **ITEMS)
    tag = f"{task}-c{spec.canvas}-t{spec.train_images}-v{spec.val_images}-textured"
    mosaics = ensure_mosaics(out / "data" / f"mosaics-{tag}", spec, args.data_root)
    return export_yolo(mosaics, out / "data" / f"yolo-{tag}")


# ----------------------------------------------------------------------------------------------- training
def common_args(args: argparse.Namespace, data: Path, project: Path, name: str, seed: int, epochs: int) -> dict:
    """Ultralytics train arguments of every run: its defaults (optimizer auto, 3 warm-up epochs, mosaic closed for the
    last 10 epochs), apart from the size, the seed, final validation only, and an optimizer step per batch (nbs =
    batch; the default 64 would leave a dozen steps per epoch)."""
    return dict(data=str(data), imgsz=args.canvas, epochs=epochs, batch=args.batch, nbs=args.batch, seed=seed,
                device=args.device, workers=0, project=str(project), name=name, exist_ok=False, plots=False,
                val=False, verbose=False, deterministic=False, amp=args.amp)


def stage_specs(args: argparse.Namespace, out: Path) -> dict[str, dict]:
    """The cached models: name -> what determines it (model, data, epochs, starting weights)."""
    source, target = task_data(args, out, "source"), task_data(args, out, "target")
    common = {"imgsz": args.canvas, "batch": args.batch}
    return {
        "source-teacher": {"model": args.teacher, "data": str(source), "epochs": args.source_epochs, **common},
        "source-student": {"model": args.student, "data": str(source), "epochs": args.source_epochs, **common},
        "teacher": {"model": args.teacher, "data": str(target), "epochs": args.teacher_epochs,
                    "pretrained": str(out / "source-teacher" / "weights" / "last.pt"), **common},
    }


def train_stage(args: argparse.Namespace, out: Path, name: str) -> None:
    """Train one cached model in this process (the teacher waits for its source weights); its folder is locked, so a
    second benchmark started meanwhile is refused instead of training it again over the first."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    from diffkd.engine.errors import RunDirError
    from diffkd.engine.runlock import RunLock

    spec = stage_specs(args, out)[name]
    folder = out / name
    lock = RunLock(folder)
    try:
        lock.acquire()
    except RunDirError as exc:
        raise SystemExit(f"cached model {name}: {exc}") from None
    try:
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished stage (no spec.json): started again
        start = time.time()
        extra = {"pretrained": spec["pretrained"]} if "pretrained" in spec else {}
        trainer = DetectionTrainer(overrides={"model": spec["model"], **extra,
                                              **common_args(args, Path(spec["data"]), out, name, 0, spec["epochs"])})
        trainer.train()
        summary = {"mAP50-95": trainer.metrics["metrics/mAP50-95(B)"], "mAP50": trainer.metrics["metrics/mAP50(B)"],
                   "seconds": time.time() - start}
        (folder / "summary.json").write_text(json.dumps(summary))
        (folder / "spec.json").write_text(json.dumps(spec))
    finally:
        lock.release()


def ensure_stages(args: argparse.Namespace, out: Path, passed: list[str]) -> None:
    """Train the cached models the chosen workflows need that are missing (the two source models side by side),
    refusing changed specs."""
    specs = stage_specs(args, out)
    needed = {"source-teacher", "source-student"}
    if any(WORKFLOWS[w].task == "target" for w in args.workflows):
        needed.add("teacher")

    def ready(name: str) -> bool:
        spec_file = out / name / "spec.json"
        if not spec_file.is_file():
            return False
        found = json.loads(spec_file.read_text())
        if found != specs[name]:
            raise SystemExit(f"{out / name} holds a model trained with {found}, not {specs[name]}; use another --out")
        return True

    for group in (("source-teacher", "source-student"), ("teacher",)):
        todo = [name for name in group if name in needed and not ready(name)]
        running = [subprocess.Popen([sys.executable, __file__, *passed, "--stage", name]) for name in todo]
        if any(p.wait() for p in running):
            raise SystemExit(f"training a cached model failed ({', '.join(todo)})")


def one_run(args: argparse.Namespace, out: Path, workflow_name: str, row_name: str, seed: int) -> None:
    """Train one row of one workflow for one seed in this process and write its result.json."""
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils import callbacks as ultralytics_callbacks

    from diffkd.integrations.ultralytics import distill

    workflow, row = WORKFLOWS[workflow_name], {**ROWS, **TUNING_ROWS}[row_name]
    teacher = out / workflow.teacher / "weights" / "last.pt"
    data = task_data(args, out, workflow.task)
    name = f"{row_name}-s{seed}"
    project = out / "runs" / workflow_name
    epoch_wall: list[float] = []
    epoch_cpu: list[float] = []  # this process's CPU time: on one thread, the cost whatever else loads the machine
    started: list[tuple[float, float]] = []

    def epoch_end(trainer: Any) -> None:
        wall, cpu = started[-1]
        epoch_wall.append(time.perf_counter() - wall)
        epoch_cpu.append(time.process_time() - cpu)

    callbacks = {"on_train_epoch_start": [lambda trainer: started.append((time.perf_counter(), time.process_time()))],
                 "on_train_epoch_end": [epoch_end]}
    train_args = common_args(args, data, project, name, seed, args.epochs or workflow.epochs)
    train_args["fraction"] = workflow.fraction
    if workflow.pretrained:
        train_args["pretrained"] = str(out / "source-student" / "weights" / "last.pt")
    if row.method in (None, "native"):
        events = ultralytics_callbacks.get_default_callbacks()
        for event, functions in callbacks.items():
            events[event].extend(functions)
        native = {"distill_model": str(teacher)} if row.method == "native" else {}
        trainer = DetectionTrainer(overrides={"model": args.student, **train_args, **native}, _callbacks=events)
        trainer.train()
    else:
        trainer = distill(args.student, str(teacher), method=row.method, kd_weight=row.kd_weight,
                          method_options=row.options or None, kd_lr_scale=row.kd_lr_scale, callbacks=callbacks,
                          **train_args)
    final = trainer.read_results_csv()
    result = {"workflow": workflow_name, "row": row_name, "seed": seed, "mAP50-95": final["metrics/mAP50-95(B)"][-1],
              "mAP50": final["metrics/mAP50(B)"][-1], "epoch_cpu_seconds": statistics.median(epoch_cpu),
              "epoch_seconds": statistics.median(epoch_wall), "all_epoch_cpu_seconds": epoch_cpu,
              "peak_rss_mib": peak_rss_mib(), "epochs": balance(project / name / "results.csv")}
    (project / name / "result.json").write_text(json.dumps(result))


def balance(results_csv: Path) -> list[dict[str, float]]:
    """Per epoch, from Ultralytics' results.csv: the task loss (box + cls + dfl), every kd column (the weighted kd,
    diffusion and other terms of each level) and their sum."""
    with open(results_csv) as f:
        rows = list(csv.DictReader(f))
    task_columns = ("train/box_loss", "train/cls_loss", "train/dfl_loss")
    epochs = []
    for row in rows:
        row = {k.strip(): v for k, v in row.items()}
        terms = {k.split("/", 1)[1]: float(v) for k, v in row.items()
                 if k.startswith("train/") and k not in task_columns and not k.endswith("_w")}
        epochs.append({"task": sum(float(row[c]) for c in task_columns), "kd_total": sum(terms.values()), **terms})
    return epochs


def profile(args: argparse.Namespace) -> None:
    """CPU seconds per batch (this process, median of 5 after a warm-up) of each part of a distillation step at the
    benchmark's size, with random weights: the student's forward and backward, the teacher's forward to its neck,
    and each method's levels (forward and backward on the neck maps)."""
    import torch
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils import DEFAULT_CFG

    from diffkd.integrations.ultralytics import KDSettings, batch_boxes, build_levels, head_inputs, layer_outputs

    def seconds(step: Any) -> float:
        step()
        times = []
        for _ in range(5):
            start = time.process_time()
            step()
            times.append(time.process_time() - start)
        return statistics.median(times)

    torch.manual_seed(0)
    student = DetectionModel(args.student, nc=len(TARGET_CLASSES), verbose=False)
    student.args = DEFAULT_CFG
    teacher = DetectionModel(args.teacher, nc=len(TARGET_CLASSES), verbose=False).fuse(verbose=False).eval()
    teacher.requires_grad_(False)
    images = torch.rand(args.batch, 3, args.canvas, args.canvas)
    layers = set(teacher.model[-1].f)

    def student_step() -> None:
        preds = student.train()(images)
        sum(x.float().mean() for x in (preds["boxes"], preds["scores"])).backward()

    print(f"student {args.student} forward + backward: {seconds(student_step):.3f} s / batch of {args.batch}")
    with torch.no_grad():
        print(f"teacher {args.teacher} forward to its neck: {seconds(lambda: layer_outputs(teacher, images, layers)):.3f} s")
        teacher_maps = layer_outputs(teacher, images, layers)
        student_maps = head_inputs(student.train()(images))
    batch = {"img": images, "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]] * args.batch),
             "batch_idx": torch.arange(args.batch, dtype=torch.float)}
    for method in ("mse", "cwd", "fgd", "mgd", "pkd", "diffkd"):
        step, levels = build_levels(student, teacher, KDSettings("t.pt", method=method), args.canvas, 3)
        parts = []
        for level in levels:
            s = student_maps[level.student_position].detach().requires_grad_()
            t = teacher_maps[level.teacher_layer]
            module = step.methods[level.name]
            extra = {"boxes": batch_boxes(batch, False)} if "boxes" in module.extra_inputs else {}

            def level_step() -> None:
                sum(module(s, t, **extra).terms.values()).backward()

            parts.append(f"{level.name} {tuple(t.shape[1:])} {seconds(level_step):.3f}")
        print(f"{method} levels (s / batch): {', '.join(parts)}")


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike getrusage's, it starts afresh at exec, not at the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------- tables
def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def write_tables(results: list[dict], out: Path, command: str) -> str:
    """results.md (one table per workflow, a line on the teacher) and results.json (every run, with its epochs)."""
    lines = [f"`{command}`", ""]
    for name in ("source-teacher", "source-student", "teacher"):
        summary = out / name / "summary.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            lines.append(f"- {name}: mAP50-95 {s['mAP50-95']:.4f}, mAP50 {s['mAP50']:.4f} ({s['seconds']:.0f} s)")
    for workflow in WORKFLOWS:
        runs = [r for r in results if r["workflow"] == workflow]
        if not runs:
            continue
        lines += ["", f"### {WORKFLOWS[workflow].label}", "",
                  "| row | seeds | mAP50-95 | mAP50 | CPU s / epoch | x student | x native KD | peak RSS (MiB) |",
                  "|---|---|---|---|---|---|---|---|"]
        labels = {name: row.label for name, row in {**ROWS, **TUNING_ROWS}.items()}
        by_row = {row: [r for r in runs if r["row"] == row] for row in labels}
        cpu = {row: statistics.mean(r["epoch_cpu_seconds"] for r in rs) for row, rs in by_row.items() if rs}
        for row, rs in by_row.items():
            if not rs:
                continue
            ratios = " | ".join(f"{cpu[row] / cpu[base]:.2f}" if base in cpu else "-" for base in ("student", "native"))
            lines.append(f"| {labels[row]} | {', '.join(str(r['seed']) for r in rs)} | "
                         f"{spread([r['mAP50-95'] for r in rs])} | {spread([r['mAP50'] for r in rs])} | {cpu[row]:.1f} | "
                         f"{ratios} | {max(r['peak_rss_mib'] for r in rs):.0f} |")
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return table


def results_tables(workflows: list[str], runs: list[dict]) -> dict:
    """The tables benchmarks/render.py draws from the results file: one per workflow, the README's (both
    workflows), and the balance of the kd terms against the task loss, epoch by epoch, of the first seed of each
    DiffKD row that ran."""
    metric = {"digits": 3}
    columns = [{"label": "seeds", "kind": "seeds"},
               {"label": "mAP50-95", "metric": "mAP50-95", **metric},
               {"label": "vs student", "metric": "mAP50-95", "kind": "delta", "base": "student", **metric},
               {"label": "mAP50", "metric": "mAP50", **metric},
               {"label": "CPU s / epoch", "metric": "epoch_cpu_seconds", "kind": "mean", "digits": 1},
               {"label": "x student", "metric": "epoch_cpu_seconds", "kind": "ratio", "base": "student"},
               {"label": "x native KD", "metric": "epoch_cpu_seconds", "kind": "ratio", "base": "native"},
               *({"label": f"{p.upper()} diffusion, last epoch", "metric": f"{p}_diff_last", "kind": "mean", "digits": 2}
                 for p in ("p3", "p4", "p5"))]
    labels = {name: row.label for name, row in {**ROWS, **TUNING_ROWS}.items()}
    tables = {w: {"group": w, "columns": columns, "labels": labels, "rows": list({**ROWS, **TUNING_ROWS})}
              for w in workflows}
    balance = [{"label": "task (box+cls+dfl)", "metric": "task"}, {"label": "kd terms", "metric": "kd_total"},
               *({"label": f"{p} diffusion", "metric": f"{p}_diff"} for p in ("p3", "p4", "p5"))]
    if set(workflows) >= {"scratch", "finetune"}:  # the README's: both workflows side by side
        tables["readme"] = {"source": "short", "labels": labels, "rows": list(ROWS), "columns": [
            {"label": f"{title}, {label}", "group": w, "metric": "mAP50-95", **metric, **kind}
            for w, title in (("scratch", "from scratch"), ("finetune", "fine-tuning"))
            for label, kind in (("mAP50-95", {}), ("vs student", {"kind": "delta", "base": "student"}))]}
    diffkd_rows = {name for name, row in {**ROWS, **TUNING_ROWS}.items() if row.method == "diffkd"}
    for run in runs:
        key = f"{run['group']}-{run['row']}-balance"
        if run["row"] in diffkd_rows and key not in tables:
            tables[key] = {"row_label": "epoch", "columns": balance,
                           "epochs_of": {"group": run["group"], "row": run["row"], "seed": run["seed"]}}
    return tables


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    offline_ultralytics(out / "ultralytics-config")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    passed = list(argv if argv is not None else sys.argv[1:])
    if args.profile:
        profile(args)
        return
    if args.stage:
        train_stage(args, out, args.stage)
        return
    if args.run:
        workflow, row = args.run.split("/")
        one_run(args, out, workflow, row, args.seed)
        return
    ensure_stages(args, out, passed)
    if args.prepare:
        return
    results = []
    command = "OMP_NUM_THREADS=1 python benchmarks/yolo.py " + " ".join(passed)
    for seed in args.seeds:
        for workflow in args.workflows:
            for row in args.rows:
                result_file = out / "runs" / workflow / f"{row}-s{seed}" / "result.json"
                if not result_file.is_file():
                    shutil.rmtree(result_file.parent, ignore_errors=True)  # an unfinished run: started again
                    print(f"{workflow} / {row} seed {seed} ...", flush=True)
                    subprocess.run([sys.executable, __file__, *passed, "--run", f"{workflow}/{row}", "--seed",
                                    str(seed)], check=True)
                results.append(json.loads(result_file.read_text()))
                print(write_tables(results, out, command), flush=True)
                if args.results:
                    runs = [{"group": r["workflow"], "row": r["row"], "seed": r["seed"], "epochs": r["epochs"],
                             "metrics": {**{k: r[k] for k in ("mAP50-95", "mAP50", "epoch_cpu_seconds", "peak_rss_mib")},
                                         **{f"{k}_last": v for k, v in r["epochs"][-1].items() if k.endswith("_diff")}}}
                            for r in results]
                    stages = {name: json.loads((out / name / "summary.json").read_text())
                              for name in ("source-teacher", "source-student", "teacher")
                              if (out / name / "summary.json").is_file()}
                    write(args.results, command=command, seeds=args.seeds, runs=runs,
                          extra={"stages": stages, "tables": results_tables(args.workflows, runs)})


if __name__ == "__main__":
    main()
