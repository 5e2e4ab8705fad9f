"""Distillation methods by name. Adding one = its own file + one line in METHODS."""
from __future__ import annotations

import difflib

import torch

from .base import Method, MethodOutput
from .crd import CRD
from .cwd import CWD
from .diffkd import DiffKD
from .dist import DIST
from .dkd import DKD
from .fgd import FGD
from .kd import KD
from .mgd import MGD
from .mse import MSE
from .pkd import PKD
from .pkt import PKT
from .regression_l1 import RegressionL1
from .reviewkd import ReviewKD
from .rkd import RKD
from .srrl import SRRL
from .vid import VID

METHODS: dict[str, type[Method]] = {
    "kd": KD,
    "mse": MSE,
    "dist": DIST,
    "dkd": DKD,
    "diffkd": DiffKD,
    "regression_l1": RegressionL1,
    "rkd": RKD,
    "pkt": PKT,
    "vid": VID,
    "crd": CRD,
    "reviewkd": ReviewKD,
    "srrl": SRRL,
    "fgd": FGD,
    "cwd": CWD,
    "mgd": MGD,
    "pkd": PKD,
}

Shapes = torch.Size | list[torch.Size]  # a list: one shape per tap of a multi-tap level


def method_class(name: str) -> type[Method]:
    """The registered class of method `name`; an unknown name gets the closest one and the list."""
    if name not in METHODS:
        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; available: {sorted(METHODS)}")
    return METHODS[name]


def build_method(name: str, student_shape: Shapes, teacher_shape: Shapes, *,
                 layouts: tuple[str | list[str], str | list[str]] | None = None, dataset_size: int | None = None,
                 **options) -> Method:
    """Instantiate method `name` for the probed student/teacher tap shapes and layouts (a list per side for
    several taps).

    `dataset_size` (the training set's size) reaches only methods that declare `needs_indices`.
    """
    cls = method_class(name)
    if any(isinstance(shape, list) for shape in (student_shape, teacher_shape)) and not cls.takes_tap_lists:
        takers = sorted(n for n, c in METHODS.items() if c.takes_tap_lists)
        raise ValueError(f"method {name!r} takes one student tap and one teacher tap, not lists; "
                         f"give single taps (methods that take lists: {', '.join(takers)})")
    for role, side in zip(("student", "teacher"), layouts or ()):
        for i, layout in enumerate(side if isinstance(side, list) else [side]):
            if layout not in cls.layouts:
                where = f"{role} tap {i}" if isinstance(side, list) else f"{role} tap"
                raise ValueError(
                    f"{name} reads {', '.join(sorted(cls.layouts))} captures, but the {where} is {layout!r}; "
                    f"give the tap a layout {name} reads (a raw capture is not channel-first)"
                )
    unknown = [key for key in options if key not in cls.option_names()]
    if unknown:  # checked against the declared options, so a TypeError inside build stays the method's own
        raise ValueError(unknown_option(name, unknown[0]))
    if cls.needs_indices:
        if dataset_size is None:
            raise ValueError(f"method {name!r} needs the training set's size: pass dataset_size=len(train_set) "
                             "to the Distiller (diffkd distill does)")
        options["dataset_size"] = dataset_size
    return cls.build(student_shape, teacher_shape, **options)


def unknown_option(method: str, option: str) -> str:
    """The error for an option `method` does not take: the closest valid one, and all of them."""
    valid = METHODS[method].option_names()
    if not valid:
        return f"method {method!r} got an unknown option {option!r}; it takes no options"
    close = difflib.get_close_matches(option, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"method {method!r} got an unknown option {option!r}{hint}; valid options: {', '.join(valid)}"


__all__ = ["METHODS", "Method", "MethodOutput", "build_method", "method_class"]
