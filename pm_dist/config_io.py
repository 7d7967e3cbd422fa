"""YAML ↔ typed dataclasses, with ``a.b=value`` overrides and errors that name the key.

A run configuration is a tree of dataclasses. ``from_dict`` fills it from a nested mapping (a YAML
file) and refuses what it does not know: an unknown key names its full path and suggests the closest
valid one; a wrong type names the key, the expected type and the value. Every dataclass in the tree
may define ``validate()``; it runs after loading.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from pm_dist.suggest import did_you_mean


class ConfigError(ValueError):
    pass


def _suggest(key: str, options) -> str:
    return did_you_mean(key, options, list_all=True)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {tp}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return origin(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


OPEN = "sections"  # the field in which a config dataclass keeps its open sections


def typed_keys(cls) -> dict[str, Any]:
    """The config keys of dataclass ``cls`` and their types: its fields, plus the open sections it
    declares with a ``open_sections()`` classmethod (e.g. one section per registered head), which
    it keeps in its ``sections`` field."""
    hints = typing.get_type_hints(cls)
    keys = {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init and f.name != OPEN}
    opener = getattr(cls, "open_sections", None)
    if opener is not None:
        keys.update(opener())
    return keys


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass ``cls`` from a mapping; missing keys keep their defaults."""
    keys = typed_keys(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs, sections = {}, {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        if key not in keys:
            raise ConfigError(f"unknown config key {full!r}{_suggest(key, keys)}")
        if value is None and dataclasses.is_dataclass(keys[key]):
            value = {}  # an empty YAML section: all defaults
        default = fields[key].default_factory if key in fields else dataclasses.MISSING
        if isinstance(value, dict) and default is not dataclasses.MISSING:
            base = default()
            if isinstance(base, dict):  # a mapping option updates its default, key by key
                value = {**base, **value}
        (kwargs if key in fields else sections)[key] = _coerce(value, keys[key], full)
    for name in keys.keys() - kwargs.keys() - sections.keys():  # sections left out: validated too
        if dataclasses.is_dataclass(keys[name]):
            built = from_dict(keys[name], {}, f"{path}.{name}" if path else name)
            (kwargs if name in fields else sections)[name] = built
    if OPEN in fields:
        kwargs[OPEN] = sections
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        where = ", ".join(f"{path}.{n}" if path else n for n in missing)
        raise ConfigError(f"required config key(s) missing: {where}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except ValueError as err:
            raise ConfigError(f"{path or 'config'}: {err}") from None
    return obj


def to_dict(obj) -> Any:
    """The plain mapping a config dataclass was (or could have been) loaded from."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            if not f.init:  # resolved from other keys, not a key itself
                continue
            value = getattr(obj, f.name)
            if f.name == OPEN:
                out.update({k: to_dict(v) for k, v in value.items()})
            else:
                out[f.name] = to_dict(value)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a", "b", "c"], value parsed as YAML: 3 → int, true → bool, [1,2] → list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has no key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(data: dict, overrides: list[str], cls=None) -> dict:
    """Set each ``key.sub=value`` in the nested mapping; with ``cls``, unknown keys fail here."""
    for text in overrides:
        keys, value = parse_override(text)
        node, node_cls = data, cls
        for i, key in enumerate(keys):
            if node_cls is not None:
                names = typed_keys(node_cls)
                if key not in names:
                    full = ".".join(keys[: i + 1])
                    raise ConfigError(f"unknown config key {full!r}{_suggest(key, names)}")
                hint = names[key]
                node_cls = hint if dataclasses.is_dataclass(hint) else None
            if i == len(keys) - 1:
                node[key] = value
            else:
                node = node.setdefault(key, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {text!r}: {'.'.join(keys[: i + 1])} is not a section")
    return data


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping")
    return data
