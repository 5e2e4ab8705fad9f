"""Capture features from any model by module path with forward hooks, so user models stay untouched.

A :class:`Tap` names one feature: a module path as in ``model.named_modules()`` ("layer4",
"features.18", "blocks.11.mlp"; "" is the model itself), whether to take the module's output or its
first positional input, which element of a tuple/list/dict to keep, and the capture's ``layout``.
:class:`FeatureTaps` hooks a set of named taps onto a model and hands out the processed captures of
the model's latest forward; :func:`probe_features` / :func:`probe_shapes` run one dry forward to learn
every tap's shape and layout (for building projectors before training starts).

String syntax of :meth:`Tap.parse` (for configs and command lines)::

    "layer4"                 output of model.layer4
    "backbone[0]"            element 0 of a tuple/list output (negative indices work too)
    "backbone['0']"          key "0" of a dict output (quotes make a digit key a string)
    "backbone[pool]"         key "pool" of a dict output (bare non-numeric words are string keys)
    ""                       the model's own output

Other fields (``capture="input"``, ``layout``, ``prefix_tokens``, ``token_hw``, ``tokens_to_map``,
``channels_last``) are given with a :class:`Tap` or a mapping such as
``{"path": "blocks.11", "prefix_tokens": 1}`` or ``{"path": "encoder", "layout": "sequence"}``.

Layouts. Every capture is handed out channel-first, so a method never has to guess what an axis is:

* ``"map"``: a (B, C, H, W) map, handed out as is; with ``channels_last=True`` the capture is a
  (B, H, W, C) map (timm Swin stages) and is permuted to (B, C, H, W).
* ``"vector"``: a (B, K) vector (pooled features, logits).
* ``"sequence"``: a (B, C, L) sequence of 1-D features (audio, ECG, time series), handed out as is.
* ``"tokens"``: a (B, N, C) token sequence. The first ``prefix_tokens`` (class/register tokens) are
  dropped, then the tokens are folded row-major into a (B, C, H, W) map on the grid ``token_hw`` (or
  a square grid when N is a square); with ``tokens_to_map=False`` they are handed out as a (B, C, N)
  sequence instead.
* ``"raw"``: exactly as produced, any rank (e.g. a detector's (B, anchors, 4) box regression,
  compared element by element).

``layout=None`` (the default) decides only what is certain: rank 2 is a vector, rank 4 a map;
``prefix_tokens``, ``token_hw`` or ``tokens_to_map=False`` say tokens (today's ViT syntax). A rank-3
capture is otherwise never guessed; it is a sequence only when the module that produced it says so
by its type: for ``capture="output"``, an ``nn.Conv1d``, ``nn.ConvTranspose1d``, ``nn.BatchNorm1d``,
``nn.SyncBatchNorm``, ``nn.InstanceNorm1d``, ``nn.GroupNorm`` or 1-D pooling module (PyTorch defines
each on a batch-first (B, C, L) at rank 3, with C at dim 1; its width, where it has one, must match
dim 1); an ``nn.Sequential`` takes the rule of its last child that changes anything, walking back
over element-wise children (activations, Dropout, Identity). For ``capture="input"`` the same
modules read their input as (B, C, L), and an ``nn.Sequential`` takes the rule of its first child
that changes anything. A rule applies only to a module running PyTorch's own ``forward`` (a subclass
that overrides it may transpose); every element such a module returns
(``MaxPool1d(return_indices=True)``) is (B, C, L) too. ``nn.Linear`` and ``nn.LayerNorm`` give no
rule: they fix the channel axis (the last) but not the batch axis, and PyTorch's own transformer
layers default to (N, B, C). Any other rank-3 capture raises, at access (and probe) time, a one-line
error that names the tap and the shape and asks for ``layout="tokens"`` (B, N, C) or
``layout="sequence"`` (B, C, L). A capture whose rank does not fit an explicit layout is an error
naming the layout and the shape. :meth:`FeatureTaps.layouts` tells what each capture was handed out
as: "map", "vector", "sequence" or "raw" (tokens come out as a map or a sequence).

Semantics worth knowing:

* Captures are stored as produced (not detached, not cast), so gradients flow through student
  captures and autocast dtypes are kept.
* Every forward of the root model first drops all captures of the previous forward; a tap whose
  module did not run in the latest forward raises instead of handing out a stale tensor. This also
  means at most one forward's captures are kept alive.
* If a module runs several times in one forward (weight sharing, recurrence), the last run wins.
* Attach taps to the bare model before wrapping it in DistributedDataParallel (each process has
  its own model and FeatureTaps). ``nn.DataParallel`` is not supported (replicas run in threads).
* Hooks hold the FeatureTaps only weakly: dropping it without ``close()`` still removes its hooks,
  and ``copy.deepcopy``/pickling a hooked model yields inert hooks that capture nothing.
"""

