"""Run checkpoints: written atomically, read with weights_only=True, checked, and unpacked into weights.

A checkpoint holds only tensors, plain python values and state dicts (the config as a plain dict),
so `torch.load(..., weights_only=True)` can read it and loading never runs code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..models.weights import UnreadableCheckpoint, describe_mismatch, read_checkpoint
from .errors import CheckpointError

FORMAT = "diffkd-run"
VERSION = 2  # 2: the Distiller's state as the one distillation step holds it (0.2.0)
STUDENT_PREFIX = "student."  # the Distiller's state dict keys of the student


def load_file(path: str | Path) -> Any:
    """The file read safely (models.weights.read_checkpoint); a missing or unreadable one raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        return read_checkpoint(path)
    except UnreadableCheckpoint as err:
        raise CheckpointError(str(err)) from None


def is_run_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is a diffkd run checkpoint (rather than a plain state dict)."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a run checkpoint (last.pt / best.pt) and check its format; errors name the file."""
    ckpt = load_file(path)
    if not is_run_checkpoint(ckpt):
        raise CheckpointError(f"{path} is not a diffkd run checkpoint (no format={FORMAT!r} entry)")
    if ckpt.get("version") != VERSION:
        wrote = f"diffkd {ckpt['diffkd_version']}" if ckpt.get("diffkd_version") else "an earlier diffkd"
        raise CheckpointError(f"{path} is a checkpoint of format version {ckpt.get('version')!r}, written by {wrote}; "
                              f"this diffkd {__version__} reads version {VERSION}: use the diffkd that wrote it, or "
                              "start a new run")
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


def saved_model_name(ckpt: dict[str, Any]) -> str | None:
    """The model a run checkpoint's evaluated weights belong to: the config's model (train) or student (distill)."""
    section = ckpt.get("config", {}).get("model" if ckpt.get("mode") == "train" else "student")
    return section.get("name") if isinstance(section, dict) else None


def load_into(
    module: nn.Module, weights: dict[str, torch.Tensor], source: str | Path, saved_for: str | None, target: str
) -> None:
    """module.load_state_dict(weights) strictly; a mismatch names the source, the model it was saved for, the
    target it was asked to fit, and the first few missing, unexpected and wrong-shape keys (not torch's dump)."""
    problem = describe_mismatch(module, weights)
    if problem:
        saved = f" was saved for model {saved_for!r} and" if saved_for else ""
        raise CheckpointError(f"{source}{saved} does not fit {target}: {problem}")
    module.load_state_dict(weights, strict=True)
