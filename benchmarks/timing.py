"""Shared helpers of the benchmark scripts: device sync, median step time, device naming, and the
activation memory a forward keeps for backward."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Iterable

import torch


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times are real (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of step() over `repeats` calls after `warmup` calls."""
    return interleaved_ms({"step": step}, device, warmup, repeats)["step"]


def interleaved_ms(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of each step, timed in rounds of one call each, so that load drift on a
    shared machine hits every step alike (timing them one after another lets it bias the ratios)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            sync(device)
            start = time.perf_counter()
            step()
            sync(device)
            if round_ >= warmup:
                times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU with its torch thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads"


def saved_activation_mb(forward: Callable[[], object], parameters: Iterable[torch.Tensor]) -> float:
    """MB of distinct storages autograd keeps for backward while forward() runs, parameters
    excluded: the activation memory of a training step, the same on any device."""
    params = {p.untyped_storage().data_ptr() for p in parameters}
    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        if x.untyped_storage().data_ptr() not in params:
            saved[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        forward()
    return sum(saved.values()) / 2**20