from __future__ import annotations

import difflib
import math
import re
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["LAYOUTS", "Tap", "FeatureTaps", "ProbedFeature", "call_model", "probe_features", "probe_shapes", "resolve_module"]

_SPEC_RE = re.compile(r"(?P<path>[^\[\]]*)(?:\[(?P<select>[^\[\]]+)\])?")
_INT_RE = re.compile(r"-?\d+")
_QUOTED_RE = re.compile(r"""(?P<q>['"])(?P<key>.*)(?P=q)""")
_MAX_PREFIX_HINT = 16  # how many leading tokens the non-square error tries when suggesting prefix_tokens


Layout = Literal["map", "vector", "sequence", "tokens", "raw"]
LAYOUTS: tuple[str, ...] = ("map", "vector", "sequence", "tokens", "raw")


@dataclass(frozen=True)
class Tap:
    """One feature to capture: a module path plus how to select it and what layout it has."""

    path: str
    capture: Literal["output", "input"] = "output"
    select: int | str | None = None
    token_hw: tuple[int, int] | None = None
    prefix_tokens: int = 0
    tokens_to_map: bool = True
    channels_last: bool = False  # the capture is a (B, H, W, C) map (timm Swin stages): make it (B, C, H, W)
    layout: Layout | None = None  # None: decided by rank, token fields or the module type (module docstring)

    def __post_init__(self) -> None:
        """Reject malformed fields at construction, where the mistake is made."""
        if not isinstance(self.path, str):
            raise TypeError(f"Tap.path must be a str module path, got {type(self.path).__name__}")
        if self.capture not in ("output", "input"):
            raise ValueError(f"Tap.capture must be 'output' or 'input', got {self.capture!r}")
        if self.select is not None and not (_is_int(self.select) or isinstance(self.select, str)):
            raise TypeError(f"Tap.select must be an int index, a str key or None, got {self.select!r}")
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ValueError(f"Tap.layout must be one of {', '.join(map(repr, LAYOUTS))} or None, got {self.layout!r}")
        if not _is_int(self.prefix_tokens) or self.prefix_tokens < 0:
            raise ValueError(f"Tap.prefix_tokens must be an int >= 0, got {self.prefix_tokens!r}")
        if not isinstance(self.tokens_to_map, bool):
            raise TypeError(f"Tap.tokens_to_map must be a bool, got {self.tokens_to_map!r}")
        if self.token_hw is not None:
            hw = self.token_hw
            if not (isinstance(hw, tuple) and len(hw) == 2 and all(_is_int(v) and v > 0 for v in hw)):
                raise ValueError(f"Tap.token_hw must be a tuple of two positive ints (H, W), got {hw!r}")
            if not self.tokens_to_map:
                raise ValueError("Tap.token_hw only applies with tokens_to_map=True")
        if self.channels_last and (self.prefix_tokens or self.token_hw is not None):
            raise ValueError("Tap.channels_last is for (B, H, W, C) maps; prefix_tokens/token_hw are for token sequences")
        if self.channels_last and self.layout not in (None, "map"):
            raise ValueError(f"Tap.channels_last is for (B, H, W, C) maps, not layout={self.layout!r}; drop one of them")
        if self.names_tokens and self.layout not in (None, "tokens"):
            raise ValueError(
                f"Tap.prefix_tokens/token_hw/tokens_to_map are for layout='tokens', not layout={self.layout!r}; "
                "drop them or set layout='tokens'"
            )

    @property
    def names_tokens(self) -> bool:
        """True when a token field is set: the tap itself says its capture is (B, N, C) tokens."""
        return bool(self.prefix_tokens) or self.token_hw is not None or not self.tokens_to_map

    @classmethod
    def parse(cls, spec: str | Tap | Mapping[str, Any]) -> Tap:
        """Build a Tap from a "path" / "path[0]" / "path['key']" string, a mapping of fields, or a Tap."""
        if isinstance(spec, Tap):
            return spec
        if isinstance(spec, str):
            match = _SPEC_RE.fullmatch(spec)
            if match is None:
                raise ValueError(
                    f"cannot parse tap spec {spec!r}; use 'path', 'path[0]' (index), "
                    "\"path['key']\" or 'path[key]' (dict key)"
                )
            raw = match.group("select")
            return cls(match.group("path"), select=None if raw is None else _parse_select(raw))
        if isinstance(spec, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(spec) - known)
            if unknown:
                raise ValueError(f"unknown Tap field(s) {unknown}; valid fields: {sorted(known)}")
            if "path" not in spec:
                raise ValueError(f"a Tap mapping needs a 'path' field, got {dict(spec)!r}")
            kwargs = dict(spec)
            if isinstance(kwargs.get("token_hw"), list):  # YAML/JSON give lists
                kwargs["token_hw"] = tuple(kwargs["token_hw"])
            return cls(**kwargs)
        raise TypeError(f"a tap spec must be a str, a Tap or a mapping, got {type(spec).__name__}")


