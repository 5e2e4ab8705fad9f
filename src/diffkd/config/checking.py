"""Turn plain YAML data into the typed config dataclasses, or fail with one exact message.

Why our own ~100-line checker rather than pydantic/omegaconf: it adds no dependency, it accepts
exactly the types the schema names (no silent "3" -> 3 coercion; only int -> float widening), and
its messages are ours to test: an unknown key names the valid keys of its section and the closest
match (difflib), a wrong type names the dotted key, the expected type and what was given.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A configuration that does not fit the schema; the message names the dotted key."""


def _describe(tp: Any) -> str:
    """A human name for a type hint, used in 'expected ...' messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"a list (items: {_describe(args[0])})" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    names = {bool: "true or false (bool)", int: "an integer (int)", float: "a number (float)", str: "a string (str)"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _got(value: Any) -> str:
    """How a wrong value is shown: its repr and its type (null for None)."""
    return "null" if value is None else f"{value!r} ({type(value).__name__})"


def _closest_hint(key: str, valid: list[str], path: str = "") -> str:
    """' Did you mean X?' for the most similar valid key (as a dotted path), or ''."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" Did you mean {_join(path, close[0])!r}?" if close else ""


def _join(path: str, key: Any) -> str:
    """Dotted path of a child key."""
    return f"{path}.{key}" if path else str(key)


def convert(tp: Any, value: Any, path: str) -> Any:
    """Check value against the type hint tp and return it in typed form (dataclasses built)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        for option in options:
            nested = dataclasses.is_dataclass(option) or typing.get_origin(option) in (list, dict)
            try:
                return convert(option, value, path)
            except ConfigError:
                if nested and len(options) == 1:
                    raise  # the inner message points at the exact nested key
        raise ConfigError(f"{path}: expected {_describe(tp)}, got {_got(value)}")
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        hint = _closest_hint(str(value), [str(a) for a in args])
        raise ConfigError(f"{path}: expected {_describe(tp)}, got {_got(value)}.{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected {_describe(tp)}, got {_got(value)}")
        return [convert(args[0], item, _join(path, i)) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{path}: expected a mapping with string keys, got {_got(value)}")
        return {k: convert(args[1], v, _join(path, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{path}: expected {_describe(tp)}, got {_got(value)}")


def build(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass cls from a mapping, refusing unknown keys and missing required ones."""
    where = path or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_got(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            valid = list(fields)
            raise ConfigError(
                f"unknown key {_join(path, key)!r}.{_closest_hint(str(key), valid, path)} "
                f"Valid keys{' in ' + path if path else ''}: {', '.join(valid)}"
            )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = convert(hints[name], data[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)}: missing (required, {_describe(hints[name])})")
    return cls(**values)
