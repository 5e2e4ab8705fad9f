"""One name -> model registry: the CIFAR zoo, the Fashion-MNIST demo nets, torchvision and timm models.

Each registered name also knows its default distillation taps (module paths, as in `named_modules()`,
of the last feature map before global pooling and of the logits) and its input size.

Names are case-sensitive. The zoo's `ResNet18` / `ResNet50` (its checkpoints' spelling) are the CIFAR
nets, also registered as the unambiguous `resnet18_cifar` / `resnet50_cifar`; lower-case `resnet18` /
`resnet50` are torchvision's ImageNet nets. `timm:<name>` builds any timm model (see `default_taps`).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn

from . import cifar
from .fashion import fmnist_student, fmnist_teacher
from .mobilenetv1 import mobilenetv1

TIMM_PREFIX = "timm:"
_CIFAR_INPUT = (3, 32, 32)
_IMAGENET_INPUT = (3, 224, 224)
_FMNIST_INPUT = (1, 28, 28)


@dataclass(frozen=True)
class Taps:
    """Module paths whose outputs are the last feature map before global pooling and the logits.

    `feature` is a Tap mapping instead of a path where the map needs reading, e.g. timm Swin's
    (B, H, W, C) output: {"path": "norm", "channels_last": True}.
    """

    feature: str | dict[str, Any]
    logits: str


@dataclass(frozen=True)
class _Spec:
    """How to build one registered model, and what a distiller needs to know about it."""

    build: Callable[..., nn.Module]  # build(num_classes, pretrained, **kwargs)
    taps: Taps
    input_size: tuple[int, int, int]
    num_classes: int


def _local(name: str, constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Builder for a model defined in this package; these have no weights to download by name."""

    def build(num_classes: int, pretrained: bool, **kwargs: object) -> nn.Module:
        if pretrained:
            raise ValueError(
                f"{name!r} has no downloadable weights; build it with pretrained=False and load a "
                "checkpoint with diffkd.models.load_weights(model, path)"
            )
        return constructor(num_classes=num_classes, **kwargs)

    return build


def _torchvision(arch: str, head: str) -> Callable[..., nn.Module]:
    """Builder for a torchvision classifier; with pretrained=True and a new class count, `head` is replaced."""

    def build(num_classes: int, pretrained: bool, **kwargs: object) -> nn.Module:
        import torchvision

        if not pretrained:
            return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
        model = torchvision.models.get_model(arch, weights="DEFAULT", **kwargs)
        if num_classes != 1000:
            parent_path, _, attr = head.rpartition(".")
            parent = model.get_submodule(parent_path)
            setattr(parent, attr, nn.Linear(getattr(parent, attr).in_features, num_classes))
        return model

    return build


_SPECS: dict[str, _Spec] = {}
_ALIASES: dict[str, str] = {}


def _register(name: str, build: Callable[..., nn.Module], feature: str, logits: str,
              size: tuple[int, int, int], num_classes: int, aliases: tuple[str, ...] = ()) -> None:
    """Add one model under its canonical name and its aliases."""
    _SPECS[name] = _Spec(build, Taps(feature, logits), size, num_classes)
    _ALIASES.update({alias: name for alias in aliases})


def _register_all() -> None:
    """Fill the registry; default taps per family are listed here, in one place."""
    for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                 "resnet8x4", "resnet32x4"):
        _register(name, _local(name, getattr(cifar, name)), "layer3", "fc", _CIFAR_INPUT, 100)
    for name in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"):
        _register(name, _local(name, getattr(cifar, name)), "relu", "fc", _CIFAR_INPUT, 100)
    for depth in (8, 11, 13, 16, 19):
        name = f"vgg{depth}_bn"
        _register(name, _local(name, getattr(cifar, name)), "relu", "classifier", _CIFAR_INPUT, 100,
                  (f"vgg{depth}",))
    _register("mobile_half", _local("mobile_half", cifar.mobile_half), "conv2", "classifier", _CIFAR_INPUT,
              100, ("mobilenetv2_half",))
    _register("ShuffleV1", _local("ShuffleV1", cifar.ShuffleV1), "layer3", "linear", _CIFAR_INPUT, 100,
              ("shufflenetv1",))
    _register("ShuffleV2", _local("ShuffleV2", cifar.ShuffleV2), "relu", "linear", _CIFAR_INPUT, 100,
              ("shufflenetv2",))
    _register("resnet18_cifar", _local("resnet18_cifar", cifar.resnet18_cifar), "layer4", "linear",
              _CIFAR_INPUT, 100, ("ResNet18",))
    _register("resnet50_cifar", _local("resnet50_cifar", cifar.resnet50_cifar), "layer4", "linear",
              _CIFAR_INPUT, 100, ("ResNet50",))
    _register("mobilenetv1", _local("mobilenetv1", mobilenetv1), "model.13", "fc", _IMAGENET_INPUT, 1000,
              ("MobileNetV1",))
    _register("fmnist_teacher", _local("fmnist_teacher", fmnist_teacher), "features", "fc", _FMNIST_INPUT, 10)
    _register("fmnist_student", _local("fmnist_student", fmnist_student), "features", "fc", _FMNIST_INPUT, 10)
    for name in ("resnet18", "resnet34", "resnet50", "resnet101"):
        _register(name, _torchvision(name, "fc"), "layer4", "fc", _IMAGENET_INPUT, 1000)
    for name in ("mobilenet_v2", "efficientnet_b0"):
        _register(name, _torchvision(name, "classifier.1"), "features", "classifier", _IMAGENET_INPUT, 1000)


