"""Training cost of every method relative to plain KD, measured side by side in one process,
plus parameters and FLOPs of the DiffKD modules of the paper's Tab. 8.

    python benchmarks/cost.py steps [--batch 128] [--rounds 10] [--json out.json]   # Fashion-MNIST pair, CPU or GPU
    python benchmarks/cost.py flops [--json out.json]                               # Tab. 8 params / FLOPs
    python benchmarks/cost.py breakdown [--batch 128] [--rounds 10] [--json out.json] # where the demo DiffKD step's time goes

Step time: forward + backward + SGD step of student + method modules, teacher forward under no_grad;
methods run in interleaved rounds (one step of each per round) so machine-load drift hits all alike;
the figure is the median over rounds after warm-up. Peak memory: on CUDA the allocator's peak for a
step; on CPU how far the first step raises a fresh subprocess's peak RSS above its size after set-up
(Linux; includes one-time optimizer state, as freed pages are kept by the C allocator).
FLOPs: torch.utils.flop_counter (2 per multiply-add) of one forward of one module at batch 1, in
eval mode, with the 5-step chain; the paper's Tab. 8 counts multiply-adds, so we print both.
Breakdown: torch.profiler self time per op of the KD step and the demo's DiffKD step, grouped into
kinds of work, with each step's FLOPs (forward + backward) and the time they would take at this
machine's large-matmul rate: how far the DiffKD step is from a compute bound, and what fills the gap.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from diffkd import DiffKD, Distiller, Level, models

try:
    from .timing import device_name, interleaved_ms, sync
except ImportError:  # run as a script
    from timing import device_name, interleaved_ms, sync

FEATURE, LOGITS = "features", "fc"
METHODS: dict[str, list[Level]] = {
    "student alone": [],
    "kd": [Level(LOGITS, LOGITS, "kd")],
    "mse": [Level(FEATURE, FEATURE, "mse")],
    "dist": [Level(LOGITS, LOGITS, "dist")],
    "dkd": [Level(LOGITS, LOGITS, "dkd")],
    "diffkd feature": [Level(FEATURE, FEATURE, "diffkd")],
    "diffkd logits": [Level(LOGITS, LOGITS, "diffkd")],
    "diffkd feature+logits": [Level(FEATURE, FEATURE, "diffkd"), Level(LOGITS, LOGITS, "diffkd")],
    "diffkd AE64 feature+logits": [Level(FEATURE, FEATURE, "diffkd", latent_channels=64), Level(LOGITS, LOGITS, "diffkd")],
    "diffkd AE64 feature+logits, reference": [Level(FEATURE, FEATURE, "diffkd", latent_channels=64, fast=False),
                                              Level(LOGITS, LOGITS, "diffkd", fast=False)],
    "diffkd AE32 feature+logits": [Level(FEATURE, FEATURE, "diffkd", latent_channels=32), Level(LOGITS, LOGITS, "diffkd")],
}


def make_step(levels: list[Level], batch: int, device: torch.device):
    """One training step closure for a method on the Fashion-MNIST teacher/student pair."""
    torch.manual_seed(0)
    teacher, student = models.create("fmnist_teacher"), models.create("fmnist_student")
    x = torch.randn(batch, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if levels:
        model = Distiller(teacher, student, [Level(lv.student, lv.teacher, lv.method, **lv.options) for lv in levels],
                          input_shape=(1, 28, 28)).to(device)
        params = list(model.trainable_parameters())
        extra = model.extra_parameters()
    else:
        model, params, extra = student.to(device), list(student.parameters()), 0
    model.train()
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def step() -> None:
        if levels:
            out = model(x, y)
            loss = F.cross_entropy(out.student, y) + out.loss
        else:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, extra


def run_steps(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    steps = {name: make_step(levels, args.batch, device) for name, levels in METHODS.items()}
    times = interleaved_ms({name: step for name, (step, _) in steps.items()}, device, args.warmup, args.rounds)
    kd = times["kd"]
    rows = {}
    for name, (_, extra) in steps.items():
        ms = times[name]
        rows[name] = {"step_ms": round(ms, 2), "vs_kd": round(ms / kd, 2), "extra_params": extra,
                      "peak_mb": peak_memory_mb(name, args, device)}
    return {"device": device_name(device), "torch": torch.__version__, "batch": args.batch,
            "rounds": args.rounds, "methods": rows}


def peak_memory_mb(name: str, args: argparse.Namespace, device: torch.device) -> float:
    """Peak memory of one method's step: CUDA allocator peak, or a CPU subprocess's RSS growth."""
    if device.type == "cuda":
        step, _ = make_step(METHODS[name], args.batch, device)
        step()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    code = (  # reset the kernel's peak-RSS mark after set-up, then read how far the first step raises it
        "import sys; sys.argv=['cost.py']; import torch; import benchmarks.cost as c;"
        f"step,_=c.make_step(c.METHODS[{name!r}], {args.batch}, torch.device('cpu'));"
        "open('/proc/self/clear_refs','w').write('5'); before=c.rss_kb('VmRSS'); step();"
        "print((c.rss_kb('VmHWM')-before)/1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(float(out.stdout.strip().splitlines()[-1]), 1)


def rss_kb(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmRSS now, VmHWM peak), in kB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


# ------------------------------------------------------------------------------------------ breakdown
KINDS = {  # substring of an aten op name -> kind of work (first match wins)
    "convolution": "convolutions and matmuls", "addmm": "convolutions and matmuls", "aten::mm": "convolutions and matmuls",
    "batch_norm": "batch norms",
    "mse_loss": "losses", "softmax": "losses", "kl_div": "losses",
    "copy_": "copies, fills, noise", "fill_": "copies, fills, noise", "zero_": "copies, fills, noise", "normal_": "copies, fills, noise",
    "add": "pointwise and reductions", "mul": "pointwise and reductions", "relu": "pointwise and reductions",
    "clamp": "pointwise and reductions", "threshold": "pointwise and reductions", "sum": "pointwise and reductions",
    "sub": "pointwise and reductions", "div": "pointwise and reductions", "mean": "pointwise and reductions",
}


def profile_ms(step, device: torch.device, rounds: int) -> dict[str, float]:
    """Profiler self time (device time on CUDA) per kind of work, ms per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for _ in range(2):
        step()
    with profile(activities=activities) as prof:
        for _ in range(rounds):
            step()
        sync(device)
    out: dict[str, float] = {}
    for event in prof.key_averages():
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        kind = next((k for sub, k in KINDS.items() if sub in event.key), "other")
        out[kind] = out.get(kind, 0.0) + us / 1000 / rounds
    return out