def _is_int(value: object) -> bool:
    """True for ints but not bools (a bool index or count is always a mistake here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_select(raw: str) -> int | str:
    """Turn the text between brackets into an int index or a str key."""
    if _INT_RE.fullmatch(raw):
        return int(raw)
    quoted = _QUOTED_RE.fullmatch(raw)
    return quoted.group("key") if quoted else raw


def _spec_string(path: str, select: int | str) -> str:
    """The string syntax for (path, select), used in error messages so users can copy it."""
    return f"{path}[{select}]" if isinstance(select, int) else f"{path}[{select!r}]"


def _where(name: str, tap: Tap) -> str:
    """Prefix for messages: which tap, which module and what it captures."""
    path = f"path {tap.path!r}" if tap.path else "path '' = the model"
    return f"tap {name!r} ({path}, {tap.capture})"


def _select(name: str, tap: Tap, value: Any) -> Any:
    """Pick the tensor the tap asks for out of a module's output or input."""
    where = _where(name, tap)
    if tap.select is None:
        if isinstance(value, Mapping):
            keys = list(value.keys())
            example = keys[0] if keys else "key"
            raise ValueError(
                f"{where} produced a {type(value).__name__} with keys {keys}; choose one with select, e.g. "
                f"Tap({tap.path!r}, select={example!r}) or the string {_spec_string(tap.path, example)!r}"
            )
        if isinstance(value, (tuple, list)):
            raise ValueError(
                f"{where} produced a {type(value).__name__} of {len(value)} elements (indices "
                f"{list(range(len(value)))}); choose one with select, e.g. Tap({tap.path!r}, select=0) "
                f"or the string {_spec_string(tap.path, 0)!r}"
            )
        chosen, what = value, "it"
    elif isinstance(value, Mapping):
        if tap.select not in value:
            keys = list(value.keys())
            quote = str(tap.select) in keys and not isinstance(tap.select, str)
            hint = f" (a digit key is a string: {_spec_string(tap.path, str(tap.select))!r})" if quote else ""
            raise ValueError(f"{where}: key {tap.select!r} is not in the output; valid keys: {keys}{hint}")
        chosen, what = value[tap.select], f"key {tap.select!r}"
    elif isinstance(value, (tuple, list)):
        if not isinstance(tap.select, int) or not -len(value) <= tap.select < len(value):
            raise ValueError(
                f"{where}: select={tap.select!r} does not fit a {type(value).__name__} of {len(value)} "
                f"elements; valid indices: {list(range(len(value)))} (or negative)"
            )
        chosen, what = value[tap.select], f"element {tap.select}"
    else:
        raise ValueError(
            f"{where}: select={tap.select!r} was given but the capture is a single "
            f"{type(value).__name__}, not a tuple/list/dict; drop select"
        )
    if not isinstance(chosen, torch.Tensor):
        raise TypeError(f"{where}: {what} is a {type(chosen).__name__}, not a tensor")
    return chosen


