"""Loading checkpoints into models: published teachers, our own saves, DDP saves; safely (weights only)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

_SHOWN = 5  # how many offending keys an error message lists


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks so large checkpoints need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract_state_dict(checkpoint: object) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: raw, or under "model" / "state_dict"; a DDP "module." prefix removed."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint holds a {type(checkpoint).__name__}, not a state dict")
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    state = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"checkpoint holds no tensors (top-level keys: {sorted(checkpoint)[:_SHOWN]})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _listed(keys: list[str]) -> str:
    """`keys` shortened to the first few, with the total count."""
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def load_weights(
    model: nn.Module, path: str | os.PathLike, sha256: str | None = None, strict: bool = True
) -> None:
    """Load a checkpoint file into `model` in place, checking its hash and keys first, with clear errors.

    Accepts a raw state dict or one under "model" / "state_dict" (the published CIFAR teachers use
    "model"), strips a leading "module." (DDP). Reads with weights_only=True, so no code in the file runs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if sha256 is not None:
        actual = file_sha256(path)
        if actual.lower() != sha256.strip().lower():
            raise ValueError(f"sha256 mismatch for {path}: expected {sha256}, got {actual}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler and the zip reader raise many types for one cause
        raise ValueError(f"{path} is not a readable checkpoint (weights_only load failed: {err})") from err
    state = extract_state_dict(checkpoint)

    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path} does not match the model's keys: missing {_listed(missing) or 'none'}; "
            f"unexpected {_listed(unexpected) or 'none'}"
        )
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{path} has tensors of the wrong shape (file vs model): {_listed(wrong)}")
    model.load_state_dict(state, strict=strict)
