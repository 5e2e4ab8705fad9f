"""The user's own models by name: an import path `package.module:callable`, or `hf:<folder>` (transformers).

An import path names code the config's author chose to run: the callable is called with
`num_classes=` (and `pretrained=True` when set) plus the config's model options, and must return an
`nn.Module`. `hf:<folder>` builds a transformers image classifier from the folder's config.json
(random weights), or from its weights with pretrained; nothing is downloaded (`local_files_only`).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

HF_PREFIX = "hf:"
IMPORT_PATH = re.compile(r"(?P<module>[A-Za-z_][\w.]*):(?P<attr>[A-Za-z_][\w.]*)")


class ModelNameError(ValueError):
    """A model name that cannot build a model: an unknown timm name, an import path or a transformers folder."""


def is_import_path(name: str) -> bool:
    """True for `package.module:callable` (a prefix such as timm: or hf: is not one)."""
    return IMPORT_PATH.fullmatch(name) is not None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _searched(shown: int = 4) -> str:
    """Where Python looks for top-level modules (sys.path, "" as the working directory), the first few named."""
    folders = [os.getcwd() + " (the working directory)" if p in ("", ".") else p for p in sys.path]
    more = f" and {len(folders) - shown} more" if len(folders) > shown else ""
    return ", ".join(folders[:shown]) + more


def _resolve(name: str) -> Any:
    """The object an import path names, or a ModelNameError naming the module or attribute that failed."""
    match = IMPORT_PATH.fullmatch(name)
    if match is None:
        raise ModelNameError(f"{name!r} is not an import path; write it as package.module:callable")
    module_name, attr = match.group("module"), match.group("attr")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is None or not (module_name + ".").startswith(err.name + "."):
            raise ModelNameError(f"model {name!r}: cannot import module {module_name!r} ({_first_line(err)})") from err
        raise ModelNameError(
            f"model {name!r}: cannot import module {module_name!r} (no module named {err.name!r} in {_searched()}); "
            f"run from the folder that holds {err.name.split('.')[0]}, or add that folder to PYTHONPATH"
        ) from err
    except Exception as err:  # noqa: BLE001 - an import runs arbitrary code; any failure is the user's to see
        raise ModelNameError(f"model {name!r}: cannot import module {module_name!r} ({_first_line(err)})") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelNameError(f"model {name!r}: {module_name}.{attr} not found ({type(obj).__name__} "
                                 f"{getattr(obj, '__name__', '')!r} has no attribute {part!r})")
        obj = getattr(obj, part)
    return obj


def build_import_path(name: str, num_classes: int | None, pretrained: bool, **options: Any) -> nn.Module:
    """Call the callable `name` names with num_classes (and pretrained=True when set); it must return an nn.Module."""
    builder = _resolve(name)
    if not callable(builder):
        raise ModelNameError(
            f"model {name!r} names an object of type {type(builder).__name__!r}, not a callable that builds a model"
        )
    kwargs = dict(options)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if pretrained:
        kwargs["pretrained"] = True
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    try:
        model = builder(**kwargs)
    except Exception as err:  # noqa: BLE001 - the user's builder failed; say how it was called
        raise ModelNameError(f"model {name!r}: calling it with ({shown}) raised {_first_line(err)}") from err
    if not isinstance(model, nn.Module):
        raise ModelNameError(
            f"model {name!r}: calling it with ({shown}) returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _import_transformers() -> ModuleType:
    try:
        import transformers
    except ImportError as err:
        raise ImportError("hf:<folder> models need the transformers package: pip install transformers") from err
    return transformers


def build_hf(name: str, num_classes: int | None, pretrained: bool, **options: Any) -> nn.Module:
    """A transformers image classifier from a local folder: config.json (and, with pretrained, its weights)."""
    folder = Path(name[len(HF_PREFIX):]).expanduser()
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "holds no config.json"
        raise ModelNameError(
            f"model {name!r}: the folder {str(folder)!r} {what}; hf:<folder> needs a transformers config.json "
            "there (config.save_pretrained(folder) writes one)"
        )
    transformers = _import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, **options)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad config
        raise ModelNameError(f"model {name!r}: cannot read {folder / 'config.json'} ({_first_line(err)})") from err
    if num_classes is not None and num_classes != config.num_labels:
        config.num_labels = num_classes
    auto = transformers.AutoModelForImageClassification
    if not pretrained:
        return auto.from_config(config)
    try:
        return auto.from_pretrained(folder, config=config, local_files_only=True, ignore_mismatched_sizes=True)
    except OSError as err:
        raise ModelNameError(
            f"model {name!r}: pretrained is set but {str(folder)!r} holds no weights transformers can read "
            f"({_first_line(err)}); add them (model.save_pretrained(folder)) or set pretrained: false"
        ) from err
