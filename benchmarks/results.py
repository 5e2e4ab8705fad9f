"""Results files: what a benchmark measured, with how, when and where, kept in the repository.

Every benchmark writes one JSON file in benchmarks/results/: the command, the date, the versions, the machine, the
seeds, and its runs (one record per run and seed: the row, the group, the metrics) or, for figures measured before
the files existed, the summary rows as they were published (`summary`, with `source` saying so). The tables in the
README and the docs are rendered from these files by benchmarks/render.py, so a quoted figure cannot go stale.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Iterable
from datetime import date
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    """The versions and the machine a benchmark ran on."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffkd", "torchvision", "ultralytics", "transformers", "lightning"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    machine = f"{platform.machine()} {os.cpu_count()}-core CPU, {device}"
    return {"versions": versions, "machine": machine}


def write(name: str, *, command: str, seeds: Iterable[int], runs: list[dict], extra: dict | None = None,
          folder: Path = RESULTS) -> Path:
    """Write benchmarks/results/<name>.json: the runs (each {"group", "row", "seed", "metrics": {...}}) with the
    command, today's date, the environment and the seeds."""
    record = {"benchmark": name, "command": command, "date": date.today().isoformat(), **environment(),
              "seeds": sorted(set(seeds)), "runs": runs, **(extra or {})}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    return path


def read(name: str, folder: Path = RESULTS) -> dict:
    """The results file <name>.json."""
    return json.loads((folder / f"{name}.json").read_text())


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value)."""
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)
