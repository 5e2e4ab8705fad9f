"""Mixed precision: autocast to bf16 or fp16, and the fp16 gradient scaler; one backward-and-step for all."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from ..config import ConfigError

DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """Autocast context, scaled backward (fp16 only) and an optimizer step with optional gradient clipping."""

    def __init__(self, amp: str, device: torch.device) -> None:
        if amp == "fp16" and device.type != "cuda":
            raise ConfigError(
                f"train.amp=fp16 needs a CUDA device (this run is on {device.type}); use train.amp=bf16 or none"
            )
        self.device = device
        self.dtype = DTYPES[amp]
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def autocast(self) -> AbstractContextManager:
        """Run the forward pass under autocast (a no-op context when amp is none)."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward_and_step(
        self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], clip: float
    ) -> None:
        """Backward, clip the gradient norm to clip (0 = off; after unscaling under fp16), optimizer step."""
        params = list(params)
        if self.scaler is None:
            loss.backward()
            if clip > 0:
                nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if clip > 0:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(params, clip)
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        """The scaler's state (None without one)."""
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore the scaler's state saved by state_dict."""
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)
