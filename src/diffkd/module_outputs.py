"""The latest output of named modules of a model, exactly as produced: what methods' extra inputs read.

A method declares the inputs it needs beyond the two features and the batch's targets
(`Method.extra_inputs`, e.g. FGD's boxes in the frame of the feature maps); the Distiller hooks the
student module each one comes from. Unlike a feature tap (`diffkd.taps`), the output may be any object,
so nothing is selected, checked or rearranged. As with taps, every forward of the model first forgets the
previous forward's outputs, a module that did not run raises instead of handing out a stale value, and a
deep copy of the hooked model gets inert hooks.
"""
from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

from torch import nn

from .taps import WeakHook, remove_handles, resolve_module


class ModuleOutputs:
    """name -> the latest output of the module at a path of `model`, refreshed on every forward of `model`."""

    def __init__(self, model: nn.Module, paths: Mapping[str, str], what: Mapping[str, str] | None = None) -> None:
        """Resolve every path now (an unknown one is named, with the closest paths); `what` names each in errors."""
        self._what = {name: (what or {}).get(name, f"output {name!r}") for name in paths}
        modules = {name: resolve_module(model, path, self._what[name]) for name, path in paths.items()}
        self._paths = dict(paths)
        self._outputs: dict[str, Any] = {}
        self._forwards = 0
        # No paths, no hooks: a student without extra inputs pays nothing per forward.
        handles = [model.register_forward_pre_hook(WeakHook(self, "_begin_forward", ""), prepend=True)] if modules else []
        handles += [module.register_forward_hook(WeakHook(self, "_keep", name)) for name, module in modules.items()]
        self._finalizer = weakref.finalize(self, remove_handles, handles)

    def _begin_forward(self, _name: str, _args: tuple[Any, ...]) -> None:
        """Root pre-hook: a new forward starts, so the previous outputs are stale."""
        self._forwards += 1
        self._outputs.clear()

    def _keep(self, name: str, _args: tuple[Any, ...], output: Any) -> None:
        """Forward hook: keep the module's output (the last run wins)."""
        self._outputs[name] = output

    def names(self) -> list[str]:
        """The names in the order given."""
        return list(self._paths)

    def __getitem__(self, name: str) -> Any:
        """The output of `name`'s module in the model's latest forward."""
        if name not in self._paths:
            raise KeyError(f"no module output named {name!r}; names: {self.names()}")
        if name not in self._outputs:
            why = ("the model has not run a forward since it was hooked" if self._forwards == 0
                   else "the module did not run in the model's latest forward, and a stale output is never reused")
            raise RuntimeError(f"{self._what[name]} (module {self._paths[name]!r}): {why}")
        return self._outputs[name]

    def close(self) -> None:
        """Remove the hooks and drop the outputs; safe to call more than once."""
        self._finalizer()
        self._outputs.clear()
