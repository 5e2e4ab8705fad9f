"""YOLO benchmark on Fashion-MNIST mosaics: a YOLOv8n student alone, with Ultralytics' native KD, and with diffkd's
mse, cwd, fgd and DiffKD (without and with the autoencoder) from a YOLOv8s teacher, all inside Ultralytics' trainer.

Builds the mosaics offline (src/diffkd/detection/mosaics.py) and exports them to YOLO format, trains the teacher
once (reused from OUT while its spec matches), then runs every row for every seed, each in its own process, and
writes OUT/results.json and OUT/results.md: mAP50-95 and mAP50 from Ultralytics' validator on the final epoch's
EMA (no selection on the scored set), the median seconds of a training epoch (validation excluded) and the peak
resident memory of the run's process. A finished run (its result.json) is reused, so an interrupted benchmark
continues where it stopped.

    OMP_NUM_THREADS=1 python benchmarks/yolo.py --out runs/bench/yolo
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROWS = ("student", "native", "mse", "cwd", "fgd", "diffkd", "diffkd_ae", "diffkd_auto")
LABELS = {"student": "student alone", "native": "Ultralytics native KD (dis 6)", "mse": "diffkd mse",
          "cwd": "diffkd cwd", "fgd": "diffkd fgd", "diffkd": "DiffKD", "diffkd_ae": "DiffKD + AE (latent 64)",
          "diffkd_auto": "DiffKD, kd_weight auto"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench/yolo", help="folder for the data, the runs and the results")
    p.add_argument("--canvas", type=int, default=96, help="mosaic side in pixels, also imgsz")
    p.add_argument("--train-images", type=int, default=192)
    p.add_argument("--val-images", type=int, default=100)
    p.add_argument("--teacher", default="yolov8s.yaml")
    p.add_argument("--student", default="yolov8n.yaml")
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=0.002, help="AdamW learning rate of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", default=list(ROWS[:-1]), choices=ROWS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--data-root", help="Fashion-MNIST folder (default: diffkd's usual places)")
    p.add_argument("--profile", action="store_true",
                   help="only time the parts of a step (CPU seconds per batch, random weights): where the time goes")
    p.add_argument("--run", choices=ROWS, help=argparse.SUPPRESS)  # one run, in its own process
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
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
    yaml_names = "".join(f"  {i}: {name}\n" for i, name in sorted(names.items()))
    (tmp / "data.yaml").write_text(f"path: {out.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{yaml_names}")
    tmp.rename(out)
    return out / "data.yaml"


def prepare_data(args: argparse.Namespace, out: Path) -> Path:
    from diffkd.detection.mosaics import MosaicSpec, ensure_mosaics

    spec = MosaicSpec(canvas=args.canvas, train_images=args.train_images, val_images=args.val_images)
    tag = f"c{args.canvas}-t{args.train_images}-v{args.val_images}"
    mosaics = ensure_mosaics(out / f"mosaics-{tag}", spec, args.data_root)
    return export_yolo(mosaics, out / f"yolo-{tag}")


def common_args(args: argparse.Namespace, data: Path, project: Path, name: str, seed: int, epochs: int) -> dict:
    """Ultralytics train arguments shared by every run. Its defaults, apart from the size, the seed, no per-epoch
    validation, and a schedule for a few short epochs: AdamW at a fixed rate, one warm-up epoch and an optimizer
    step per batch (nbs = batch; the default 64 would leave a handful of steps per epoch)."""
    return dict(data=str(data), imgsz=args.canvas, epochs=epochs, batch=args.batch, nbs=args.batch, seed=seed,
                device=args.device, workers=0, project=str(project), name=name, exist_ok=True, plots=False, val=False,
                verbose=False, deterministic=False, optimizer="AdamW", lr0=args.lr, warmup_epochs=1)


def teacher_checkpoint(args: argparse.Namespace, out: Path, data: Path) -> Path:
    """The teacher's last.pt, trained once and reused while its spec matches (another spec is refused)."""
    folder = out / "teacher"
    spec = {"model": args.teacher, "epochs": args.teacher_epochs, "data": str(data), "imgsz": args.canvas,
            "batch": args.batch, "lr": args.lr}
    if (folder / "spec.json").is_file():
        found = json.loads((folder / "spec.json").read_text())
        if found != spec:
            raise SystemExit(f"{folder} holds a teacher trained with {found}, not {spec}; use another --out")
        return folder / "weights" / "last.pt"
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished teacher (no spec.json): started again
    from ultralytics.models.yolo.detect import DetectionTrainer

    start = time.time()
    trainer = DetectionTrainer(overrides={"model": args.teacher, **common_args(args, data, out, "teacher", 0,
                                                                               args.teacher_epochs)})
    trainer.train()
    metrics = trainer.metrics
    (folder / "spec.json").write_text(json.dumps(spec))
    summary = {"mAP50-95": metrics["metrics/mAP50-95(B)"], "mAP50": metrics["metrics/mAP50(B)"],
               "seconds": time.time() - start}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder / "weights" / "last.pt"


