"""What a run was trained on: its teacher's weights and its training set, so --resume can refuse a change.

A resumed run that silently got another teacher or another training set would report metrics of a run
that never happened. The identity is recorded in last.pt and, for people and scripts, in the run
directory (identity.json). The teacher is known by a digest of its weights (not of the file), so a
moved or re-saved file of the same weights is the same teacher; the training set by its size, its
class names and, for an image folder, a digest of its sorted relative file list, so a folder that only
moved is the same data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import __version__
from ..atomic import write_atomic
from ..config import ConfigError
from .rundir import IDENTITY_FILE


def weights_digest(module: nn.Module) -> str:
    """sha256 of a module's state dict: every entry's name, dtype, shape and values (memory layout aside)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def dataset_identity(dataset: Dataset, classes: list[str] | None) -> dict[str, Any]:
    """A training set's size, class names (where the data names them) and file-list digest (an image folder)."""
    files = getattr(dataset, "file_list_digest", None)
    return {"items": len(dataset), "classes": classes, "files_sha256": files() if callable(files) else None}


def record_identity(identity: dict[str, Any], run_dir: Path) -> None:
    """Write the identity into the run directory (identity.json, with the diffkd version that trains it), for
    people and scripts to read."""
    record = {**identity, "diffkd_version": __version__}
    write_atomic((json.dumps(record, indent=1) + "\n").encode(), run_dir / IDENTITY_FILE)


def _shown(value: Any) -> str:
    if isinstance(value, list) and len(value) > 6:
        return f"[{', '.join(map(str, value[:5]))}, ... ({len(value)} in all)]"
    return "none" if value is None else str(value)


def check_identity(saved: dict[str, Any] | None, current: dict[str, Any], path: Path) -> None:
    """Refuse to resume the run of last.pt (path) on another teacher or training set, naming old and new.

    A checkpoint written before identities were recorded (saved None) has nothing to compare."""
    if saved is None:
        return
    changes = []
    old_teacher, new_teacher = saved.get("teacher"), current.get("teacher")
    if old_teacher and new_teacher and old_teacher["weights_sha256"] != new_teacher["weights_sha256"]:
        changes.append(
            f"the teacher's weights (digest {old_teacher['weights_sha256'][:12]} from {old_teacher['checkpoint']}, "
            f"now {new_teacher['weights_sha256'][:12]} from {new_teacher['checkpoint']})"
        )
    old_data, new_data = saved.get("train_set") or {}, current.get("train_set") or {}
    what = {"items": "size", "classes": "class names", "files_sha256": "file list (digest)"}
    for key, name in what.items():
        if key in old_data and old_data[key] != new_data.get(key):
            old, new = old_data[key], new_data.get(key)
            if key == "files_sha256":
                old, new = (v[:12] if isinstance(v, str) else v for v in (old, new))
            changes.append(f"the training set's {name} ({_shown(old)}, now {_shown(new)})")
    if changes:
        raise ConfigError(
            f"cannot resume {path.parent}: what it trains on changed since {path.name}: {'; '.join(changes)}; "
            "resume with the run's teacher and training set, or start afresh with --force"
        )
