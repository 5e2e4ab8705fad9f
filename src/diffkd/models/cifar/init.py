"""Weight initialisation shared by the CIFAR zoo, so models trained from scratch start as the zoo's did."""

from __future__ import annotations

import torch.nn as nn


def init_fan_out_(model: nn.Module, linear_std: float | None = None) -> None:
    """He-normal (fan-out) conv weights with zero conv biases; with `linear_std`, N(0, std) linear weights too."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and linear_std is not None:
            nn.init.normal_(module.weight, 0.0, linear_std)
            nn.init.zeros_(module.bias)