# Modules that PyTorch defines on (B, C, L) at rank 3 (C at dim 1), with the attribute holding C
# (None: no width to check). Their input and output are both (B, C, L).
_SEQUENCE_MODULES: tuple[tuple[type[nn.Module], str | None, str | None], ...] = (
    (nn.Conv1d, "in_channels", "out_channels"),
    (nn.ConvTranspose1d, "in_channels", "out_channels"),
    (nn.BatchNorm1d, "num_features", "num_features"),
    (nn.SyncBatchNorm, "num_features", "num_features"),
    (nn.InstanceNorm1d, "num_features", "num_features"),
    (nn.GroupNorm, "num_channels", "num_channels"),
    (nn.MaxPool1d, None, None),
    (nn.AvgPool1d, None, None),
    (nn.AdaptiveAvgPool1d, None, None),
    (nn.AdaptiveMaxPool1d, None, None),
    (nn.LPPool1d, None, None),
)
# Element-wise modules: the output has the input's shape and layout, so a Sequential's rule looks past them.
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Dropout, nn.AlphaDropout, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
)


@dataclass(frozen=True)
class _SequenceRule:
    """A module type makes a rank-3 capture certainly (B, C, L), with this many channels (None: any)."""

    channels: int | None


def _runs_own_forward(module: nn.Module, cls: type[nn.Module]) -> bool:
    """An instance of cls whose forward is PyTorch's own (a subclass overriding it may transpose)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def _sequence_rule(module: nn.Module, capture: str) -> _SequenceRule | None:
    """The certain rule for a rank-3 capture of this module (see the module docstring), or None."""
    if _runs_own_forward(module, nn.Sequential):
        children = list(module.named_children())
        if capture == "output":
            children.reverse()  # the output is the last child's output; the input is the first child's input
        for _, child in children:
            if any(_runs_own_forward(child, cls) for cls in _ELEMENTWISE_MODULES):
                continue
            return _sequence_rule(child, capture)
        return None
    for cls, in_width, out_width in _SEQUENCE_MODULES:
        if _runs_own_forward(module, cls):
            width = in_width if capture == "input" else out_width
            channels = getattr(module, width) if width else None
            return _SequenceRule(channels if _is_int(channels) else None)
    return None


def _resolve(where: str, tap: Tap, t: torch.Tensor, rule: _SequenceRule | None, producer: str) -> str:
    """The capture's layout: the tap's word, else the rank where it is certain, else a module-type rule."""
    if tap.layout is not None:
        return tap.layout
    if tap.channels_last:
        return "map"
    if tap.names_tokens:
        return "tokens"
    if t.dim() == 2:
        return "vector"
    if t.dim() == 4:
        return "map"
    shape = tuple(t.shape)
    if t.dim() != 3:
        raise ValueError(
            f"{where}: expected a (B, K) vector, a rank-3 sequence or token capture or a (B, C, H, W) map, "
            f"got shape {shape}; set layout='raw' to take it as is"
        )
    if rule is not None and rule.channels in (None, shape[1]):
        return "sequence"
    raise ValueError(
        f"{where}: a rank-3 capture of shape {shape} may be (B, N, C) tokens or a (B, C, L) sequence and "
        f"{producer} does not say which; set layout='tokens' for (B, N, C) or layout='sequence' for (B, C, L)"
    )


def _arrange(
    where: str, tap: Tap, t: torch.Tensor, rule: _SequenceRule | None, producer: str
) -> tuple[torch.Tensor, str]:
    """The capture channel-first, with what it was handed out as: "map", "vector", "sequence" or "raw"."""
    layout = _resolve(where, tap, t, rule, producer)
    shape = tuple(t.shape)
    if layout == "raw":
        return t, "raw"
    if layout == "map":
        if t.dim() != 4:
            said = "channels_last expects a (B, H, W, C)" if tap.channels_last else "layout='map' expects a (B, C, H, W)"
            raise ValueError(f"{where}: {said} map, got shape {shape}")
        return (t.permute(0, 3, 1, 2) if tap.channels_last else t), "map"
    expected_rank = {"vector": 2, "sequence": 3, "tokens": 3}[layout]
    if t.dim() != expected_rank:
        what = {"vector": "(B, K) vector", "sequence": "(B, C, L) sequence", "tokens": "(B, N, C) token sequence"}
        said = "prefix_tokens/token_hw/tokens_to_map say" if tap.layout is None else f"layout={layout!r} expects"
        raise ValueError(f"{where}: {said} a {what[layout]}, got shape {shape}")
    if layout != "tokens":
        return t, layout
    if tap.prefix_tokens >= t.shape[1]:
        raise ValueError(f"{where}: prefix_tokens={tap.prefix_tokens} leaves no tokens of {t.shape[1]}")
    tokens = t[:, tap.prefix_tokens :]
    if not tap.tokens_to_map:
        return tokens.permute(0, 2, 1).contiguous(), "sequence"
    return _fold(where, tap, tokens), "map"


def _fold(where: str, tap: Tap, tokens: torch.Tensor) -> torch.Tensor:
    """Fold (B, N, C) tokens row-major into a contiguous (B, C, H, W) map on token_hw or a square grid."""
    b, n, c = tokens.shape
    if tap.token_hw is not None:
        h, w = tap.token_hw
        if h * w != n:
            raise ValueError(
                f"{where}: token_hw={tap.token_hw} needs {h * w} tokens but there are {n} "
                f"(after dropping prefix_tokens={tap.prefix_tokens})"
            )
    else:
        h = math.isqrt(n)
        if h * h != n:
            drops = range(1, min(_MAX_PREFIX_HINT, n - 1) + 1)
            hint = next((k for k in drops if math.isqrt(n - k) ** 2 == n - k), None)
            extra = (
                f", or prefix_tokens={tap.prefix_tokens + hint} if the sequence starts with "
                "class/register tokens"
                if hint
                else ""
            )
            raise ValueError(
                f"{where}: N={n} tokens (after dropping prefix_tokens={tap.prefix_tokens}) is not a square "
                f"grid; set token_hw=(H, W){extra}, or tokens_to_map=False for a (B, C, N) sequence"
            )
        w = h
    return tokens.permute(0, 2, 1).reshape(b, c, h, w).contiguous()


@dataclass(frozen=True)
class _Failure:
    """A capture that could not be processed: exception type and message, raised on access."""

    # Only the message is kept, not the exception, whose traceback would pin the forward's tensors.
    kind: type[Exception]
    message: str


class WeakHook:
    """A module hook that calls one method of its owner (a FeatureTaps) through a weak reference; copies are
    inert."""

    __slots__ = ("_owner", "_method", "_name")

    def __init__(self, owner: Any, method: str, name: str) -> None:
        """Remember the owner weakly so a forgotten owner can be collected (and unhook itself)."""
        self._owner = None if owner is None else weakref.ref(owner)
        self._method = method
        self._name = name

    def __call__(self, module: nn.Module, *hook_args: Any) -> None:
        """Forward the hook call to the owner, if it still exists; never changes the module's data."""
        owner = None if self._owner is None else self._owner()
        if owner is not None:
            getattr(owner, self._method)(self._name, *hook_args)

    def __reduce__(self) -> tuple[type, tuple[None, str, str]]:
        """Deepcopy/pickle a hooked model into inert hooks rather than ones feeding this owner."""
        return (WeakHook, (None, self._method, self._name))


