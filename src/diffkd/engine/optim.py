"""Optimizers by name (sgd, adamw, rmsprop) over parameter groups, optionally without decay on norms and biases."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, OptimConfig


def parameter_groups(params: Iterable[nn.Parameter], weight_decay: float, no_decay_norm_bias: bool) -> list[dict]:
    """One group, or two: weights with decay, and 0/1-dimensional tensors (biases, norm scales) without.

    The rank test catches every bias and every norm layer's weight (BatchNorm, LayerNorm, GroupNorm)
    without needing module types or names, which `trainable_parameters()` does not give.
    """
    params = [p for p in params if p.requires_grad]
    if not no_decay_norm_bias:
        return [{"params": params, "weight_decay": weight_decay}]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _sgd(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def _rmsprop(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(groups, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum)


OPTIMIZERS: Mapping[str, Callable[[list[dict], OptimConfig], torch.optim.Optimizer]] = MappingProxyType(
    {"sgd": _sgd, "adamw": _adamw, "rmsprop": _rmsprop}
)


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig,
                    method_params: Iterable[nn.Parameter] = ()) -> torch.optim.Optimizer:
    """The optimizer cfg.name over params (groups per no_decay_norm_bias); `method_params` (among params: the
    distillation methods' modules) get groups of their own at `cfg.methods_lr_scale` times the rate. Each group
    remembers its initial lr, which the schedule scales."""
    if cfg.name not in OPTIMIZERS:
        close = difflib.get_close_matches(cfg.name, list(OPTIMIZERS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"optim.name: unknown optimizer {cfg.name!r}.{hint} Available: {', '.join(OPTIMIZERS)}")
    if cfg.nesterov and (cfg.name != "sgd" or cfg.momentum <= 0):
        raise ConfigError("optim.nesterov=true needs optim.name=sgd and optim.momentum > 0")
    params = list(params)
    scaled = {id(p) for p in method_params} if cfg.methods_lr_scale != 1.0 else set()
    groups = parameter_groups([p for p in params if id(p) not in scaled], cfg.weight_decay, cfg.no_decay_norm_bias)
    methods = parameter_groups([p for p in params if id(p) in scaled], cfg.weight_decay, cfg.no_decay_norm_bias)
    groups += [{**g, "lr": cfg.lr * cfg.methods_lr_scale} for g in methods if g["params"]]
    optimizer = OPTIMIZERS[cfg.name](groups, cfg)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return optimizer


def group_summary(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Per group: parameter count and weight decay (for logs and tests)."""
    return [
        {"tensors": len(g["params"]), "numel": sum(p.numel() for p in g["params"]), "weight_decay": g["weight_decay"]}
        for g in optimizer.param_groups
    ]
