"""Run checkpoints: written atomically, read with weights_only=True, checked, and unpacked into weights.

A checkpoint holds only tensors, plain python values and state dicts (the config as a plain dict),
so `torch.load(..., weights_only=True)` can read it and loading never runs code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


from .errors import CheckpointError

FORMAT = "diffkd-run"
VERSION = 1
STUDENT_PREFIX = "student."  # the Distiller's state dict keys of the student


def load_file(path: str | Path) -> Any:
    """torch.load(weights_only=True) on CPU; a missing, truncated or corrupt file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types (RuntimeError, EOFError, UnpicklingError, ...)
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated, corrupt or not a torch checkpoint "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})"
        ) from err


def is_run_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is a diffkd run checkpoint (rather than a plain state dict)."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a run checkpoint (last.pt / best.pt) and check its format; errors name the file."""
    ckpt = load_file(path)
    if not is_run_checkpoint(ckpt):
        raise CheckpointError(f"{path} is not a diffkd run checkpoint (no format={FORMAT!r} entry)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')!r}, this diffkd reads {VERSION}")
    return ckpt


def find_checkpoint(path: str | Path, which: str = "best") -> Path:
    """A checkpoint file: path itself, or <path>/<which>.pt for a run directory (last.pt if no best.pt)."""
    path = Path(path)
    if path.is_dir():
        for name in (f"{which}.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"no {which}.pt or last.pt in run directory {path}")
    if not path.exists():
        raise CheckpointError(f"checkpoint or run directory {path} not found")
    return path


def evaluated_weights(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a run evaluates and exports: the EMA when on, else the model (train) or student (distill)."""
    if ckpt.get("ema") is not None:
        return ckpt["ema"]
    model = ckpt["model"]
    if ckpt["mode"] == "train":
        return model
    return {k[len(STUDENT_PREFIX) :]: v for k, v in model.items() if k.startswith(STUDENT_PREFIX)}
