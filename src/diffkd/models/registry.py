"""One name -> model: the registered CIFAR zoo, Fashion-MNIST demo nets and torchvision models, timm models,
the user's own callables by import path and transformers classifiers from a local folder.

Each registered name also knows its default distillation taps (module paths, as in `named_modules()`,
of the last feature map before global pooling and of the logits) and its input size; the probe
(`diffkd.models.probe`) finds the same taps, and finds them for every other model.

Names are case-sensitive. The zoo's `ResNet18` / `ResNet50` (its checkpoints' spelling) are the CIFAR
nets, also registered as the unambiguous `resnet18_cifar` / `resnet50_cifar`; lower-case `resnet18` /
`resnet50` are torchvision's ImageNet nets. `timm:<name>` builds any timm model (see `default_taps`),
`package.module:callable` calls the user's builder and `hf:<folder>` reads a transformers folder
(see `diffkd.models.imports`).
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
from .imports import HF_PREFIX, ModelNameError, build_hf, build_import_path, is_import_path
from .mobilenetv1 import mobilenetv1
from .probe import Taps, find_taps

TIMM_PREFIX = "timm:"
_CIFAR_INPUT = (3, 32, 32)
_IMAGENET_INPUT = (3, 224, 224)
_FMNIST_INPUT = (1, 28, 28)


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
    """Every registered model name (canonical names and aliases); `timm:<name>`, `hf:<folder>` and
    import paths `package.module:callable` are accepted on top."""
    return sorted([*_SPECS, *_ALIASES], key=lambda n: (n.lower(), n))


def is_registered(name: str) -> bool:
    """True for a name (or alias) of the registry, whose taps are hand-written."""
    return _ALIASES.get(name, name) in _SPECS


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
        f"'{TIMM_PREFIX}<name>' builds a timm model, '{HF_PREFIX}<folder>' a transformers one and "
        "'package.module:callable' your own"
    )


def _import_timm() -> ModuleType:
    """The timm package, or an ImportError saying how to install it."""
    try:
        import timm
    except ImportError as err:
        raise ImportError("timm models ('timm:<name>') need the timm package: pip install timm") from err
    return timm


def _timm_arch(name: str) -> tuple[ModuleType, str]:
    """timm and the architecture of `timm:<arch>`, or a ModelNameError with timm's closest model names."""
    timm, arch = _import_timm(), name[len(TIMM_PREFIX):]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"closest matches: {', '.join(TIMM_PREFIX + c for c in close)}" if close else "no close match"
        raise ModelNameError(f"unknown timm model {arch!r} ({hint}); timm.list_models() lists all names")
    return timm, arch


def create(name: str, num_classes: int | None = None, pretrained: bool = False, **kwargs: object) -> nn.Module:
    """Build a model by name (registered, `timm:<name>`, `hf:<folder>` or `package.module:callable`);
    num_classes=None keeps the model's usual class count; kwargs go to the builder."""
    if name.startswith(TIMM_PREFIX):
        timm, arch = _timm_arch(name)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    if name.startswith(HF_PREFIX):
        return build_hf(name, num_classes, pretrained, **kwargs)
    if is_import_path(name):
        return build_import_path(name, num_classes, pretrained, **kwargs)
    spec = _spec(name)
    return spec.build(spec.num_classes if num_classes is None else num_classes, pretrained, **kwargs)


@functools.lru_cache(maxsize=None)
def _timm_probe(arch: str) -> tuple[Taps, tuple[int, int, int]]:
    """Taps and input size of a timm model: its pretrained config's size, taps probed on the meta device."""
    timm = _import_timm()
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = tuple(config.get("input_size", _IMAGENET_INPUT))
    return find_taps(model, input_shape=size), size


def _not_by_name(name: str, what: str) -> ValueError | None:
    """The error for a name whose model only a probe of the built model can describe, else None."""
    if name.startswith(HF_PREFIX) or is_import_path(name):
        return ValueError(
            f"{what} of {name!r} are not known by name; build the model and call "
            "diffkd.models.find_taps(model, example_input) (configs do this for you)"
        )
    return None


def default_taps(name: str) -> Taps:
    """Default distillation taps of a model name: the registry's, or for `timm:<name>` found by the probe."""
    if name.startswith(TIMM_PREFIX):
        return _timm_probe(_timm_arch(name)[1])[0]
    error = _not_by_name(name, "the default taps")
    if error is not None:
        raise error
    return _spec(name).taps


def input_size(name: str) -> tuple[int, int, int]:
    """(channels, height, width) of the model's usual input: 3x32x32 CIFAR, 3x224x224 ImageNet, 1x28x28 FMNIST."""
    if name.startswith(TIMM_PREFIX):
        return _timm_probe(_timm_arch(name)[1])[1]
    error = _not_by_name(name, "the input size")
    if error is not None:
        raise error
    return _spec(name).input_size
