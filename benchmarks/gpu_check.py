"""Functional check of every diffkd path on one device: does each one run there, end to end?

    python benchmarks/gpu_check.py --data-root local_data/fashion-mnist --json gpu_check.json   # on a GPU
    python benchmarks/gpu_check.py --device cpu --json gpu_check_cpu.json
    python benchmarks/gpu_check.py --only module_fast_fp32 distill_bf16   # a subset (and what it needs)
    python benchmarks/gpu_check.py --list

Every case runs a few steps at a tiny size: `diffkd train` and `diffkd distill` as CLI subprocesses
on the Fashion-MNIST configs in fp32, bf16 autocast, fp16 with GradScaler (CUDA only: the engine
refuses it on a CPU), compiled and channels-last; resume after a stop against an uninterrupted run;
DDP through torchrun; one FCOS DiffKD detection step and one DeepLabV3 DiffKD-DIST segmentation step
on the mosaics; `diffkd yolo` (Ultralytics YOLO, AMP on CUDA) on exported mosaics; `diffkd eval`, `export` and
`visualize` on the distillation run; and, in this
process, the DiffKD module's fast path against its reference and a compiled level against eager.
Each case is recorded as ok, failed (error type, message, traceback tail) or skipped (with the
reason), with its seconds and details; the JSON is rewritten after every case, a failure does not
stop the others, and the exit status is 1 if any case failed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
CONFIGS = ROOT / "configs"
QUIET = ("train.progress=false", "output.tensorboard=false")
FMNIST_TINY = ("data.limit_train=128", "data.limit_test=64", "data.batch_size=16", "train.epochs=1")
FMNIST_TEST_IMAGES = 64  # data.limit_test above: eval scores the same evenly spaced test images
DETECTION_TINY = (
    "detection.mosaics.train_images=16", "detection.mosaics.val_images=8", "data.limit_train=16",
    "data.limit_test=8", "data.batch_size=4", "train.epochs=1",
)  # fmt: skip
SEGMENTATION_TINY = ("data.batch_size=8", "data.eval_batch_size=16", "data.limit_test=16", "train.epochs=1")
SEGMENTATION_MOSAICS = {"train": 32, "val": 16}  # canvases generated for the segmentation cases
# Fast path vs reference: max |fast - reference| <= tolerance * max(1, max |reference|) for every
# compared tensor, as in tests/test_module.py; a compiled level against eager gets the fp32 one x 10.
FAST_PATH_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-2}
COMPILE_TOLERANCE = 1e-4
FAST_PATH_VARIANTS = {
    "maps": {"kind": "conv"},
    "maps_ae": {"kind": "conv", "latent_channels": 16},
    "maps_no_anm": {"kind": "conv", "adaptive_noise": False},
    "vectors": {"kind": "mlp", "distance": "kl"},
}


class Skipped(Exception):
    """A case that cannot run on this device; the message is the reason."""


class CheckFailed(Exception):
    """A case ran but its result is wrong (a non-finite loss, a mismatch, a missing file)."""


class CommandFailed(Exception):
    """A subprocess exited with a non-zero status; `output_tail` is the end of what it printed."""

    def __init__(self, message: str, output_tail: str) -> None:
        super().__init__(message)
        self.output_tail = output_tail


# ----------------------------------------------------------------------------- the shared context
@dataclass
class Check:
    """What the cases share: the device, the folders, the subprocess environment, earlier runs."""

    device: str
    workdir: Path
    data_root: Path | None
    timeout: float
    ddp_procs: int
    runs: dict[str, Path] = field(default_factory=dict)
    _fmnist: Path | None = None

    @property
    def fmnist(self) -> Path:
        """The folder holding the four Fashion-MNIST files (--data-root, else the library's lookup)."""
        if self._fmnist is None:
            from diffkd.data.fashion_mnist import locate

            files = [locate(split, self.data_root, download=False) for split in ("train", "test")]
            self._fmnist = files[0][0].parent
            if any(path.parent != self._fmnist for pair in files for path in pair):
                raise CheckFailed(f"the Fashion-MNIST files are not in one folder: {files}")
        return self._fmnist

    def env(self) -> dict[str, str]:
        """This checkout's code first; a cache folder of our own whose fashion-mnist is the data folder
        (the mosaic generators read Fashion-MNIST from there when /usr/share/datasets lacks it)."""
        cache = self.workdir / "cache"
        link = cache / "diffkd" / "fashion-mnist"
        if not (link.is_symlink() or link.exists()):
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(self.fmnist.resolve(), target_is_directory=True)
        path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "PYTHONPATH": path, "XDG_CACHE_HOME": str(cache), "MPLBACKEND": "Agg"}

    def command(self, log_name: str, argv: list[str], env: dict[str, str] | None = None) -> str:
        """Run argv from the repository root, its output kept in WORKDIR/logs/<log_name>.log; returns it.

        It runs in a process group of its own, so a timeout ends torchrun's workers with it."""
        log = self.workdir / "logs" / f"{log_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with subprocess.Popen(argv, cwd=ROOT, env=env or self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True) as proc:  # fmt: skip
            try:
                output, _ = proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate()
                log.write_text(f"$ {' '.join(argv)}\n{output}")
                raise CommandFailed(f"timed out after {self.timeout:.0f} s: {' '.join(argv[1:6])} ...", output[-3000:]) from None
        log.write_text(f"$ {' '.join(argv)}\n{output}")
        if proc.returncode != 0:
            last = next((line for line in reversed(output.splitlines()) if line.strip()), "(no output)")
            raise CommandFailed(f"exit status {proc.returncode}: {last}", output[-3000:])
        return output

    def diffkd(self, log_name: str, *args: str) -> str:
        """`python -m diffkd ARGS` (the CLI exactly as a user runs it)."""
        return self.command(log_name, [sys.executable, "-m", "diffkd", *args])

    def run_dir(self, name: str) -> Path:
        """The run directory of a case (recorded so later cases can use it)."""
        self.runs[name] = self.workdir / name
        return self.runs[name]

    def engine(self, name: str, mode: str, config: Path, *overrides: str) -> dict[str, Any]:
        """`diffkd train|distill CONFIG` on this device into the case's run directory; its last metrics row."""
        run_dir = self.run_dir(name)
        self.diffkd(name, mode, str(config), *overrides, *QUIET, f"train.device={self.device}", "--out", str(run_dir), "--force")
        return last_metrics(run_dir)

    def needs_cuda_for(self, overrides: tuple[str, ...]) -> None:
        """fp16 with GradScaler is CUDA-only by design (the engine refuses it on a CPU with a one-line error)."""
        if "train.amp=fp16" in overrides and self.device != "cuda":
            raise Skipped("needs CUDA: the engine refuses train.amp=fp16 on a CPU by design")


