"""FeatureTaps' module outputs (what extra inputs read): the latest output of named modules, any object, never
stale, inert when copied; held by the same object and root hook as the feature taps."""
from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

from diffkd.taps import FeatureTaps


class Meta(nn.Module):
    """Returns a tensor with a dict of lists: an object, not a feature."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return x * 2, {"boxes": [x.sum()]}


class NoneOut(nn.Module):
    def forward(self, x: torch.Tensor) -> None:
        return None


class Skipping(nn.Module):
    """Runs `meta` only on batches of more than one item, and `none` always."""

    def __init__(self) -> None:
        super().__init__()
        self.meta, self.none = Meta(), NoneOut()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.none(x)
        return self.meta(x)[0] if len(x) > 1 else x


def test_outputs_are_kept_as_produced_and_refreshed_every_forward() -> None:
    model = Skipping()
    taps = FeatureTaps(model, {"f": "meta[0]"}, {"m": "meta", "n": "none"})
    with pytest.raises(RuntimeError, match=r"output 'm' \(module 'meta'\): the model has not run a forward"):
        taps.output("m")
    x = torch.randn(3, 2)
    model(x)
    doubled, meta = taps.output("m")
    assert torch.equal(doubled, x * 2) and meta["boxes"][0] == x.sum()
    assert torch.equal(taps["f"], doubled)  # the feature tap of the same module, from the same hooks
    assert taps.output("n") is None  # an output of None is kept, not taken for a module that did not run
    model(torch.randn(1, 2))  # meta does not run: its earlier output is never handed out
    with pytest.raises(RuntimeError, match="the module did not run in the model's latest forward"):
        taps.output("m")
    with pytest.raises(KeyError, match=r"no module output named 'x'; outputs: \['m', 'n'\]"):
        taps.output("x")
    taps.close()
    model(x)
    with pytest.raises(RuntimeError):
        taps.output("n")  # closed: nothing is captured any more


def test_unknown_paths_are_named_with_the_closest_and_copies_are_inert() -> None:
    model = nn.Sequential(OrderedDict(meta=Meta()))
    with pytest.raises(ValueError, match=r"the input: unknown module path 'mta' in Sequential; closest paths: 'meta'"):
        FeatureTaps(model, {}, {"m": "mta"}, {"m": "the input"})
    taps = FeatureTaps(model, {}, {"m": "meta"})
    twin = copy.deepcopy(model)
    x = torch.randn(2, 2)
    twin(x)  # the copy's hooks feed nothing
    with pytest.raises(RuntimeError, match="has not run a forward"):
        taps.output("m")
    model(x)
    assert torch.equal(taps.output("m")[0], x * 2)


def test_no_paths_hook_nothing() -> None:
    model = Skipping()
    taps = FeatureTaps(model, {})
    assert not model._forward_pre_hooks and not model.meta._forward_hooks  # nothing runs per forward
    assert taps.names() == []
