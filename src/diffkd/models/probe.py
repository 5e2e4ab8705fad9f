"""Find any model's "@feature" and "@logits" taps by watching one forward, on the meta device if it allows.

The probe records every torch function call and every module's last output and input, then reads
the graph backwards from the model's output:

* @logits is the module producing the output logits (a tensor, `ModelOutput.logits`, or the "logits"
  / "out" entry of a dict), the outermost one when several hand out the same tensor; a dense output
  made by upsampling a module's map is traced back through the upsampling. Without such a module the
  model's own output ("") is the tap.
* @feature, for a model whose logits are a vector: the tensor that is globally pooled on the way to
  the logits (by a pooling op or a mean/max over positions, or a class token picked out of a token
  sequence), found behind the ops that only move or slice it. Its layout follows from the pooled
  width (and, where the shape fits two, from the axis the pooling op keeps): a (B, C, H, W) map, a
  (B, H, W, C) map, a (B, C, L) sequence or (B, N, C) tokens, whose leading class/distillation/
  register tokens are dropped: as many as the model's `num_prefix_tokens` (timm models tell), else
  the tokens concatenated in front of the patch tokens, else what the head slices off or picks out.
  For dense logits (segmentation): the map the logits module reads.

Where the graph does not settle it (two maps pooled in parallel, no pooling, a width that fits two
layouts) the probe raises a one-line `ProbeError` listing the candidates and their shapes.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from ..taps import call_model

__all__ = ["TAP_ALIASES", "Probe", "ProbeError", "Taps", "find_taps", "probe_model", "resolve_alias", "resolve_aliases"]

TAP_ALIASES = ("feature", "logits")  # "@feature" / "@logits": a model's pooled feature and its logits

_PROBE_BATCH = 5  # not 2 or 3, which also count views, branches or q/k/v and would pass for a batch
# Ops that only move, slice or retype a tensor: the pooled map is looked for behind them.
_LAYOUT_OPS = frozenset({
    "__getitem__", "transpose", "permute", "contiguous", "flatten", "view", "reshape", "float", "to", "type",
    "clone", "dropout", "squeeze", "unsqueeze", "movedim", "swapaxes", "half", "bfloat16",
})  # fmt: skip
_RESAMPLE_OPS = frozenset({"interpolate", "upsample", "upsample_bilinear", "upsample_nearest"})
_POOL_OPS = frozenset({
    *(f"{kind}{d}d" for kind in ("adaptive_avg_pool", "adaptive_max_pool", "avg_pool", "max_pool", "lp_pool")
      for d in (1, 2, 3)),
    "mean", "sum", "amax", "max", "nanmean", "logsumexp",
})  # fmt: skip
_JOIN_OPS = frozenset({"cat", "concat", "concatenate"})
_OUTPUT_KEYS = ("logits", "out")  # where a mapping output keeps its logits (transformers, torchvision segmentation)


@dataclass(frozen=True)
class Taps:
    """A model's "@feature" and "@logits" taps: module paths (as in `named_modules()`) or mappings of Tap fields.

    feature: the last feature map (or sequence, or tokens) before global pooling, e.g. "layer4" or
    {"path": "norm", "layout": "tokens", "prefix_tokens": 1}; logits: the classifier's output.
    """

    feature: str | dict[str, Any]
    logits: str | dict[str, Any]


class ProbeError(ValueError):
    """The probe cannot tell where a model's feature or logits are; the message lists what it found."""


@dataclass(eq=False)
class _Call:
    """One torch function call of the forward: its name, tensor arguments, raw arguments and outputs."""

    name: str
    inputs: list[Tensor]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[Tensor]
    index: int  # position in the forward


def _tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor in a nested tuple/list/dict (a ModelOutput is a dict)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors(item)


def _entries(value: Any) -> Iterator[tuple[int | str, Tensor]]:
    """(select, tensor) for the tensors directly inside a tuple/list/dict output."""
    if isinstance(value, (tuple, list)):
        yield from ((i, v) for i, v in enumerate(value) if isinstance(v, Tensor))
    elif isinstance(value, Mapping):
        yield from ((k, v) for k, v in value.items() if isinstance(k, str) and isinstance(v, Tensor))