def one_run(args: argparse.Namespace, out: Path, data: Path, teacher: Path) -> None:
    """Train one row for one seed in this process and write its result.json."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    from diffkd.integrations.ultralytics import distill

    row, seed = args.run, args.seed
    name = f"{row}-s{seed}"
    epoch_seconds: list[float] = []  # wall clock
    epoch_cpu: list[float] = []  # this process's CPU time: on one thread, the cost whatever else loads the machine
    started: list[tuple[float, float]] = []

    def epoch_end(trainer: Any) -> None:
        wall, cpu = started[-1]
        epoch_seconds.append(time.perf_counter() - wall)
        epoch_cpu.append(time.process_time() - cpu)

    callbacks = {"on_train_epoch_start": [lambda trainer: started.append((time.perf_counter(), time.process_time()))],
                 "on_train_epoch_end": [epoch_end]}
    train_args = common_args(args, data, out / "runs", name, seed, args.epochs)
    if row in ("student", "native"):
        from ultralytics.utils import callbacks as ultralytics_callbacks

        events = ultralytics_callbacks.get_default_callbacks()
        for event, functions in callbacks.items():
            events[event].extend(functions)
        native = {"distill_model": str(teacher)} if row == "native" else {}
        trainer = DetectionTrainer(overrides={"model": args.student, **train_args, **native}, _callbacks=events)
        trainer.train()
    else:
        method = "diffkd" if row.startswith("diffkd") else row
        latent = 64 if row == "diffkd_ae" else None
        weight = "auto" if row == "diffkd_auto" else 1.0
        trainer = distill(args.student, str(teacher), method=method, kd_latent=latent, kd_weight=weight,
                          callbacks=callbacks, **train_args)
    final = trainer.read_results_csv()
    result = {"row": row, "seed": seed, "mAP50-95": final["metrics/mAP50-95(B)"][-1], "mAP50": final["metrics/mAP50(B)"][-1],
              "epoch_seconds": statistics.median(epoch_seconds), "epoch_cpu_seconds": statistics.median(epoch_cpu),
              "all_epoch_seconds": epoch_seconds, "all_epoch_cpu_seconds": epoch_cpu, "peak_rss_mib": peak_rss_mib()}
    (out / "runs" / name / "result.json").write_text(json.dumps(result))


def profile(args: argparse.Namespace) -> None:
    """CPU seconds per batch (this process, median of 5 after a warm-up) of each part of a distillation step at the
    benchmark's size, with random weights: the student's forward and backward, the teacher's forward, and each
    method's levels (forward and backward on the neck maps)."""
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
    student = DetectionModel(args.student, nc=10, verbose=False)
    student.args = DEFAULT_CFG
    teacher = DetectionModel(args.teacher, nc=10, verbose=False).fuse(verbose=False).eval().requires_grad_(False)
    images = torch.rand(args.batch, 3, args.canvas, args.canvas)
    layers = set(teacher.model[-1].f)
    student_layers = list(student.model[-1].f)

    def student_step() -> None:
        preds = student.train()(images)
        sum(x.float().mean() for x in (preds["boxes"], preds["scores"])).backward()

    print(f"student {args.student} forward + backward: {seconds(student_step):.3f} s / batch of {args.batch}")
    with torch.no_grad():
        print(f"teacher {args.teacher} forward to its neck: "
              f"{seconds(lambda: layer_outputs(teacher, images, layers)):.3f} s")
        teacher_maps = layer_outputs(teacher, images, layers)
        student_maps = head_inputs(student.train()(images))
    batch = {"img": images, "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]] * args.batch),
             "batch_idx": torch.arange(args.batch, dtype=torch.float)}
    for method, latent in (("mse", None), ("cwd", None), ("fgd", None), ("diffkd", None), ("diffkd", 64)):
        modules, levels, _ = build_levels(student, teacher, KDSettings("t.pt", method=method, kd_latent=latent),
                                          args.canvas, 3)
        parts = []
        for level in levels:
            s = student_maps[level.student_position].detach().requires_grad_()
            t = teacher_maps[level.teacher_layer]
            module = modules[level.name]

            def level_step() -> None:
                out = module(s, t, batch_boxes(batch, False))
                sum(out.weights.get(k, 1.0) * v for k, v in out.terms.items()).backward()

            parts.append(f"{level.name} {tuple(t.shape[1:])} {seconds(level_step):.3f}")
        label = f"{method} latent {latent}" if latent else method
        print(f"{label} levels (s / batch): {', '.join(parts)}")


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike getrusage's, it starts afresh at exec, not at the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def write_tables(results: list[dict], out: Path, teacher_summary: dict | None, command: str) -> str:
    lines = [f"`{command}`", ""]
    if teacher_summary:
        lines += [f"Teacher: mAP50-95 {teacher_summary['mAP50-95']:.4f}, mAP50 {teacher_summary['mAP50']:.4f} "
                  f"({teacher_summary['seconds']:.0f} s to train)", ""]
    lines += ["| row | seeds | mAP50-95 | mAP50 | CPU s / epoch | x student | x native KD | wall s / epoch | peak RSS (MiB) |",
              "|---|---|---|---|---|---|---|---|---|"]
    by_row = {row: [r for r in results if r["row"] == row] for row in ROWS}
    cpu = {row: statistics.mean(r["epoch_cpu_seconds"] for r in runs) for row, runs in by_row.items() if runs}
    for row, runs in by_row.items():
        if not runs:
            continue
        ratios = [f"{cpu[row] / cpu[base]:.2f}" if base in cpu else "-" for base in ("student", "native")]
        lines.append(f"| {LABELS[row]} | {', '.join(str(r['seed']) for r in runs)} | {spread([r['mAP50-95'] for r in runs])} "
                     f"| {spread([r['mAP50'] for r in runs])} | {cpu[row]:.1f} | {' | '.join(ratios)} | "
                     f"{statistics.mean(r['epoch_seconds'] for r in runs):.1f} | {max(r['peak_rss_mib'] for r in runs):.0f} |")
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return table


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    offline_ultralytics(out / "ultralytics-config")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        profile(args)
        return
    data = prepare_data(args, out)
    teacher = teacher_checkpoint(args, out, data)
    if args.run:
        one_run(args, out, data, teacher)
        return
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = []
    for seed in args.seeds:
        for row in args.rows:
            result_file = out / "runs" / f"{row}-s{seed}" / "result.json"
            if not result_file.is_file():
                shutil.rmtree(result_file.parent, ignore_errors=True)  # an unfinished run: started again
                print(f"{row} seed {seed} ...", flush=True)
                subprocess.run([sys.executable, __file__, *passed, "--run", row, "--seed", str(seed)], check=True)
            results.append(json.loads(result_file.read_text()))
            summary = out / "teacher" / "summary.json"
            command = "OMP_NUM_THREADS=1 python benchmarks/yolo.py " + " ".join(passed)
            print(write_tables(results, out, json.loads(summary.read_text()) if summary.is_file() else None, command),
                  flush=True)


if __name__ == "__main__":
    main()