def last_metrics(run_dir: Path) -> dict[str, Any]:
    """The final row of a run's metrics.csv: losses and test metrics; every loss must be finite."""
    with open(run_dir / "metrics.csv") as f:
        row = {k: float(v) for k, v in list(csv.DictReader(f))[-1].items() if v != ""}
    losses = {k: v for k, v in row.items() if "loss" in k}
    bad = [k for k, v in losses.items() if not math.isfinite(v)]
    if bad:
        raise CheckFailed(f"{run_dir}: non-finite {', '.join(bad)}")
    tests = {k: v for k, v in row.items() if k.startswith("test_")}
    return {"epoch": row["epoch"], **losses, **tests, "images_per_s": row.get("images_per_s")}


# ----------------------------------------------------------------------- the CLI end-to-end cases
PRECISIONS = {
    "fp32": (),
    "bf16": ("train.amp=bf16",),
    "fp16": ("train.amp=fp16",),
    "compile": ("train.compile=true",),
    "channels_last": ("train.channels_last=true",),
}


def fmnist(check: Check) -> tuple[str, ...]:
    """The tiny Fashion-MNIST overrides, reading the files from the resolved folder."""
    return (f"data.root={check.fmnist}", *FMNIST_TINY)


def train_case(variant: str) -> Callable[[Check], dict[str, Any]]:
    """`diffkd train` of the Fashion-MNIST teacher config with the variant's overrides."""

    def case(check: Check) -> dict[str, Any]:
        extra = PRECISIONS[variant]
        check.needs_cuda_for(extra)
        return check.engine(f"train_{variant}", "train", CONFIGS / "fashion_mnist" / "teacher.yaml", *fmnist(check), *extra)

    case.__doc__ = f"`diffkd train` of the Fashion-MNIST teacher, {variant} ({' '.join(PRECISIONS[variant]) or 'defaults'})."
    return case


