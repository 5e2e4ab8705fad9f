"""GPU cost of DiffKD vs plain KD, side by side in one process; prints a table and writes JSON.

    python benchmarks/gpu_cost.py --json gpu_cost.json                  # the full set on a GPU
    python benchmarks/gpu_cost.py --device cpu --batch 4 --size 64 --fmnist-batch 16 --steps 2 --warmup 1  # smoke test
    python benchmarks/gpu_cost.py --activations-only --device cpu --batch 16   # activation memory, any device

Cases (docs/design.md §6 and issue "Fast DiffKD"):
- ResNet-34 -> ResNet-18, batch 256, 224x224, random data, fp32 and bf16 autocast: plain KD (logits,
  tau 1), DiffKD without AE, DiffKD as in B1 (feature AE latent 1024 + logits) on its fast path, as
  the reference (fast=False) and with recompute=True on the feature level; step time (median of
  `--steps` after `--warmup`) and peak memory; and the B1 feature module alone, forward + backward.
- The Fashion-MNIST pair, batch 128: plain KD vs the demo's DiffKD (feature AE latent 64 + logits),
  fast path and reference.
DiffKD levels keep their own layout (the fast path is channels-last); `--channels-last` also converts
the networks and inputs.
Each figure is measured in the same process, with every case warmed up first.
"""
from __future__ import annotations

import argparse
import json
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from diffkd import DiffKD, Distiller, Level, models

try:
    from .timing import device_name, median_ms, saved_activation_mb
except ImportError:  # run as a script
    from timing import device_name, median_ms, saved_activation_mb

R34_R18 = {
    "kd": [Level("fc", "fc", "kd", tau=1.0)],
    "diffkd_no_ae": [Level("layer4", "layer4", "diffkd")],
    "diffkd_b1": [Level("layer4", "layer4", "diffkd", latent_channels=1024), Level("fc", "fc", "diffkd")],
    "diffkd_b1_reference": [Level("layer4", "layer4", "diffkd", latent_channels=1024, fast=False),
                            Level("fc", "fc", "diffkd", fast=False)],
    "diffkd_b1_recompute": [Level("layer4", "layer4", "diffkd", latent_channels=1024, recompute=True),
                            Level("fc", "fc", "diffkd")],
}
FMNIST = {
    "kd": [Level("fc", "fc", "kd")],
    "diffkd": [Level("features", "features", "diffkd", latent_channels=64), Level("fc", "fc", "diffkd")],
    "diffkd_reference": [Level("features", "features", "diffkd", latent_channels=64, fast=False),
                         Level("fc", "fc", "diffkd", fast=False)],
}


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def timed(step, device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """(median ms, peak MB) of step() after warm-up."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ms = median_ms(step, device, 0, steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return ms, peak


def distill_forward(teacher: str, student: str, levels: list[Level], shape: tuple[int, ...], batch: int,
                    classes: int, device: torch.device, dtype: str, channels_last: bool):
    """(forward, distiller): forward() computes one batch's training loss on random data."""
    torch.manual_seed(0)
    t, s = models.create(teacher, num_classes=classes), models.create(student, num_classes=classes)
    fresh = [Level(lv.student, lv.teacher, lv.method, **lv.options) for lv in levels]
    d = Distiller(t, s, fresh, input_shape=shape).to(device)
    fmt = torch.channels_last if channels_last and len(shape) == 3 else torch.contiguous_format
    if fmt == torch.channels_last:
        d = d.to(memory_format=fmt)
    x = torch.randn(batch, *shape, device=device).to(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), device=device)
    d.train()

    def forward() -> torch.Tensor:
        with autocast(device, dtype):
            out = d(x, y)
            return F.cross_entropy(out.student, y) + out.loss

    return forward, d


def training_step(forward, d: Distiller, dtype: str):
    """One training step (forward, backward, SGD on the trainable parameters) around forward()."""
    opt = torch.optim.SGD(d.trainable_parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        loss = forward()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} ({dtype})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def activation_memory(args: argparse.Namespace, device: torch.device) -> dict:
    """R34->R18 cases at fp32: activation MB per image kept for backward, trainable parameter MB."""
    rows = {}
    for name, levels in R34_R18.items():
        forward, d = distill_forward("resnet34", "resnet18", levels, (3, args.size, args.size), args.batch, 1000, device,
                                     "fp32", False)
        per_image = saved_activation_mb(forward, d.parameters()) / args.batch
        params = sum(p.numel() * p.element_size() for p in d.trainable_parameters()) / 2**20
        rows[name] = {"activation_mb_per_image": round(per_image, 2), "trainable_param_mb": round(params, 1)}
    for row in rows.values():
        row["activations_vs_kd"] = round(row["activation_mb_per_image"] / rows["kd"]["activation_mb_per_image"], 3)
    return rows