class _Recorder(TorchFunctionMode):
    """Records every torch function call; keeps its tensors alive so ids stay unique while probing."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[_Call] = []
        self.producers: dict[int, list[_Call]] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outputs = list(_tensors(out))
        if outputs:
            inputs = [*_tensors(args), *_tensors(kwargs or {})]
            call = _Call(getattr(func, "__name__", str(func)), inputs, args, dict(kwargs or {}), outputs, len(self.calls))
            self.calls.append(call)
            for tensor in outputs:
                self.producers.setdefault(id(tensor), []).append(call)
        return out


@dataclass(frozen=True)
class _Site:
    """Where a tensor can be tapped: a module's output (maybe one element of it) or its first input."""

    path: str
    capture: str = "output"
    select: int | str | None = None
    order: int = 0  # completion order of the module call (earlier = produced first)

    @property
    def depth(self) -> int:
        return self.path.count(".") + 1 if self.path else 0

    def spec(self, **fields: Any) -> str | dict[str, Any]:
        """The tap spec: a plain path when nothing else is needed, else a mapping of Tap fields."""
        extra = {k: v for k, v in (("capture", self.capture), ("select", self.select)) if v not in ("output", None)}
        extra.update(fields)
        return {"path": self.path, **extra} if extra else self.path

    def describe(self) -> str:
        if self.capture == "input":
            return f"input of {self.path!r}"
        return f"{self.path!r}" + (f"[{self.select!r}]" if self.select is not None else "")


@dataclass
class _Forward:
    """What one watched forward left: calls, module sites by tensor id, the output, and the leaves."""

    model: nn.Module
    recorder: _Recorder
    output: Any
    batch: int
    inputs: set[int]
    leaves: set[int]  # parameters and buffers
    outputs: dict[int, list[_Site]] = field(default_factory=dict)
    containers: dict[int, list[_Site]] = field(default_factory=dict)
    input_sites: dict[int, list[_Site]] = field(default_factory=dict)
    first_inputs: dict[str, Tensor] = field(default_factory=dict)  # module path -> first positional input
    module_outputs: list[Any] = field(default_factory=list)  # every module's last output
    calls: dict[str, tuple[tuple[Any, ...], Any]] = field(default_factory=dict)  # path -> (args, output), last call
    keep: list[Any] = field(default_factory=list)  # holds the example and outputs, so tensor ids stay unique


def _example(example_input: Any, input_shape: tuple[int, ...] | None, device: torch.device, meta: bool,
             batch: int = _PROBE_BATCH) -> Any:
    """The probe's input: the example moved to meta (same shapes), or a random batch of input_shape."""
    if input_shape is not None:
        shape = (batch, *input_shape)
        return torch.zeros(shape, device="meta") if meta else torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    if not meta:
        return example_input

    def to_meta(value: Any) -> Any:
        if isinstance(value, Tensor):
            return torch.empty_like(value, device="meta")
        if isinstance(value, tuple):
            return tuple(to_meta(v) for v in value)
        if isinstance(value, list):
            return [to_meta(v) for v in value]
        if isinstance(value, Mapping):
            return {k: to_meta(v) for k, v in value.items()}
        return value

    return to_meta(example_input)