def remove_handles(handles: list[RemovableHandle]) -> None:
    """Remove every hook handle (also called by the finalizer when their owner is collected)."""
    for handle in handles:
        handle.remove()
    handles.clear()


def _unknown_path_message(model: nn.Module, what: str, path: str) -> str:
    """Explain a bad path: the closest valid paths and the children of the deepest existing prefix."""
    paths = [p for p, _ in model.named_modules(remove_duplicate=False) if p]
    close = difflib.get_close_matches(path, paths, n=3)
    module, prefix = model, ""
    for part in path.split("."):
        child = dict(module.named_children()).get(part)
        if child is None:
            break
        module, prefix = child, f"{prefix}.{part}" if prefix else part
    children = ", ".join(repr(n) for n, _ in module.named_children())
    owner = f"children of {prefix!r}" if prefix else "children of the model (top level)"
    if not children:
        children = "(none; a tap captures a module's input or output, not a parameter)"
    return (
        f"{what}: unknown module path {path!r} in {type(model).__name__}; "
        f"closest paths: {', '.join(map(repr, close)) or '(none)'}; {owner}: {children}"
    )


def resolve_module(model: nn.Module, path: str, what: str) -> nn.Module:
    """The submodule at `path` ("" is the model); an unknown path gets the closest paths, as for taps.

    `what` names the thing that gave the path in the error, e.g. "option 'teacher_head'".
    """
    if not isinstance(path, str):
        raise TypeError(f"{what}: a module path is a str such as 'fc', got {type(path).__name__}")
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(_unknown_path_message(model, what, path)) from None