def teacher_of(check: Check) -> str:
    """The teacher.checkpoint override: the train_fp32 run."""
    return f"teacher.checkpoint={check.runs['train_fp32']}"


def distill_case(variant: str) -> Callable[[Check], dict[str, Any]]:
    """`diffkd distill` of the Fashion-MNIST DiffKD config (feature and logits levels) from train_fp32's teacher."""

    def case(check: Check) -> dict[str, Any]:
        extra = PRECISIONS[variant]
        check.needs_cuda_for(extra)
        config = CONFIGS / "fashion_mnist" / "diffkd.yaml"
        return check.engine(f"distill_{variant}", "distill", config, *fmnist(check), teacher_of(check), *extra)

    case.__doc__ = f"`diffkd distill` of the Fashion-MNIST DiffKD pair, {variant} ({' '.join(PRECISIONS[variant]) or 'defaults'})."
    return case


def resume_case(check: Check) -> dict[str, Any]:
    """Distil 2 epochs straight vs 1 epoch, stop, `--resume` to 2; compare every tensor of the two models.

    The schedule is constant so that extending train.epochs on resume changes no learning rate."""
    base = ["distill", str(CONFIGS / "fashion_mnist" / "diffkd.yaml"), *fmnist(check), teacher_of(check), *QUIET,
            "schedule.name=constant", "schedule.warmup_epochs=0", f"train.device={check.device}"]  # fmt: skip
    straight, resumed = check.workdir / "resume_straight", check.workdir / "resume_stopped"
    check.diffkd("resume_straight", *base, "train.epochs=2", "--out", str(straight), "--force")
    check.diffkd("resume_first_epoch", *base, "train.epochs=1", "--out", str(resumed), "--force")
    check.diffkd("resume_second_epoch", *base, "train.epochs=2", "--out", str(resumed), "--resume")
    from diffkd.engine import load_checkpoint

    a, b = (load_checkpoint(d / "last.pt") for d in (straight, resumed))
    if a.keys() != b.keys() or a["model"].keys() != b["model"].keys() or b["epoch"] != 2:
        raise CheckFailed("the two runs' checkpoints differ in their keys or epochs")
    diffs = {k: (a["model"][k].double() - b["model"][k].double()).abs().max().item() if a["model"][k].numel() else 0.0
             for k in a["model"]}  # fmt: skip
    differing = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    return {
        "bit_identical": not differing,
        "max_abs_diff": max(diffs.values()),
        "tensors": len(diffs),
        "tensors_differing": len(differing),
        "worst_tensor": max(diffs, key=diffs.get),
        "test_top1": {"straight": a["history"][-1]["test_top1"], "resumed": b["history"][-1]["test_top1"]},
    }