def step_gflops(step) -> float:
    """FLOPs of one step (forward + backward), in G."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def matmul_gflops_per_s(device: torch.device, n: int = 2048) -> float:
    """This machine's large-matmul rate: the compute bound the step FLOPs are held against."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    ms = interleaved_ms({"mm": lambda: a @ b}, device, 2, 5)["mm"]
    return 2 * n**3 / ms / 1e6


def copy_gb_per_s(device: torch.device, mb: int = 256) -> float:
    """This machine's memory bandwidth for a large copy (read + write), the bound of pointwise work."""
    a = torch.randn(mb * 2**18, device=device)
    b = torch.empty_like(a)
    ms = interleaved_ms({"copy": lambda: b.copy_(a)}, device, 2, 5)["copy"]
    return 2 * mb / 1024 / ms * 1000


def run_breakdown(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    rate = matmul_gflops_per_s(device)
    rows = {}
    for name in ("kd", "diffkd AE64 feature+logits"):
        step, _ = make_step(METHODS[name], args.batch, device)
        kinds = profile_ms(step, device, args.rounds)
        gflops = step_gflops(step)
        rows[name] = {"gflops": round(gflops, 2), "ms_at_matmul_rate": round(gflops / rate * 1000, 1),
                      "profiled_ms": round(sum(kinds.values()), 1), "kinds_ms": {k: round(v, 1) for k, v in sorted(kinds.items())}}
    return {"device": device_name(device), "torch": torch.__version__, "batch": args.batch,
            "matmul_gflops_per_s": round(rate, 1), "copy_gb_per_s": round(copy_gb_per_s(device), 1), "steps": rows}


def print_breakdown(result: dict) -> None:
    kd, diffkd = result["steps"]["kd"], result["steps"]["diffkd AE64 feature+logits"]
    print(f"device: {result['device']}, batch {result['batch']}, large matmul {result['matmul_gflops_per_s']} GFLOP/s, "
          f"memory copy {result['copy_gb_per_s']} GB/s")
    for name, r in result["steps"].items():
        print(f"{name:28s} {r['gflops']:7.2f} GFLOP/step = {r['ms_at_matmul_rate']:6.1f} ms at that rate; profiled {r['profiled_ms']:7.1f} ms")
    print(f"{'kind of work (profiled ms)':28s} {'KD':>8s} {'DiffKD':>8s} {'extra':>8s}")
    for kind in sorted(set(kd["kinds_ms"]) | set(diffkd["kinds_ms"])):
        a, b = kd["kinds_ms"].get(kind, 0.0), diffkd["kinds_ms"].get(kind, 0.0)
        print(f"{kind:28s} {a:8.1f} {b:8.1f} {b - a:8.1f}")


# ------------------------------------------------------------------------------------------ Tab. 8
PAIRS = {"R34->R18": (512, 512, 7), "R50->MobileNetV1": (1024, 2048, 7)}
PAPER_TAB8_GFLOPS = {None: 1.41, 128: 0.04, 256: 0.09, 512: 0.21, 1024: 0.58, 2048: 1.82}


def module_flops(student: int, teacher: int, hw: int, latent: int | None) -> tuple[int, int]:
    """(parameters, FLOPs of one eval forward at batch 1) of one DiffKD feature level."""
    from torch.utils.flop_counter import FlopCounterMode

    level = DiffKD(student, teacher, latent).eval()
    s, t = torch.randn(1, student, hw, hw), torch.randn(1, teacher, hw, hw)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        level(s, t)
    return sum(p.numel() for p in level.parameters()), counter.get_total_flops()


def run_flops(_: argparse.Namespace) -> dict:
    out = {}
    for pair, (s, t, hw) in PAIRS.items():
        for latent in (None, 128, 256, 512, 1024, 2048):
            params, flops = module_flops(s, t, hw, latent)
            out[f"{pair} latent={latent or 'none'}"] = {
                "params": params, "gflops": round(flops / 1e9, 3), "gmacs": round(flops / 2e9, 3),
                "paper_tab8_g": PAPER_TAB8_GFLOPS[latent],
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["steps", "flops", "breakdown"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    result = {"steps": run_steps, "flops": run_flops, "breakdown": run_breakdown}[args.what](args)
    if args.what == "breakdown":
        print_breakdown(result)
    elif args.what == "steps":
        print(f"device: {result['device']}, batch {result['batch']}, median of {result['rounds']} interleaved rounds")
        print(f"{'method':40s} {'step ms':>9s} {'vs KD':>7s} {'peak MB':>8s} {'extra params':>13s}")
        for name, r in result["methods"].items():
            print(f"{name:40s} {r['step_ms']:9.1f} {r['vs_kd']:7.2f} {r['peak_mb']:8.1f} {r['extra_params']:13,d}")
    else:
        print(f"{'module':32s} {'params':>11s} {'GFLOPs':>8s} {'GMACs':>7s} {'paper Tab.8':>11s}")
        for name, r in result.items():
            print(f"{name:32s} {r['params']:11,d} {r['gflops']:8.3f} {r['gmacs']:7.3f} {r['paper_tab8_g']:11.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