def _watch(model: nn.Module, example: Any, state: dict[str, Tensor] | None, record_ops: bool = True) -> _Forward:
    """Run one no-grad eval forward with every module hooked and (for the alias search) every torch call recorded."""
    recorder = _Recorder() if record_ops else contextlib.nullcontext(_Recorder())
    last: dict[str, tuple[int, tuple[Any, ...], Any]] = {}
    counter = iter(range(1 << 62))
    names = {id(module): name for name, module in model.named_modules()}

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        last[names[id(module)]] = (next(counter), args, output)

    handles = [module.register_forward_hook(hook) for module in model.modules()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), recorder as active:
            output = call_model(model, example) if state is None else _functional(model, state, example)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    leaves = {id(t) for t in (state.values() if state is not None else [*model.parameters(), *model.buffers()])}
    forward = _Forward(model, active, output, _batch_of(example), {id(t) for t in _tensors(example)}, leaves)
    forward.keep.extend([example, output, last])
    for path, (order, args, out) in last.items():
        forward.module_outputs.append(out)
        forward.calls[path] = (args, out)
        if isinstance(out, Tensor):
            forward.outputs.setdefault(id(out), []).append(_Site(path, order=order))
        for select, tensor in _entries(out):
            forward.containers.setdefault(id(tensor), []).append(_Site(path, select=select, order=order))
        if args and isinstance(args[0], Tensor):
            forward.first_inputs[path] = args[0]
            forward.input_sites.setdefault(id(args[0]), []).append(_Site(path, "input", order=order))
    return forward


def _functional(model: nn.Module, state: dict[str, Tensor], example: Any) -> Any:
    """The model's forward with its parameters and buffers swapped for `state` (meta tensors)."""
    if isinstance(example, tuple):
        return functional_call(model, state, example, strict=False)
    if isinstance(example, Mapping):
        return functional_call(model, state, (), dict(example), strict=False)
    return functional_call(model, state, (example,), strict=False)


def _batch_of(example: Any) -> int:
    """The batch size: the first dimension of the first tensor in the input."""
    first = next(_tensors(example), None)
    if first is None or first.dim() == 0:
        raise ProbeError("probing a model needs an input with at least one tensor that has a batch dimension")
    return first.shape[0]