def ddp_case(check: Check) -> dict[str, Any]:
    """`torchrun --nproc_per_node=N -m diffkd distill`; the backend DDP reports (DDP's own log line)."""
    run_dir = check.run_dir("ddp")
    argv = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={check.ddp_procs}",
        "-m", "diffkd", "distill", str(CONFIGS / "fashion_mnist" / "diffkd.yaml"), *fmnist(check), teacher_of(check),
        *QUIET, f"train.device={check.device}", "--out", str(run_dir), "--force",
    ]  # fmt: skip
    env = {**check.env(), "TORCH_CPP_LOG_LEVEL": "INFO", "TORCH_DISTRIBUTED_DEBUG": "INFO"}  # DDP logs its backend
    output = check.command("ddp", argv, env)
    processes = re.search(r"(\d+) process\(es\) on (\S+),", output)
    backends = sorted(set(re.findall(r"backend_name: (\w+)", output)))
    from diffkd.engine import load_checkpoint

    states = len(load_checkpoint(run_dir / "last.pt")["rng"])  # one RNG state per process
    if processes is None or int(processes.group(1)) != check.ddp_procs or states != check.ddp_procs:
        raise CheckFailed(f"expected {check.ddp_procs} processes; the run reports {processes and processes.group(0)}, "
                          f"its checkpoint {states} RNG states")  # fmt: skip
    if check.ddp_procs > 1 and not backends:
        raise CheckFailed("DDP logged no backend_name: was the model wrapped in DistributedDataParallel?")
    return {
        "processes": check.ddp_procs,
        "device": processes.group(2),
        "backend": backends[0] if len(backends) == 1 else backends or "none (one process: no process group)",
        **last_metrics(run_dir),
    }


def eval_case(check: Check) -> dict[str, Any]:
    """`diffkd eval` of distill_fp32's last.pt on the run's test images: the run's final top-1 (within one image)."""
    run_dir = check.runs["distill_fp32"]
    output = check.diffkd("eval", "eval", str(run_dir), "--which", "last", "--device", check.device,
                          "--limit", str(FMNIST_TEST_IMAGES))  # fmt: skip
    found = re.search(r"top1 ([\d.]+)\s+top5 ([\d.]+)\s+on (\d+) test images", output)
    if found is None:
        raise CheckFailed(f"no 'top1 .. top5 .. on N test images' line in: {output[-300:]}")
    top1, top5, images = float(found.group(1)), float(found.group(2)), int(found.group(3))
    run_top1 = last_metrics(run_dir)["test_top1"]
    if images != FMNIST_TEST_IMAGES or abs(top1 - run_top1) > 100 / images + 0.01:
        raise CheckFailed(f"eval: top1 {top1} on {images} images; the run's final test_top1 {run_top1}")
    return {"top1": top1, "top5": top5, "images": images, "run_top1": run_top1}


def export_case(check: Check) -> dict[str, Any]:
    """`diffkd export` of distill_fp32: a plain state dict a fresh student loads strictly."""
    from diffkd import models

    out = check.workdir / "export" / "student.pt"
    check.diffkd("export", "export", str(check.runs["distill_fp32"]), str(out), "--which", "last", "--force")
    weights = torch.load(out, weights_only=True, map_location="cpu")
    models.create("fmnist_student", num_classes=10).load_state_dict(weights, strict=True)
    return {"file": str(out), "tensors": len(weights), "bytes": out.stat().st_size}


def visualize_case(check: Check) -> dict[str, Any]:
    """`diffkd visualize` of distill_fp32: features.png and gamma.png (the command runs on the CPU)."""
    out = check.workdir / "visualize"
    output = check.diffkd("visualize", "visualize", str(check.runs["distill_fp32"]), "--images", "2", "--out", str(out))
    files = {name: (out / name).stat().st_size if (out / name).is_file() else 0 for name in ("features.png", "gamma.png")}
    if not all(files.values()):
        raise CheckFailed(f"visualize wrote {files}")
    gamma = re.search(r"mean gamma ([\d.]+)", output)
    return {"bytes": files, "mean_gamma": float(gamma.group(1)) if gamma else None, "device": "cpu (no --device)"}


