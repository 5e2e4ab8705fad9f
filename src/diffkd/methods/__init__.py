"""Distillation methods by name. Adding one = its own file + one line in METHODS."""
from __future__ import annotations

import difflib

import torch

from .base import Method, MethodOutput
from .cwd import CWD
from .diffkd import DiffKD
from .dist import DIST
from .dkd import DKD
from .fgd import FGD
from .kd import KD
from .mse import MSE
from .regression_l1 import RegressionL1

METHODS: dict[str, type[Method]] = {"kd": KD, "mse": MSE, "dist": DIST, "dkd": DKD, "diffkd": DiffKD, "regression_l1": RegressionL1,
                               "fgd": FGD, "cwd": CWD}


def build_method(name: str, student_shape: torch.Size, teacher_shape: torch.Size, *,
                 layouts: tuple[str, str] | None = None, **options) -> Method:
    """Instantiate method `name` for the probed student/teacher tap shapes (and their tap layouts)."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; available: {sorted(METHODS)}")
    accepted = METHODS[name].layouts
    for role, layout in zip(("student", "teacher"), layouts or ()):
        if layout not in accepted:
            raise ValueError(
                f"{name} reads {', '.join(sorted(accepted))} captures, but the {role} tap is {layout!r}; "
                f"give the tap a layout {name} reads (a raw capture is not channel-first)"
            )
    try:
        return METHODS[name].build(student_shape, teacher_shape, **options)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ValueError(f"method {name!r} got an unknown option: {exc}") from None


__all__ = ["METHODS", "Method", "MethodOutput", "build_method"]