@dataclass
class Probe:
    """The taps of one model found from one watched forward; reading `feature` / `logits` raises when unsure.

    It reads like a `Taps` (attributes feature and logits), but each is found only when read, so a
    model without a pooled feature still gives its logits.
    """

    forward: _Forward
    device: str  # "meta" or the device of the real forward, for messages

    @property
    def calls(self) -> dict[str, tuple[tuple[Any, ...], Any]]:
        """Every module's last call in the watched forward: path -> (positional args, output)."""
        return self.forward.calls

    # ------------------------------------------------------------------ logits
    def logits_tensor(self) -> Tensor:
        """The logits the model outputs: a tensor, or the logits/out entry of a mapping or ModelOutput."""
        output = self.forward.output
        if isinstance(output, Tensor):
            return output
        if isinstance(output, Mapping):
            for key in _OUTPUT_KEYS:
                if isinstance(output.get(key), Tensor):
                    return output[key]
        keys = list(output.keys()) if isinstance(output, Mapping) else None
        what = f"a {type(output).__name__}" + (f" with keys {keys}" if keys is not None else "")
        raise ProbeError(
            f"@logits: {self._name()} returns {what}, not a logits tensor (nor a mapping with 'logits' or 'out'); "
            "name the logits tap explicitly (a module path)"
        )

    @functools.cached_property
    def logits(self) -> str | dict[str, Any]:
        """The @logits tap spec: the module producing the output logits, else the model's own output."""
        logits = self.logits_tensor()
        site = self._head_site(self._before_upsampling(logits))
        if site is not None:
            return site.spec()
        output = self.forward.output
        key = next((k for k in _OUTPUT_KEYS if isinstance(output, Mapping) and output.get(k) is logits), None)
        return {"path": "", "select": key} if key is not None else ""

    def _before_upsampling(self, tensor: Tensor) -> Tensor:
        """A tensor no module hands out, traced back through functional upsampling to a module's map."""
        while not self._handed_out(tensor):
            upsampled = next((c for c in self._producers(tensor) if c.name in _RESAMPLE_OPS and c.inputs), None)
            if upsampled is None:
                return tensor
            tensor = upsampled.inputs[0]
        return tensor

    def _head_site(self, tensor: Tensor) -> _Site | None:
        """The outermost module handing out `tensor` that is not a wrapper of the whole model (reads the input)."""
        sites = sorted(self.forward.outputs.get(id(tensor), []) or self.forward.containers.get(id(tensor), []),
                       key=lambda s: (s.depth, s.order))
        sites = [s for s in sites if s.path]
        for site in sites:
            read = self._first_input(site.path)
            if read is None or id(read) not in self.forward.inputs:
                return site
        return sites[-1] if sites else None

    def _first_input(self, path: str) -> Tensor | None:
        return self.forward.first_inputs.get(path)

    # ------------------------------------------------------------------ feature
    @functools.cached_property
    def feature(self) -> str | dict[str, Any]:
        """The @feature tap spec: the globally pooled map/sequence/tokens before the logits (see the module doc)."""
        logits = self.logits_tensor()
        if self._spatial(logits):
            return self._dense_feature(logits)
        pools = self._pools(logits)
        if not pools:
            raise ProbeError(
                f"@feature: no feature map or sequence of {self._name()} reaches its logits {self._shape(logits)} "
                f"(no global pooling found; the last maps: {self._last_maps()}); name the feature tap explicitly"
            )
        groups: dict[int, list[_Pool]] = {}
        for pool in pools:
            groups.setdefault(id(pool.source), []).append(pool)
        if len(groups) > 1:
            ordered = sorted(groups.values(), key=lambda g: self._made_at(g[0].source))
            listed = ", ".join(self._candidate(group[0].source) for group in ordered)
            raise ProbeError(
                f"@feature: {len(groups)} tensors of {self._name()} are pooled into its logits, so which is the "
                f"feature is not certain: {listed}; name one as the tap"
            )
        group = next(iter(groups.values()))
        return self._pooled_spec(group)

    def _dense_feature(self, logits: Tensor) -> str | dict[str, Any]:
        """Dense logits (a map per pixel): the feature is the map the logits module reads."""
        tensor = self._before_upsampling(logits)
        site = self._head_site(tensor)
        read = self._first_input(site.path) if site is not None else None
        if read is None or not self._spatial(read):
            raise ProbeError(
                f"@feature: {self._name()} outputs dense logits {self._shape(logits)} but no module producing them "
                "reads a feature map; name the feature tap explicitly (a module path)"
            )
        return self._site_of(read).spec()

    def _pools(self, logits: Tensor) -> list[_Pool]:
        """Every call on the way to the logits that turns a map, sequence or tokens into a vector: one
        that reads more than one position (pooling, flattening, picking a token), or a pooling op
        (which also pools a map that has shrunk to 1x1 at a small input size)."""
        found: list[_Pool] = []
        seen: set[int] = {id(logits)}
        pooled: set[tuple[int, int]] = set()
        todo = [logits]
        while todo:
            tensor = todo.pop()
            for call in self._producers(tensor):
                for source in call.inputs:
                    if id(source) in self.forward.leaves or not self._batched(source):
                        continue
                    if self._spatial(source) or (source.dim() >= 3 and _pools_positions(call, source)):
                        if (id(call), id(source)) not in pooled:
                            pooled.add((id(call), id(source)))
                            found.append(self._pool(call, source, tensor))
                    elif id(source) not in seen:
                        seen.add(id(source))
                        todo.append(source)
        return found

    def _pool(self, call: _Call, source: Tensor, pooled: Tensor) -> _Pool:
        """Read one spatial -> vector call: the tapped tensor behind layout ops, prefix slices and token picks."""
        width = pooled.numel() // self.forward.batch
        token = _token_index(call, source) if call.name == "__getitem__" else None
        chain, tensor, sliced = [(source, 0)], source, 0
        while not self._handed_out(tensor):
            layout = next((c for c in self._producers(tensor) if c.name in _LAYOUT_OPS and c.inputs), None)
            start = _prefix_slice(layout, layout.inputs[0]) if layout is not None and layout.name == "__getitem__" else 0
            if layout is None or start is None:
                break
            tensor, sliced = layout.inputs[0], max(sliced, start)
            chain.append((tensor, sliced))
        # tap a module's output where the chain reaches one, else the first tensor a module reads
        tensor, sliced = next((link for link in chain if self._handed_out(link[0])),
                              next((link for link in chain if self._tappable(link[0])), chain[-1]))
        flattened = width == math.prod(source.shape[1:]) and width not in source.shape[1:]
        axis = _channel_axis(call, source) if tensor is source else None
        return _Pool(tensor, width, token, sliced, flattened, call.name, axis)

    def _pooled_spec(self, group: list[_Pool]) -> str | dict[str, Any]:
        """The tap spec of the one pooled tensor, with its layout (and prefix tokens) read from the pooling."""
        source = group[0].source
        shape = tuple(source.shape)
        if any(p.flattened for p in group):
            raise ProbeError(
                f"@feature: {self._name()} flattens {self._candidate(source)} into its classifier instead of pooling "
                "it globally, so there is no pooled feature; name the feature tap explicitly (a module path)"
            )
        if not self._tappable(source):
            raise ProbeError(
                f"@feature: the tensor {self._name()} pools, {self._shape(source)}, is made outside any module (a functional op) "
                "and no module reads it; name a module path as the feature tap"
            )
        site = self._site_of(source)
        widths = sorted({p.width for p in group})
        if len(widths) > 1:
            raise ProbeError(
                f"@feature: {self._name()} reduces {site.describe()} {self._shape(source)} to vectors of {widths} channels on the "
                "way to its logits, so which reduction is the global pooling is not certain; name the feature tap"
            )
        width = widths[0]
        tokens = any(p.token is not None for p in group)
        layouts = _layouts(shape, width, tokens)
        axes = {p.channel_axis for p in group}
        if len(layouts) > 1 and len(axes) == 1 and None not in axes:  # the pooling op says which axis is kept
            kept = axes.pop()
            layouts = [name for name in layouts if _CHANNEL_AXIS[len(shape)].get(name) == kept]
        if not layouts:
            raise ProbeError(
                f"@feature: {self._name()} turns {site.describe()} {self._shape(source)} into a vector of {width} by "
                f"{group[0].op}, not by global pooling; name the feature tap explicitly (a module path)"
            )
        if len(layouts) > 1:
            raise ProbeError(
                f"@feature: {site.describe()} of {self._name()} pools {self._shape(source)} to {width} channels, which fits "
                f"{' and '.join(layouts)}; name the tap with its layout, e.g. {{'path': {site.path!r}, 'layout': "
                "'tokens'} for (B, N, C) or 'sequence' for (B, C, L) (or channels_last: true for (B, H, W, C))"
            )
        layout = layouts[0]
        if layout == "map":
            return site.spec()
        if layout == "channels_last":
            return site.spec(channels_last=True)
        if layout == "sequence":
            return site.spec(layout="sequence")
        prefix = self._prefix_tokens(site, group)
        grid = self._grid(shape[1] - prefix)
        if grid is None:
            raise ProbeError(
                f"@feature: {site.describe()} of {self._name()} holds {shape[1]} tokens; after {prefix} class/register "
                f"token(s) the {shape[1] - prefix} left are no square grid and no patch grid of the forward; "
                "set prefix_tokens and token_hw in the tap"
            )
        fields: dict[str, Any] = {"layout": "tokens", **({"prefix_tokens": prefix} if prefix else {})}
        if grid[0] != grid[1]:
            fields["token_hw"] = grid
        return site.spec(**fields)

    def _prefix_tokens(self, site: _Site, group: list[_Pool]) -> int:
        """Leading class/register tokens: the model's `num_prefix_tokens`, else those joined before the patch
        tokens, else what the head slices off or picks out."""
        told = self._told_prefix(site.path)
        if told is not None:
            return told
        joined = self._joined_prefix(tuple(group[0].source.shape))
        if joined is not None:
            return joined
        sliced = max(p.sliced for p in group)
        picked = max((p.token + 1 for p in group if p.token is not None), default=0)
        return max(sliced, picked)

    def _told_prefix(self, path: str) -> int | None:
        """`num_prefix_tokens` of the nearest module at or above `path` that has one (timm's models do)."""
        parts = path.split(".") if path else []
        for end in range(len(parts), -1, -1):
            module = self.forward.model.get_submodule(".".join(parts[:end]))
            value = getattr(module, "num_prefix_tokens", None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    def _joined_prefix(self, shape: tuple[int, ...]) -> int | None:
        """Tokens concatenated in front of the patch tokens into a (B, N, C) sequence of this shape, if seen."""
        areas = {g[0] * g[1] for call in self.forward.recorder.calls for g in _grids(call, self.forward.batch)}
        for call in self.forward.recorder.calls:
            if call.name not in _JOIN_OPS or not call.outputs or tuple(call.outputs[0].shape) != shape:
                continue
            parts = call.args[0] if call.args and isinstance(call.args[0], (tuple, list)) else []
            dim = call.kwargs.get("dim", call.args[1] if len(call.args) > 1 else 0)
            if dim not in (1, -2) or not parts or not all(isinstance(p, Tensor) and p.dim() == 3 for p in parts):
                continue
            if parts[-1].shape[1] in areas:
                return shape[1] - parts[-1].shape[1]
        return None

    def _grid(self, tokens: int) -> tuple[int, int] | None:
        """The (H, W) grid of `tokens` patch tokens: the latest patch grid of the forward with that count, else square."""
        for call in reversed(self.forward.recorder.calls):
            for grid in _grids(call, self.forward.batch):
                if grid[0] * grid[1] == tokens:
                    return grid
        side = math.isqrt(tokens)
        return (side, side) if side * side == tokens and tokens > 0 else None

    # ------------------------------------------------------------------ helpers
    def _made_at(self, tensor: Tensor) -> int:
        """Position in the forward of the first call producing `tensor` (for listing candidates in order)."""
        calls = self._producers(tensor)
        return calls[0].index if calls else -1

    def _producers(self, tensor: Tensor) -> list[_Call]:
        return self.forward.recorder.producers.get(id(tensor), [])

    def _handed_out(self, tensor: Tensor) -> bool:
        """Some submodule outputs `tensor` (alone or inside a tuple/dict)."""
        sites = [*self.forward.outputs.get(id(tensor), []), *self.forward.containers.get(id(tensor), [])]
        return any(s.path for s in sites)

    def _tappable(self, tensor: Tensor) -> bool:
        return self._site_of(tensor, strict=False) is not None

    def _site_of(self, tensor: Tensor, strict: bool = True) -> _Site | None:
        """Where to tap `tensor`: the outermost module outputting it, else a module reading it, else an element."""
        f = self.forward
        for sites in (f.outputs.get(id(tensor)), f.input_sites.get(id(tensor)), f.containers.get(id(tensor))):
            named = sorted((s for s in sites or [] if s.path), key=lambda s: (s.depth, s.order))
            if named:
                return named[0]
        if strict:
            raise ProbeError(f"the tensor {self._shape(tensor)} is made outside any module; name a module path as the tap")
        return None

    def _batched(self, tensor: Tensor) -> bool:
        return tensor.dim() >= 1 and tensor.shape[0] == self.forward.batch

    @staticmethod
    def _spatial(tensor: Tensor) -> bool:
        """More than one position per sample: rank >= 3 with two non-batch dims above 1."""
        return tensor.dim() >= 3 and sum(d > 1 for d in tensor.shape[1:]) >= 2

    def _candidate(self, tensor: Tensor) -> str:
        site = self._site_of(tensor, strict=False)
        where = site.describe() if site is not None else "a tensor made outside any module"
        return f"{where} {self._shape(tensor)}"

    def _shape(self, tensor: Tensor) -> str:
        """A shape for messages, its batch dimension written B (the probe's batch is its own)."""
        dims = [str(d) for d in tensor.shape]
        if dims and self._batched(tensor):
            dims[0] = "B"
        return f"({', '.join(dims)})"

    def _last_maps(self, count: int = 3) -> str:
        """The last `count` maps/sequences modules handed out in the forward, for the no-pooling message."""
        latest: dict[int, _Site] = {}
        tensors: dict[int, Tensor] = {}
        for tensor in self._module_tensors():
            site = self._site_of(tensor, strict=False)
            if site is not None and self._spatial(tensor) and self._batched(tensor):
                latest[id(tensor)], tensors[id(tensor)] = site, tensor
        last = sorted(latest, key=lambda i: latest[i].order)[-count:]
        return ", ".join(f"{latest[i].describe()} {self._shape(tensors[i])}" for i in last) or "none"

    def _module_tensors(self) -> Iterator[Tensor]:
        for out in self.forward.module_outputs:
            yield from _tensors(out)

    def _name(self) -> str:
        return type(self.forward.model).__name__


@dataclass(frozen=True, eq=False)
class _Pool:
    """One spatial -> vector call on the way to the logits: the tapped tensor, pooled width, token picked, slice."""

    source: Tensor
    width: int
    token: int | None
    sliced: int
    flattened: bool
    op: str  # the torch function that made the vector, for messages
    channel_axis: int | None  # the axis the op keeps, where it pools the tapped tensor itself


_CHANNEL_AXIS = {3: {"sequence": 1, "tokens": 2}, 4: {"map": 1, "channels_last": 3}}


def _channel_axis(call: _Call, source: Tensor) -> int | None:
    """The one non-batch axis a pooling call keeps: 1 for PyTorch's pooling functions (over the trailing
    dims), the axis left by a reduction over explicit dims (mean(-1), amax((1, 2))), else None."""
    rank = source.dim()
    if call.name.endswith(("pool1d", "pool2d", "pool3d")):
        return 1 if int(call.name[-2]) == rank - 2 else None
    if call.name not in _POOL_OPS:
        return None
    dims = call.kwargs.get("dim", call.args[1] if len(call.args) > 1 else None)
    if isinstance(dims, int):
        dims = (dims,)
    if not isinstance(dims, (tuple, list)) or not all(isinstance(d, int) for d in dims):
        return None
    kept = set(range(1, rank)) - {d % rank for d in dims}
    return kept.pop() if len(kept) == 1 and 0 not in {d % rank for d in dims} else None


def _pools_positions(call: _Call, source: Tensor) -> bool:
    """A pooling op, or a pick of one token of (B, N, C) tokens."""
    return call.name in _POOL_OPS or (call.name == "__getitem__" and _token_index(call, source) is not None)


def _index(call: _Call) -> tuple[Any, ...]:
    index = call.args[1] if len(call.args) > 1 else ()
    return index if isinstance(index, tuple) else (index,)


def _token_index(call: _Call, source: Tensor) -> int | None:
    """x[:, i] / x[:, i, :] on (B, N, C) tokens: the token index i (>= 0), else None."""
    index = _index(call)
    full = slice(None)
    if source.dim() == 3 and len(index) in (2, 3) and index[0] == full and isinstance(index[1], int) \
            and all(i == full or i is Ellipsis for i in index[2:]) and index[1] >= 0:
        return index[1]
    return None


def _prefix_slice(call: _Call, source: Tensor) -> int | None:
    """x[:, k:] (k >= 0) on tokens: k; a full slice: 0; anything else: None."""
    index = _index(call)
    full = slice(None)
    if len(index) < 2 or index[0] != full or not all(i == full or i is Ellipsis for i in index[2:]):
        return 0 if all(i == full or i is Ellipsis for i in index) else None
    second = index[1]
    if isinstance(second, slice) and second.stop is None and second.step is None and source.dim() == 3:
        start = second.start or 0
        return start if isinstance(start, int) and start >= 0 else None
    return None


def _layouts(shape: tuple[int, ...], width: int, token_pick: bool) -> list[str]:
    """The layouts under which a tensor of `shape` pools to `width` channels."""
    if len(shape) == 4:
        return [name for name, ok in (("map", shape[1] == width), ("channels_last", shape[3] == width)) if ok]
    if len(shape) == 3:
        if token_pick:
            return ["tokens"] if shape[2] == width else []
        return [name for name, ok in (("sequence", shape[1] == width), ("tokens", shape[2] == width)) if ok]
    return []


def _grids(call: _Call, batch: int) -> Iterable[tuple[int, int]]:
    """Patch grids a call turns into tokens: a (B, C, H, W) or (B, H, W, C) input to a rank-3 output with H*W tokens."""
    outs = [o for o in call.outputs if o.dim() == 3 and o.shape[0] == batch]
    for source in call.inputs:
        if source.dim() != 4 or source.shape[0] != batch:
            continue
        for grid in ((source.shape[2], source.shape[3]), (source.shape[1], source.shape[2])):
            if any(grid[0] * grid[1] in o.shape[1:] for o in outs):
                yield (int(grid[0]), int(grid[1]))


def _meta_state(model: nn.Module) -> dict[str, Tensor]:
    """Meta-device stand-ins for every parameter and buffer (same shapes and dtypes, no memory)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: torch.empty_like(t, device="meta") for name, t in named}


def probe_model(model: nn.Module, example_input: Any = None, *, input_shape: tuple[int, ...] | None = None,
                aliases: bool = True) -> Probe:
    """Watch one forward of `model` to find its taps: on the meta device first (no compute), else a real one.

    `aliases=False` only records the modules' calls (what sizing the taps needs): one real forward, with a
    batch of 2 for `input_shape`, and no meta attempt (some models, torchvision detectors among them, cache
    device tensors in their forward and cannot run for real after a meta run).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"probing needs an nn.Module, got {type(model).__name__}")
    if (example_input is None) == (input_shape is None):
        raise ValueError("probing a model needs exactly one of example_input or input_shape")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if aliases:
        try:
            meta = _watch(model, _example(example_input, input_shape, device, meta=True), _meta_state(model))
            return Probe(meta, "meta")
        except Exception:  # noqa: BLE001 - a model that cannot run on meta tensors gets a real forward instead
            pass
    try:
        example = _example(example_input, input_shape, device, meta=False, batch=_PROBE_BATCH if aliases else 2)
        real = _watch(model, example, None, record_ops=aliases)
    except Exception as err:  # noqa: BLE001 - any failure of the user's forward is reported in one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ProbeError(f"probing {type(model).__name__} failed: its forward raised {type(err).__name__}: {first}") from err
    return Probe(real, str(device))