_register_all()


def available() -> list[str]:
    """Every accepted model name (canonical names and aliases); `timm:<name>` is accepted on top."""
    return sorted([*_SPECS, *_ALIASES], key=lambda n: (n.lower(), n))


def _spec(name: str) -> _Spec:
    """The spec registered under `name` or an alias, else a ValueError suggesting the closest names."""
    canonical = _ALIASES.get(name, name)
    if canonical in _SPECS:
        return _SPECS[canonical]
    names = available()
    by_lower: dict[str, list[str]] = {}
    for known in names:
        by_lower.setdefault(known.lower(), []).append(known)
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.5)
    suggestions = [known for lower in close for known in by_lower[lower]]
    hint = f"closest matches: {', '.join(suggestions)}" if suggestions else "no close match"
    raise ValueError(
        f"unknown model {name!r} ({hint}); diffkd.models.available() lists all names, "
        f"and '{TIMM_PREFIX}<name>' builds a timm model"
    )


def _import_timm() -> ModuleType:
    """The timm package, or an ImportError saying how to install it."""
    try:
        import timm
    except ImportError as err:
        raise ImportError("timm models ('timm:<name>') need the timm package: pip install timm") from err
    return timm


def create(name: str, num_classes: int | None = None, pretrained: bool = False, **kwargs: object) -> nn.Module:
    """Build a registered model (or `timm:<name>`); num_classes=None keeps the model's usual class count."""
    if name.startswith(TIMM_PREFIX):
        timm = _import_timm()
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return timm.create_model(name[len(TIMM_PREFIX):], pretrained=pretrained, **kwargs)
    spec = _spec(name)
    return spec.build(spec.num_classes if num_classes is None else num_classes, pretrained, **kwargs)


def _no_timm_rule(arch: str, why: str) -> RuntimeError:
    """The error for a timm model the generic tap rule cannot handle."""
    return RuntimeError(
        f"no default taps for timm model {arch!r}: {why}; name the feature and logits layers "
        "explicitly (module paths as in model.named_modules())"
    )


@functools.lru_cache(maxsize=None)
def _timm_probe(arch: str) -> tuple[Taps, tuple[int, int, int]]:
    """Taps and input size of a timm model, found on the meta device (no memory, no weights).

    logits: the classifier module named in the model's pretrained config ("fc", "head", "head.fc", ...).
    feature: the outermost module whose output *is* the tensor `forward_features` returns (e.g. `layer4`
    for ResNets, `bn2` for EfficientNets, `norm` for ViT / Swin, where it is a token map).
    """
    timm = _import_timm()
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = tuple(config.get("input_size", _IMAGENET_INPUT))
    modules = dict(model.named_modules())
    logits = config.get("classifier")
    if not isinstance(logits, str) or logits not in modules:
        raise _no_timm_rule(arch, f"its classifier {logits!r} is not one module")
    if not hasattr(model, "forward_features"):
        raise _no_timm_rule(arch, "it has no forward_features")

    outputs: list[tuple[str, object]] = []
    hooks = [module.register_forward_hook(lambda _m, _i, out, name=name: outputs.append((name, out)))
             for name, module in modules.items() if name]
    try:
        with torch.no_grad():
            features = model.eval().forward_features(torch.zeros(1, *size, device="meta"))
    except Exception as err:  # any failure of the meta-device probe means the rule does not apply
        raise _no_timm_rule(arch, f"probing forward_features failed ({err})") from err
    finally:
        for hook in hooks:
            hook.remove()
    returning = [name for name, out in outputs if out is features]
    if not returning:
        raise _no_timm_rule(arch, "no single module returns the output of forward_features")
    width = getattr(model, "num_features", None)
    if features.dim() == 4 and features.shape[-1] == width and features.shape[1] != width:  # (B, H, W, C)
        return Taps({"path": returning[-1], "channels_last": True}, logits), size
    return Taps(returning[-1], logits), size


def default_taps(name: str) -> Taps:
    """Default distillation taps of a model name: pre-pool feature map and logits module paths."""
    if name.startswith(TIMM_PREFIX):
        return _timm_probe(name[len(TIMM_PREFIX):])[0]
    return _spec(name).taps


def input_size(name: str) -> tuple[int, int, int]:
    """(channels, height, width) of the model's usual input: 3x32x32 CIFAR, 3x224x224 ImageNet, 1x28x28 FMNIST."""
    if name.startswith(TIMM_PREFIX):
        return _timm_probe(name[len(TIMM_PREFIX):])[1]
    return _spec(name).input_size
