"""Distillation methods by name. Adding one = its own file + one line in METHODS."""
from __future__ import annotations

import difflib
import re

import torch

from .base import Method, MethodOutput
from .diffkd import DiffKD
from .dist import DIST
from .dkd import DKD
from .kd import KD
from .mse import MSE
from .regression_l1 import RegressionL1

METHODS: dict[str, type[Method]] = {"kd": KD, "mse": MSE, "dist": DIST, "dkd": DKD, "diffkd": DiffKD, "regression_l1": RegressionL1}


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
        found = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if found is None:
            raise
        raise ValueError(unknown_option(name, found.group(1))) from None


def unknown_option(method: str, option: str) -> str:
    """The error for an option `method` does not take: the closest valid one, and all of them."""
    valid = METHODS[method].option_names()
    if not valid:
        return f"method {method!r} got an unknown option {option!r}; it takes no options"
    close = difflib.get_close_matches(option, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"method {method!r} got an unknown option {option!r}{hint}; valid options: {', '.join(valid)}"


__all__ = ["METHODS", "Method", "MethodOutput", "build_method"]