def detection_overrides(check: Check) -> tuple[str, ...]:
    return (f"data.root={check.workdir / 'detection_mosaics'}", *DETECTION_TINY)


def detection_teacher_case(check: Check) -> dict[str, Any]:
    """One tiny epoch of the FCOS R50-FPN teacher on generated mosaics (the teacher of detection_diffkd)."""
    config = CONFIGS / "detection" / "mosaics" / "fcos_r50_teacher.yaml"
    return check.engine("detection_teacher", "train", config, *detection_overrides(check))


def detection_diffkd_case(check: Check) -> dict[str, Any]:
    """FCOS R50 -> R18 with DiffKD (attention-MSE) on the five FPN levels and regression KD."""
    config = CONFIGS / "detection" / "mosaics" / "fcos_r50_r18_diffkd.yaml"
    teacher = f"teacher.checkpoint={check.runs['detection_teacher']}"
    return check.engine("detection_diffkd", "distill", config, *detection_overrides(check), teacher)


def yolo_case(check: Check) -> dict[str, Any]:
    """`diffkd yolo`: a YOLOv8n student distilled (DiffKD on the neck) from a YOLOv8s inside Ultralytics' trainer,
    one tiny epoch on exported mosaics, with Ultralytics' AMP on CUDA."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.yolo import export_yolo, offline_ultralytics
    from diffkd.detection.mosaics import MosaicSpec, ensure_mosaics

    offline_ultralytics(check.workdir / "ultralytics-config")
    spec = MosaicSpec(canvas=64, train_images=16, val_images=8, max_scale=2.0)
    mosaics = ensure_mosaics(check.workdir / "yolo_mosaics", spec, check.fmnist)
    data = export_yolo(mosaics, check.workdir / "yolo_data")
    run_dir = check.run_dir("yolo_diffkd")
    device = "0" if check.device == "cuda" else "cpu"
    output = check.diffkd("yolo_diffkd", "yolo", "student=yolov8n.yaml", "teacher=yolov8s.yaml", f"data={data}",
                          "method=diffkd", "epochs=1", "imgsz=64", "batch=4", "workers=0", f"device={device}",
                          f"project={run_dir.parent}", f"name={run_dir.name}", "exist_ok=True", "plots=False")
    with open(run_dir / "results.csv") as f:
        row = {k.strip(): float(v) for k, v in list(csv.DictReader(f))[-1].items() if v.strip()}
    kd = {k: v for k, v in row.items() if re.fullmatch(r"train/p\d_\w+", k)}
    losses = {k: v for k, v in row.items() if k.startswith("train/")}
    bad = [k for k, v in losses.items() if not math.isfinite(v)]
    if not kd or bad:
        raise CheckFailed(f"results.csv: kd columns {list(kd)}, non-finite {bad}")
    amp = re.search(r"AMP: (checks [a-z]+)", output)
    return {**losses, "amp_check": amp.group(1) if amp else "not run (CPU or amp=False)"}


def segmentation_overrides(check: Check) -> tuple[str, ...]:
    """The mosaic set generated small (the config's default set is 7000 canvases) and tiny sizes."""
    from diffkd.segmentation import mosaic

    root = check.workdir / "segmentation_mosaics"
    if not root.exists():
        mosaic.generate(root, mosaic.MosaicSpec(**SEGMENTATION_MOSAICS), source_root=check.fmnist)
    return (f"data.root={root}", *SEGMENTATION_TINY)


def segmentation_teacher_case(check: Check) -> dict[str, Any]:
    """One tiny epoch of the DeepLabV3-R34 (width 1/4) teacher on the segmentation mosaics."""
    config = CONFIGS / "segmentation" / "mosaic_teacher.yaml"
    return check.engine("segmentation_teacher", "train", config, *segmentation_overrides(check))


def segmentation_diffkd_case(check: Check) -> dict[str, Any]:
    """DeepLabV3 R34 -> R18 with DiffKD (DIST distance) on the logits map."""
    config = CONFIGS / "segmentation" / "mosaic_diffkd.yaml"
    teacher = f"teacher.checkpoint={check.runs['segmentation_teacher']}"
    return check.engine("segmentation_diffkd", "distill", config, *segmentation_overrides(check), teacher)


# --------------------------------------------------------------------- the module, in this process
@contextlib.contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """TF32 off while comparing (CUDA convolutions default to it; the tolerances are for fp32 arithmetic)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def level_step(level: Callable[..., Any], student: torch.Tensor, teacher: torch.Tensor, noises: dict[str, torch.Tensor],
               autocast: torch.dtype | None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Forward + backward of one DiffKD level with fixed noises; every result tensor by name: the
    outputs, the student input's gradient, each parameter's gradient and each buffer afterwards."""
    module = getattr(level, "_orig_mod", level)  # a compiled level's parameters live in the original
    x = student.detach().clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        out = level(x, teacher, **noises)
    loss = out.loss
    loss.backward()
    named = {f"out.{k}": v for k, v in vars(out).items() if isinstance(v, torch.Tensor)}  # the weights are data
    named["out.loss"] = loss
    named["grad.student"] = x.grad
    named.update({f"grad.{k}": p.grad for k, p in module.named_parameters() if p.grad is not None})
    named.update({f"buffer.{k}": b for k, b in module.named_buffers()})
    return {k: v.detach().float() for k, v in named.items()}


def relative_differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """max |got - want| / max(1, max |want|) per tensor; both sides must hold the same names."""
    if got.keys() != want.keys():
        raise CheckFailed(f"different results: only in one side {sorted(got.keys() ^ want.keys())}")
    return {k: ((got[k] - want[k]).abs().max() / want[k].abs().max().clamp(min=1.0)).item() for k in want}


def level_inputs(options: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Student and teacher features and the three noises of one level variant, seeded."""
    g = torch.Generator().manual_seed(1)
    if options["kind"] == "conv":
        width = options.get("latent_channels", 24)
        s, t, noise = torch.randn(4, 12, 5, 6, generator=g), torch.randn(4, 24, 5, 6, generator=g), (4, width, 5, 6)
    else:
        s, t, noise = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g), (4, 10)
    noises = {"start_noise": torch.randn(noise, generator=g), "diffusion_noise": torch.randn(noise, generator=g),
              "diffusion_timesteps": torch.tensor([3, 500, 999, 42])}  # fmt: skip
    return s.to(device), t.to(device), {k: v.to(device) for k, v in noises.items()}


def module_fast_case(precision: str) -> Callable[[Check], dict[str, Any]]:
    """DiffKD(fast=True) vs DiffKD(fast=False) with the same weights and noises on the device."""

    def case(check: Check) -> dict[str, Any]:
        from diffkd import DiffKD

        device, tolerance = torch.device(check.device), FAST_PATH_TOLERANCE[precision]
        worst: dict[str, dict[str, Any]] = {}
        with exact_float32(device):
            for variant, options in FAST_PATH_VARIANTS.items():
                channels = (12, 24) if options["kind"] == "conv" else (10, 10)
                torch.manual_seed(0)
                fast = DiffKD(*channels, **options).to(device)
                reference = DiffKD(*channels, **options, fast=False).to(device)
                reference.load_state_dict(fast.state_dict())
                s, t, noises = level_inputs(options, device)
                dtype = torch.bfloat16 if precision == "bf16" else None
                diffs = relative_differences(level_step(fast, s, t, noises, dtype), level_step(reference, s, t, noises, dtype))
                name = max(diffs, key=diffs.get)
                worst[variant] = {"tensor": name, "relative_diff": diffs[name], "tensors": len(diffs)}
        failing = {v: w for v, w in worst.items() if w["relative_diff"] > tolerance}
        if failing:
            raise CheckFailed(f"fast path differs from the reference beyond {tolerance}: {failing}")
        return {"tolerance": tolerance, "tf32": False, "worst": worst}

    case.__doc__ = f"DiffKD fast path vs reference (fast=False), {precision}: outputs, gradients, BN statistics."
    return case


def module_compile_case(check: Check) -> dict[str, Any]:
    """torch.compile of one small conv DiffKD level: forward + backward once against eager, same weights and noises."""
    from diffkd import DiffKD

    device = torch.device(check.device)
    options = {"kind": "conv", "latent_channels": 16}
    with exact_float32(device):
        torch.manual_seed(0)
        eager, twin = DiffKD(12, 24, **options).to(device), DiffKD(12, 24, **options).to(device)
        twin.load_state_dict(eager.state_dict())
        s, t, noises = level_inputs(options, device)
        start = time.perf_counter()
        compiled = level_step(torch.compile(twin), s, t, noises, None)
        compile_seconds = time.perf_counter() - start
        diffs = relative_differences(compiled, level_step(eager, s, t, noises, None))
    name = max(diffs, key=diffs.get)
    if diffs[name] > COMPILE_TOLERANCE:
        raise CheckFailed(f"compiled level differs from eager: {name} by {diffs[name]:.3g} (> {COMPILE_TOLERANCE})")
    return {"first_call_seconds": compile_seconds, "worst_tensor": name, "relative_diff": diffs[name],
            "tensors": len(diffs), "tolerance": COMPILE_TOLERANCE}  # fmt: skip


# ------------------------------------------------------------------------------- cases and runner
@dataclass(frozen=True)
class Case:
    """One check: its name, what it does, the function, and the cases whose runs it uses."""

    name: str
    run: Callable[[Check], dict[str, Any]]
    needs: tuple[str, ...] = ()

    @property
    def what(self) -> str:
        doc = self.run.__doc__ or ""
        return doc.strip().splitlines()[0] if doc else ""


def _cases() -> dict[str, Case]:
    cases = [
        Case("module_fast_fp32", module_fast_case("fp32")),
        Case("module_fast_bf16", module_fast_case("bf16")),
        Case("module_compile", module_compile_case),
        Case("train_fp32", train_case("fp32")),
        Case("distill_fp32", distill_case("fp32"), ("train_fp32",)),
    ]
    for variant in PRECISIONS:
        if variant != "fp32":
            cases += [Case(f"train_{variant}", train_case(variant)),
                      Case(f"distill_{variant}", distill_case(variant), ("train_fp32",))]  # fmt: skip
    cases += [
        Case("resume", resume_case, ("train_fp32",)),
        Case("ddp", ddp_case, ("train_fp32",)),
        Case("eval", eval_case, ("distill_fp32",)),
        Case("export", export_case, ("distill_fp32",)),
        Case("visualize", visualize_case, ("distill_fp32",)),
        Case("detection_teacher", detection_teacher_case),
        Case("detection_diffkd", detection_diffkd_case, ("detection_teacher",)),
        Case("segmentation_teacher", segmentation_teacher_case),
        Case("segmentation_diffkd", segmentation_diffkd_case, ("segmentation_teacher",)),
        Case("yolo_diffkd", yolo_case),
    ]
    return {case.name: case for case in cases}


CASES = _cases()


def selected(only: list[str] | None) -> list[Case]:
    """The cases to run in their order: all, or `only` plus what they need."""
    if not only:
        return list(CASES.values())
    unknown = [n for n in only if n not in CASES]
    if unknown:
        raise SystemExit(f"gpu_check: error: unknown case(s) {', '.join(unknown)}; --list shows the {len(CASES)} cases")
    wanted = set(only)
    for name in reversed(list(CASES)):  # needs point backwards, so one reverse pass closes the set
        if name in wanted:
            wanted.update(CASES[name].needs)
    return [case for name, case in CASES.items() if name in wanted]


def run_case(case: Case, check: Check, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Run one case; its record (status ok / failed / skipped, seconds, details or error)."""
    record: dict[str, Any] = {"name": case.name, "what": case.what}
    start = time.perf_counter()
    missing = [n for n in case.needs if results.get(n, {}).get("status") != "ok"]
    try:
        if missing:
            raise Skipped(f"needs {', '.join(missing)}, which did not succeed")
        record["details"] = case.run(check)
        record["status"] = "ok"
    except Skipped as err:
        record.update(status="skipped", reason=str(err))
    except Exception as err:  # noqa: BLE001 - a failing case is recorded and the next one runs
        message = str(err).strip().splitlines()
        record.update(status="failed", error={"type": type(err).__name__, "message": message[0] if message else ""})
        tail = getattr(err, "output_tail", None) or "".join(traceback.format_exception(err))
        record["error"]["tail"] = tail[-3000:]
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def device_description(device: str) -> str:
    """torch.cuda.get_device_name, or the CPU's model name and torch's thread count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), model)  # fmt: skip
    return f"CPU {model or platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Replace the JSON file atomically (a reader sees the previous version or this one)."""
    from diffkd.atomic import write_atomic

    write_atomic((json.dumps(report, indent=1, default=str) + "\n").encode(), path)


def table(records: list[dict[str, Any]]) -> str:
    """One line per case: name, status, seconds, and the reason or error."""
    lines = []
    for r in records:
        note = r.get("reason") or (f"{r['error']['type']}: {r['error']['message']}" if "error" in r else "")
        lines.append(f"{r['name']:<22} {r['status']:<8} {r['seconds']:>7.1f} s  {note}"[:200])
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA if available")
    p.add_argument("--json", default="gpu_check.json", help="the report, rewritten after every case")
    p.add_argument("--workdir", help="folder for the runs, logs and mosaics (default: a fresh temporary folder, kept)")
    p.add_argument("--data-root", help="folder with the four Fashion-MNIST files (default: the library's lookup)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these cases (and the cases they need) only")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--ddp-procs", type=int, help="torchrun processes (default: 2 on a CPU, one per GPU up to 2)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds one subprocess may run")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for case in CASES.values():
            needs = f"  (needs {', '.join(case.needs)})" if case.needs else ""
            print(f"{case.name:<22} {case.what}{needs}")
        return 0
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))  # this checkout's diffkd, as its subprocesses get
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    if device == "auto":
        device = "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: error: --device cuda, but CUDA is not available here (use --device cpu or auto)")
    cases = selected(args.only)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    procs = args.ddp_procs or (2 if device == "cpu" else min(2, torch.cuda.device_count()))
    check = Check(device, workdir.resolve(), Path(args.data_root).resolve() if args.data_root else None, args.timeout, procs)
    head = {
        "device": device,
        "device_name": device_description(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "command": [sys.executable, *sys.argv] if argv is None else [sys.executable, __file__, *argv],
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "workdir": str(check.workdir),
        "fashion_mnist": str(args.data_root or "the library's lookup"),
        "ddp_processes": procs,
    }
    report: dict[str, Any] = {"header": head, "cases": []}
    print(f"gpu_check on {head['device_name']} (torch {torch.__version__}); runs and logs in {workdir}", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for case in cases:
        record = run_case(case, check, results)
        results[case.name] = record
        report["cases"].append(record)
        report["summary"] = {s: sum(r["status"] == s for r in report["cases"]) for s in ("ok", "failed", "skipped")}
        report["seconds"] = round(sum(r["seconds"] for r in report["cases"]), 1)
        write_json(Path(args.json), report)
        print(table([record]), flush=True)
    summary = report["summary"]
    print(f"\n{table(report['cases'])}\n{summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} skipped "
          f"in {report['seconds']:.0f} s; JSON {args.json}")  # fmt: skip
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
