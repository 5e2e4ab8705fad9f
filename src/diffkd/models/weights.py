"""Loading checkpoints into models: published teachers, our own saves, DDP saves; safely (weights only)."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

_SHOWN = 5  # how many offending keys an error message lists

# How a file torch.save wrote begins: a zip archive (torch >= 1.6), or the legacy format's pickled magic number.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that cannot be read safely; the message names the file and says why in its terms."""


def read_checkpoint(path: str | os.PathLike) -> Any:
    """torch.load(weights_only=True) on CPU, one shared reader for every loading path.

    Each way a file can fail gets its own message: an empty file, a file torch.save did not write,
    a truncated or corrupt one, and one holding objects other than tensors and plain containers,
    which is refused for safety (unpickling those could run code); torch's own advice is not passed on.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(len(_LEGACY_MAGIC))
    if not head:
        raise UnreadableCheckpoint(f"cannot read checkpoint {path}: empty file (0 bytes)")
    if not (head.startswith(_ZIP_MAGIC) or head == _LEGACY_MAGIC):
        raise UnreadableCheckpoint(
            f"cannot read checkpoint {path}: not a torch checkpoint (it does not begin as files written by "
            "torch.save do); check the path"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:  # an instruction the safe unpickler does not know: damage, or an unusual protocol
            reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(err))
            raise UnreadableCheckpoint(
                f"cannot read checkpoint {path}: the safe reader cannot parse its pickle "
                f"({reason.group(1).strip() if reason else 'unknown instruction'}); the file is corrupt, or was "
                "saved with a pickle protocol other than torch.save's default"
            ) from None
        raise UnreadableCheckpoint(
            f"cannot read checkpoint {path}: it holds objects other than tensors and plain containers "
            f"({found.group(1)}); it was refused for safety, since loading such objects can run code "
            "(diffkd reads tensors, numbers, strings and their lists and dicts, e.g. a model.state_dict())"
        ) from None
    except Exception as err:  # the zip reader and the unpickler raise RuntimeError, EOFError, ... for damage
        detail = str(err).split(". ")[0].splitlines()[0] if str(err) else type(err).__name__
        raise UnreadableCheckpoint(
            f"cannot read checkpoint {path}: the file is truncated, corrupt or incomplete ({detail})"
        ) from None


def read_state_file(path: str | os.PathLike, expected_format: int, what: str) -> dict:
    """A state file diffkd writes beside a framework's checkpoint (`{"format", "diffkd_version", ...}`), read with
    `read_checkpoint`; a missing, damaged or other-format file is one ValueError saying what to do (`what`: why
    the file is needed, said when it is missing). Files written before formats were numbered have none."""
    from .. import __version__

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is missing: {what}")
    try:
        state = read_checkpoint(path)
    except UnreadableCheckpoint as exc:
        raise ValueError(f"{exc}; resume from another checkpoint (with its own {path.name}), or start a new run") from None
    found = state.get("format") if isinstance(state, dict) else None
    if found != expected_format:
        wrote = f"diffkd {state['diffkd_version']}" if isinstance(state, dict) and state.get("diffkd_version") else \
            "an earlier diffkd"
        number = f"format {found}" if found is not None else "no format number"
        raise ValueError(f"{path} was written by {wrote} ({number}); this diffkd {__version__} reads format "
                         f"{expected_format}: use the diffkd that wrote it, or start a new run")
    return state


def describe_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool = True) -> str | None:
    """Why `state` does not load into model: the first few missing, unexpected (if strict) and
    wrong-shape keys; None when it loads."""
    expected = model.state_dict()
    problems = []
    if strict:
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        problems += [f"missing {_listed(missing)}"] if missing else []
        problems += [f"unexpected {_listed(unexpected)}"] if unexpected else []
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()  # tensors: not extra states
             if torch.is_tensor(v) and torch.is_tensor(state.get(k)) and state[k].shape != v.shape]
    problems += [f"wrong shape (file vs model): {_listed(wrong)}"] if wrong else []
    return "; ".join(problems) or None


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
    state = extract_state_dict(read_checkpoint(path))
    problem = describe_mismatch(model, state, strict)
    if problem:
        raise ValueError(f"{path} does not fit the model ({type(model).__name__}): {problem}")
    model.load_state_dict(state, strict=strict)
