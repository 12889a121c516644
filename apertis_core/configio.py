"""Config dataclasses as data: load/save YAML or JSON and apply `key=value` overrides with type checks.

Every config in apertis_core (model, training, data, generation) is a plain dataclass; this module is the
one override path for all of them, so the CLI, the studio and YAML files agree on names and types.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Hashable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key the user supplied is wrong; the message says which and what to do."""


def unknown_name_message(key: str, valid: list[str], where: str, noun: str = "key") -> str:
    """'unknown X key 'd_modle'. Did you mean 'd_model'? Valid keys: ...' (difflib suggestions)."""
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {where} {noun} {key!r}.{hint} Valid {noun}s: {', '.join(sorted(valid))}."


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert `value` (from YAML/JSON or a `--set` string) to `annotation`, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be None")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
    if origin in (list, tuple):
        if isinstance(value, str):
            text = value.strip()
            value = json.loads(text) if text.startswith("[") else [v for v in text.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [coerce(v, inner, key) for v in value]
        return items if origin is list else tuple(items)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected text, got {value!r}")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict):
            return from_dict(annotation, value, where=key)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str | None = None) -> T:
    """Build dataclass `cls` from a mapping, checking every key and type."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    types_by_name = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in types_by_name:
            raise ConfigError(unknown_name_message(key, list(types_by_name), where))
        kwargs[key] = coerce(value, types_by_name[key], f"{where}.{key}")
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain JSON/YAML-safe dict of a dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def apply_overrides(config: T, overrides: dict[str, Any] | list[str]) -> T:
    """Return a copy of `config` with overrides applied.

    `overrides` is a mapping or a list of `key=value` strings (as given to `--set`); dotted keys reach
    nested dataclasses (`model.d_model=256`).
    """
    if isinstance(overrides, list):
        overrides = parse_set_args(overrides)
    updates: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    types_by_name = _field_types(type(config))
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in types_by_name:
            raise ConfigError(unknown_name_message(head, list(types_by_name), type(config).__name__))
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            updates[head] = coerce(value, types_by_name[head], head)
    for head, sub in nested.items():
        child = updates.get(head, getattr(config, head))
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"{head} has no sub-keys; use {head}=VALUE")
        updates[head] = apply_overrides(child, sub)
    return dataclasses.replace(config, **updates)


def parse_set_args(items: list[str]) -> dict[str, str]:
    """`["lr=3e-4", "model.d_model=256"]` -> mapping; a missing '=' is an error naming the item."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, for example --set lr=3e-4")
        out[key.strip()] = value.strip()
    return out


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a dict, with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror or exc})") from exc
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text, object_pairs_hook=_unique_json_keys)
        else:
            data = _load_yaml_unique(text)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except Exception as exc:  # both yaml and json raise their own error classes
        raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'YAML'}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def _unique_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ConfigError(f"key {', '.join(map(repr, repeated))} is given twice; keep one of them")
    return dict(pairs)


def _load_yaml_unique(text: str) -> Any:
    """yaml.safe_load, except that a key given twice in one mapping is an error: YAML's own rule is that the
    last one wins, which silently drops a whole `train:` block written twice."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, Hashable):
                    continue  # yaml's own construct_mapping refuses it, naming the line
                if key in seen:
                    line = key_node.start_mark.line + 1
                    raise ConfigError(f"line {line}: key {key!r} is given twice (first on line {seen[key]}); keep one")
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def write_mapping(data: dict[str, Any], path: str | Path) -> None:
    """Write a dict as YAML or JSON (by suffix), atomically."""
    from .fileio import atomic_write_text

    path = Path(path)
    if path.suffix.lower() == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        import yaml

        text = yaml.safe_dump(data, sort_keys=False)
    atomic_write_text(path, text)
