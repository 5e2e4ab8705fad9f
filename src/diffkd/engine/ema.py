"""Exponential moving average of a model's weights, kept as a separate copy that is evaluated and exported."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """ema <- decay * ema + (1 - decay) * weights after every optimizer step; integer buffers are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()  # forward hooks of diffkd taps become inert in copies
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards model's current parameters and buffers."""
        current = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.is_floating_point():
                value.lerp_(current[name].detach().to(value.dtype), 1.0 - self.decay)
            else:
                value.copy_(current[name])

    def state_dict(self) -> dict[str, Any]:
        """The averaged weights: a state dict of the model's own structure."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the averaged weights."""
        self.module.load_state_dict(state)