class FeatureTaps:
    """Named feature captures of a model, taken by forward hooks and refreshed on every forward.

    Besides the feature taps, `outputs` names modules whose latest output is kept exactly as produced, any
    object (`output(name)`): what methods' extra inputs read (FGD's boxes from a detector's transform); `what`
    names each in errors. One holder, one root hook: every forward first forgets the previous one's values, a
    module that did not run raises instead of handing out a stale value, and a copied model gets inert hooks.
    """

    def __init__(self, model: nn.Module, taps: Mapping[str, Tap | str | Mapping[str, Any]],
                 outputs: Mapping[str, str] | None = None, what: Mapping[str, str] | None = None) -> None:
        """Validate every tap and output path against the model now, then hook the modules (and the root, for
        staleness; a holder of nothing hooks nothing)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"FeatureTaps needs an nn.Module, got {type(model).__name__}")
        parsed = {name: Tap.parse(spec) for name, spec in taps.items()}
        modules: dict[str, nn.Module] = {}
        for name, tap in parsed.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"tap names must be non-empty strings, got {name!r}")
            try:
                modules[name] = model.get_submodule(tap.path)
            except AttributeError:
                raise ValueError(_unknown_path_message(model, f"tap {name!r}", tap.path)) from None
        self._taps = parsed
        # What decides a rank-3 capture without a layout: a module-type rule for its output or input.
        self._rules = {name: _sequence_rule(modules[name], tap.capture) for name, tap in parsed.items()}
        self._producers = {name: f"{type(modules[name]).__name__} {tap.path!r}" for name, tap in parsed.items()}
        self._captures: dict[str, torch.Tensor | _Failure] = {}
        self._layouts: dict[str, str] = {}
        self._forwards = 0
        outputs = dict(outputs or {})
        self._what = {name: (what or {}).get(name, f"output {name!r}") for name in outputs}
        output_modules = {name: resolve_module(model, path, self._what[name]) for name, path in outputs.items()}
        self._output_paths, self._outputs = outputs, {}
        hooked = bool(parsed) or bool(outputs)
        handles = [model.register_forward_pre_hook(WeakHook(self, "_begin_forward", ""), prepend=True)] if hooked else []
        handles += [m.register_forward_hook(WeakHook(self, "_keep_output", name)) for name, m in output_modules.items()]
        for name, tap in parsed.items():
            if tap.capture == "input":
                handles.append(modules[name].register_forward_pre_hook(WeakHook(self, "_capture_input", name)))
            else:
                handles.append(modules[name].register_forward_hook(WeakHook(self, "_capture_output", name)))
        self._finalizer = weakref.finalize(self, remove_handles, handles)
        self._closed = False  # read in forwards instead of _finalizer.alive: torch.compile would guard the
        # finalizer's class-wide registry, which any finalize object anywhere changes (a guard failure)

    def _begin_forward(self, _name: str, _args: tuple[Any, ...]) -> None:
        """Root pre-hook: a new forward starts, so every earlier capture is stale; drop them."""
        self._forwards += 1
        self._captures.clear()
        self._layouts.clear()
        self._outputs.clear()

    def _keep_output(self, name: str, _args: tuple[Any, ...], output: Any) -> None:
        """Forward hook of an output module: keep what it returned (the last run wins)."""
        self._outputs[name] = output

    def _capture_input(self, name: str, args: tuple[Any, ...]) -> None:
        """Pre-hook: keep the module's first positional input."""
        if not args:
            tap = self._taps[name]
            self._captures[name] = _Failure(
                ValueError, f"{_where(name, tap)}: the module was called without positional arguments"
            )
            return
        self._store(name, args[0])

    def _capture_output(self, name: str, _args: tuple[Any, ...], output: Any) -> None:
        """Forward hook: keep the module's output."""
        self._store(name, output)

    def _store(self, name: str, value: Any) -> None:
        """Process a capture now (so only the selected tensor is kept); defer errors to access time."""
        tap = self._taps[name]
        self._layouts.pop(name, None)
        try:
            where = _where(name, tap)
            tensor, layout = _arrange(where, tap, _select(name, tap, value), self._rules[name], self._producers[name])
        except (ValueError, TypeError) as exc:
            self._captures[name] = _Failure(type(exc), str(exc))
        else:
            self._captures[name], self._layouts[name] = tensor, layout

    @property
    def taps(self) -> Mapping[str, Tap]:
        """The parsed taps by name (read-only)."""
        return MappingProxyType(self._taps)

    @property
    def forwards(self) -> int:
        """How many forwards of the model the taps have seen (a front end counts the calls it did not make)."""
        return self._forwards

    def names(self) -> list[str]:
        """Tap names in the order given."""
        return list(self._taps)

    def __getitem__(self, name: str) -> torch.Tensor:
        """The processed capture of tap ``name`` from the model's latest forward."""
        if name not in self._taps:
            raise KeyError(f"no tap named {name!r}; taps: {self.names()}")
        tap = self._taps[name]
        if self._closed:
            raise RuntimeError(f"{_where(name, tap)}: this FeatureTaps is closed")
        if name not in self._captures:
            why = (
                "the model has not run a forward since the taps were attached"
                if self._forwards == 0
                else "its module did not run (skipped branch?), and a stale capture is never reused"
            )
            raise RuntimeError(
                f"tap {name!r} (path {tap.path!r}) was not executed in the latest forward of the model: {why}"
            )
        value = self._captures[name]
        if isinstance(value, _Failure):
            raise value.kind(value.message)
        return value

    def output(self, name: str) -> Any:
        """What output ``name``'s module returned in the model's latest forward, as produced."""
        if name not in self._output_paths:
            raise KeyError(f"no module output named {name!r}; outputs: {list(self._output_paths)}")
        if name not in self._outputs:
            why = ("the model has not run a forward since it was hooked" if self._forwards == 0
                   else "the module did not run in the model's latest forward, and a stale output is never reused")
            raise RuntimeError(f"{self._what[name]} (module {self._output_paths[name]!r}): {why}")
        return self._outputs[name]

    def replay(self, calls: Mapping[str, tuple[tuple[Any, ...], Any]]) -> dict[str, ProbedFeature]:
        """Each tap's processed shape and layout from one recorded forward (module path -> (args, output) of its
        last call), processed as the hooks process a live one: a probe's record sizes the methods without a
        forward of its own. The captures are dropped again afterwards."""
        self._begin_forward("", ())
        try:
            for name, tap in self._taps.items():
                if tap.path not in calls:
                    continue  # reading it raises: the module did not run
                args, output = calls[tap.path]
                if tap.capture == "input":
                    self._capture_input(name, args)
                else:
                    self._capture_output(name, args, output)
            return {name: ProbedFeature(feature.shape if isinstance(feature, torch.Tensor) else torch.Size(),
                                        self.layout(name)) for name, feature in self.items()}
        finally:
            self._forwards -= 1  # a replay is not a forward of the model
            self._captures.clear()
            self._layouts.clear()
            self._outputs.clear()

    def layout(self, name: str) -> str:
        """What tap ``name``'s latest capture was handed out as: "map", "vector", "sequence" or "raw"."""
        self[name]  # the same errors as the capture itself (unknown, stale, unprocessable)
        return self._layouts[name]

    def layouts(self) -> dict[str, str]:
        """Every tap's handed-out layout in the latest forward, in tap order (see :meth:`layout`)."""
        return {name: self.layout(name) for name in self._taps}

    def items(self) -> list[tuple[str, torch.Tensor]]:
        """(name, capture) pairs of the latest forward, in tap order."""
        return [(name, self[name]) for name in self._taps]

    def close(self) -> None:
        """Remove all hooks and drop captures; safe to call more than once."""
        self._finalizer()
        self._closed = True
        self._captures.clear()
        self._layouts.clear()
        self._outputs.clear()

    def __enter__(self) -> FeatureTaps:
        """Use as a context manager that closes on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close on leaving the ``with`` block."""
        self.close()


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """The one way every part of diffkd (engine, evaluation, Distiller, probes) calls a model on inputs:
    a tuple spreads as positional arguments (a detector's (images, targets)), a mapping as keywords (a
    tokenizer's output), anything else is the one argument."""
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def _random_input(model: nn.Module, shape: Iterable[int]) -> torch.Tensor:
    """A seeded random input on the model's first parameter's device/dtype; global RNG is left alone."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    return torch.randn(tuple(shape), generator=generator).to(device=device, dtype=dtype)


class ProbedFeature(NamedTuple):
    """One tap's processed shape (batch first) and what it is handed out as ("map", "vector", ...)."""

    shape: torch.Size
    layout: str


