"""Load the teacher's trained weights: from a diffkd run (its evaluated weights) or any checkpoint file."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import ConfigError, TeacherConfig
from ..models.weights import extract_state_dict, file_sha256
from .checkpoint import evaluated_weights, find_checkpoint, is_run_checkpoint, load_file, load_into, saved_model_name
from .errors import CheckpointError


def load_teacher_weights(model: nn.Module, spec: TeacherConfig) -> Path | None:
    """Fill model with teacher.checkpoint: a run dir or its best.pt/last.pt (EMA weights if that run used EMA),
    or a state dict file (raw, or under "model"/"state_dict"); sha256 is checked first when given. Returns the
    file read (None for pretrained weights without a checkpoint)."""
    if spec.checkpoint is None:
        if spec.pretrained:
            return None
        raise ConfigError(
            "teacher.checkpoint: required (a trained teacher's run dir or weights file), "
            "unless teacher.pretrained=true; distilling from an untrained teacher teaches nothing"
        )
    path = find_checkpoint(Path(spec.checkpoint).expanduser(), "best")
    if spec.sha256 is not None and file_sha256(path).lower() != spec.sha256.strip().lower():
        raise CheckpointError(
            f"teacher checkpoint {path}: sha256 mismatch, expected {spec.sha256}, got {file_sha256(path)}"
        )
    content = load_file(path)
    if is_run_checkpoint(content):
        weights, saved_for = evaluated_weights(content), saved_model_name(content)
    else:
        weights, saved_for = extract_state_dict(content), None
    load_into(model, weights, f"teacher checkpoint {path}", saved_for, f"model {spec.name!r}")
    return path
