"""Read configs from YAML (safe_load only: a config never executes code), apply overrides, save them."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from .checking import ConfigError, build
from .schema import CONFIG_FORMAT, RANGES, TASK_SECTIONS, Config


class _DuplicateKey(ValueError):
    """A mapping key given twice in one YAML document (parse_yaml names the source)."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as 1e-4 (PyYAML's 1.1 rules make them strings) and
    refuses a mapping key given twice (two `optim:` sections), where PyYAML silently keeps the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; its keys may be overridden
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in first:
                    where = f"line {line}" if first[key] == line else f"lines {first[key]} and {line}"
                    raise _DuplicateKey(f"key {key!r} is given twice ({where}); keep one")
                first[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely; a syntax error names the source (file or override)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except _DuplicateKey as err:
        raise ConfigError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: invalid YAML: {err}") from err


def _set_dotted(data: dict, key: str, value: Any) -> None:
    """Set data[a][b][c] = value for key 'a.b.c', creating mappings and indexing lists with integers."""
    parts = key.split(".")
    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise ConfigError(f"override {key!r}: {here!r} needs an index below {len(node)}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:depth])!r} is not a mapping or a list")


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Apply `dotted.key=value` overrides to plain config data, in order.

    Values are parsed as YAML (numbers, true/false, null, [lists], {mappings}); a value YAML cannot
    parse, such as @feature, is taken as a string unless it starts a list, mapping or quote.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=0.05")
        try:
            value = parse_yaml(text, f"override {item!r}")
        except ConfigError:
            if text.lstrip().startswith(("[", "{", "'", '"')):
                raise
            value = text  # not YAML but plainly meant as text, e.g. levels.0.student=@feature
        _set_dotted(data, key.strip(), value)
    return data


def config_from_dict(data: Any) -> Config:
    """Check plain data (as from YAML) against the schema and value ranges; return the typed Config."""
    cfg = build(Config, {} if data is None else data)
    if cfg.format != CONFIG_FORMAT:
        raise ConfigError(f"format: this config is of format {cfg.format}, and this diffkd reads format {CONFIG_FORMAT}; "
                          "use the diffkd that wrote it, or write the config anew")
    flat = config_to_dict(cfg)
    for key, (test, what) in RANGES.items():
        section, name = key.split(".")
        value = flat[section][name]
        if not test(value):
            raise ConfigError(f"{key}: must be {what}, got {value!r}")
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain python data (dicts, lists, scalars): what YAML files and checkpoints hold."""
    return dataclasses.asdict(cfg)


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config file, apply key=value overrides, and check the result."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}") from err
    data = parse_yaml(text, str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return config_from_dict(apply_overrides(data, overrides))


def dump_config(cfg: Config) -> str:
    """The config as YAML text, sections in schema order; another task's sections are left out while at defaults."""
    data, defaults = config_to_dict(cfg), config_to_dict(Config())
    for section, task in TASK_SECTIONS.items():
        if task != cfg.task and data[section] == defaults[section]:
            del data[section]
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loading it back gives an equal Config)."""
    Path(path).write_text(dump_config(cfg))