def probe_features(
    model: nn.Module,
    taps: Mapping[str, Tap | str | Mapping[str, Any]],
    example_input: Any = None,
    *,
    input_shape: tuple[int, ...] | None = None,
    batch_size: int = 2,
) -> dict[str, ProbedFeature]:
    """Each tap's processed shape and layout from one no-grad eval forward, to size projectors before training."""
    # example_input: a tuple spreads as positional arguments, a mapping as keywords, else one argument.
    # input_shape excludes the batch dimension, e.g. (3, 224, 224): a seeded random batch of batch_size.
    # Each module's own training flag is restored (not model.train(flag)), so mixed train/eval models
    # (frozen BN, a pinned teacher) come back exactly as they were; eval keeps BN running stats fixed.
    if (example_input is None) == (input_shape is None):
        raise ValueError("probing taps needs exactly one of example_input or input_shape")
    if input_shape is not None:
        example_input = _random_input(model, (batch_size, *input_shape))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with FeatureTaps(model, taps) as feature_taps, torch.no_grad():
            call_model(model, example_input)
            return {name: ProbedFeature(feature.shape if isinstance(feature, torch.Tensor) else torch.Size(), feature_taps.layout(name))
                    for name, feature in feature_taps.items()}
    finally:
        for module, training in modes:
            module.training = training


def probe_shapes(
    model: nn.Module,
    taps: Mapping[str, Tap | str | Mapping[str, Any]],
    example_input: Any = None,
    *,
    input_shape: tuple[int, ...] | None = None,
    batch_size: int = 2,
) -> dict[str, torch.Size]:
    """Each tap's processed shape from one no-grad eval forward (:func:`probe_features` without layouts)."""
    probed = probe_features(model, taps, example_input, input_shape=input_shape, batch_size=batch_size)
    return {name: feature.shape for name, feature in probed.items()}