def find_taps(model: nn.Module, example_input: Any = None, *, input_shape: tuple[int, ...] | None = None) -> Taps:
    """The "@feature" and "@logits" taps of any model, found by probing (see the module docstring)."""
    found = probe_model(model, example_input, input_shape=input_shape)
    return Taps(found.feature, found.logits)


def resolve_alias(spec: Any, where: str, taps: Callable[[], Taps | Probe]) -> Any:
    """'@feature' / '@logits' -> the model's default tap (`taps()` is called only then); a list of specs
    item by item; any other spec unchanged. Every error is a ProbeError whose message starts with `where`."""
    if isinstance(spec, list):
        return [resolve_alias(item, f"{where}.{i}", taps) for i, item in enumerate(spec)]
    if not (isinstance(spec, str) and spec.startswith("@")):
        return spec
    if spec[1:] not in TAP_ALIASES:
        raise ProbeError(f"{where}: unknown tap alias {spec!r}; use {', '.join('@' + a for a in TAP_ALIASES)} or a module path")
    try:
        return getattr(taps(), spec[1:])
    except ProbeError as err:
        raise ProbeError(f"{where}: {err}") from None


def resolve_aliases(specs: Mapping[str, Any], probe: Callable[[], Probe], role: str = "model") -> dict[str, Any]:
    """Tap specs by level name, each through `resolve_alias`, with what `probe()` (one watched forward) finds."""
    return {name: resolve_alias(spec, f"level {name!r} {role}", probe) for name, spec in specs.items()}