def module_step(batch: int, device: torch.device, dtype: str, channels_last: bool):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    level = DiffKD(512, 512, 1024).to(device)
    s = torch.randn(batch, 512, 7, 7, device=device).to(memory_format=fmt).requires_grad_()
    t = torch.randn(batch, 512, 7, 7, device=device).to(memory_format=fmt)

    def step() -> None:
        with autocast(device, dtype):
            loss = level(s, t).loss
        loss.backward()

    return step


# The targets: (section, dtype, row, field, limit); a row's value must be at most the limit.
TARGETS = {
    "B1 step, bf16, vs KD": ("r34_r18", "bf16", "diffkd_b1", "vs_kd", 1.20),
    "B1 step, fp32, vs KD": ("r34_r18", "fp32", "diffkd_b1", "vs_kd", 1.35),
    "B1 feature module fwd+bwd, bf16, ms": ("r34_r18", "bf16", "b1_feature_module_fwd_bwd", "ms", 10.0),
    "B1 peak memory, bf16, vs KD": ("r34_r18", "bf16", "diffkd_b1", "mem_vs_kd", 1.25),
    "B1 with recompute, peak memory, bf16, vs KD": ("r34_r18", "bf16", "diffkd_b1_recompute", "mem_vs_kd", 1.25),
    "Fashion-MNIST DiffKD step vs KD": ("fmnist", None, "diffkd", "vs_kd", 2.0),
}


def check_targets(result: dict) -> dict:
    """Each target present in the result: its value, its limit and whether it is met."""
    out = {}
    for name, (section, dtype, row, field, limit) in TARGETS.items():
        rows = result[section].get(dtype, {}) if dtype else result[section]
        value = rows.get(row, {}).get(field)
        if value is not None:
            out[name] = {"value": value, "limit": limit, "met": value <= limit}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--fmnist-batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--activations-only", action="store_true",
                        help="only count the activation memory of the R34->R18 cases (any device, any batch)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.activations_only:
        rows = activation_memory(args, device)
        for name, r in rows.items():
            print(f"R34->R18 batch {args.batch} {name:22s} {json.dumps(r)}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": device_name(device), "torch": torch.__version__, "batch": args.batch, "size": args.size,
                           "r34_r18": rows}, f, indent=2)
        return
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result = {"device": device_name(device),
              "torch": torch.__version__, "batch": args.batch, "size": args.size,
              "channels_last": args.channels_last, "r34_r18": {}, "fmnist": {}}
    shape = (3, args.size, args.size)

    def save() -> None:  # after every section, so a run cut short keeps what it measured
        result["targets"] = check_targets(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)

    for dtype in args.dtypes.split(","):
        rows = {}
        for name, levels in R34_R18.items():
            step = training_step(*distill_forward("resnet34", "resnet18", levels, shape, args.batch, 1000, device, dtype,
                                                  args.channels_last), dtype)
            ms, mb = timed(step, device, args.warmup, args.steps)
            rows[name] = {"step_ms": round(ms, 2), "peak_mb": round(mb, 1)}
        for name in rows:
            rows[name]["vs_kd"] = round(rows[name]["step_ms"] / rows["kd"]["step_ms"], 3)
            rows[name]["mem_vs_kd"] = round(rows[name]["peak_mb"] / rows["kd"]["peak_mb"], 3) if device.type == "cuda" else None
        ms, _ = timed(module_step(args.batch, device, dtype, args.channels_last), device, args.warmup, args.steps)
        rows["b1_feature_module_fwd_bwd"] = {"ms": round(ms, 2)}
        result["r34_r18"][dtype] = rows
        for name, r in rows.items():
            print(f"R34->R18 {dtype:5s} {name:28s} {json.dumps(r)}", flush=True)
        save()
    rows = {}
    for name, levels in FMNIST.items():
        step = training_step(*distill_forward("fmnist_teacher", "fmnist_student", levels, (1, 28, 28), args.fmnist_batch,
                                              10, device, "fp32", False), "fp32")
        ms, _ = timed(step, device, args.warmup, args.steps)
        rows[name] = {"step_ms": round(ms, 2)}
    for row in rows.values():
        row["vs_kd"] = round(row["step_ms"] / rows["kd"]["step_ms"], 3)
    result["fmnist"] = rows
    print(f"Fashion-MNIST pair, batch {args.fmnist_batch}: {json.dumps(rows)}")
    save()
    for name, target in result["targets"].items():
        print(f"target {name}: {target['value']} (limit {target['limit']}): {'met' if target['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
