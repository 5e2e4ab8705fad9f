"""`diffkd export`: a run's student weights alone, as a plain state dict a fresh student loads strictly."""

from __future__ import annotations

from pathlib import Path

from ..atomic import save_atomic
from .checkpoint import evaluated_weights, find_checkpoint, load_checkpoint


def export_weights(source: str | Path, out: str | Path | None = None, *, which: str = "best", overwrite: bool = False) -> Path:
    """Write a run's evaluated weights (EMA if it used one) to out, default <run dir>/student.pt; returns the path.

    An existing output file is refused unless overwrite (nothing is replaced silently)."""
    file = find_checkpoint(source, which)
    weights = {k: v.detach().cpu() for k, v in evaluated_weights(load_checkpoint(file)).items()}
    target = Path(out) if out is not None else file.parent / "student.pt"
    return save_atomic(weights, target, overwrite=overwrite)
