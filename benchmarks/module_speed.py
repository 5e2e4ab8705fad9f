"""Forward+backward time of one DiffKD level vs a plain MSE baseline (1x1 connector + MSE),
measured side by side (interleaved) on the same tensors; the level runs on its default fast path, as
the reference (fast=False) and with recompute=True (same weights), so the fast path's gain and the
cost of recomputation are shown too, with the activation memory each keeps for backward.

    python benchmarks/module_speed.py [--device cpu|cuda] [--repeats 10] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from diffkd import DiffKD

try:
    from .timing import device_name, interleaved_ms, saved_activation_mb
except ImportError:  # run as a script
    from timing import device_name, interleaved_ms, saved_activation_mb

CASES = {
    "imagenet_b1 (512->512, latent 1024, 7x7, batch 8)": dict(s=512, t=512, latent=1024, hw=7, batch=8),
    "tiny (32->256, 7x7, batch 128)": dict(s=32, t=256, latent=None, hw=7, batch=128),
    "demo (32->256, latent 64, 7x7, batch 128)": dict(s=32, t=256, latent=64, hw=7, batch=128),
}


def measure(case: dict, device: torch.device, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    s = torch.randn(case["batch"], case["s"], case["hw"], case["hw"], device=device, requires_grad=True)
    t = torch.randn(case["batch"], case["t"], case["hw"], case["hw"], device=device)
    fast = DiffKD(case["s"], case["t"], case["latent"]).to(device)
    reference = DiffKD(case["s"], case["t"], case["latent"], fast=False).to(device)
    recomputing = DiffKD(case["s"], case["t"], case["latent"], recompute=True).to(device)
    for level in (reference, recomputing):
        level.load_state_dict(fast.state_dict())
    connector = nn.Conv2d(case["s"], case["t"], 1).to(device)

    def step(level: DiffKD):
        return lambda: level(s, t).loss.backward()

    def mse_step():
        F.mse_loss(connector(s), t).backward()

    ms = interleaved_ms({"fast": step(fast), "reference": step(reference), "recompute": step(recomputing), "mse": mse_step},
                        device, warmup, repeats)
    fast_ms, reference_ms, mse_ms = ms["fast"], ms["reference"], ms["mse"]
    per_image = {name: round(saved_activation_mb(partial(level, s, t), level.parameters()) / case["batch"], 3)
                 for name, level in (("fast", fast), ("reference", reference), ("recompute", recomputing))}
    return {"diffkd_ms": round(fast_ms, 3), "diffkd_reference_ms": round(reference_ms, 3),
            "diffkd_recompute_ms": round(ms["recompute"], 3), "mse_ms": round(mse_ms, 3),
            "ratio": round(fast_ms / mse_ms, 2), "fast_path_speedup": round(reference_ms / fast_ms, 2),
            "saved_mb_per_image": per_image}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    results = {"device": device_name(device), "torch": torch.__version__, "cases": {}}
    for name, case in CASES.items():
        results["cases"][name] = measure(case, device, args.warmup, args.repeats)
        r = results["cases"][name]
        mb = r["saved_mb_per_image"]
        print(f"{name:46s} DiffKD {r['diffkd_ms']:8.1f} ms (reference {r['diffkd_reference_ms']:8.1f} ms, "
              f"x{r['fast_path_speedup']:.2f}; recompute {r['diffkd_recompute_ms']:8.1f} ms)   MSE {r['mse_ms']:7.1f} ms   "
              f"ratio {r['ratio']:6.2f}x   saved MB/image fast {mb['fast']:.2f}, reference {mb['reference']:.2f}, "
              f"recompute {mb['recompute']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
