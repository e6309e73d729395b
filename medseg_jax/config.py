"""Experiment configs: a Python file with `get_config()` returning an ml_collections ConfigDict, plus overrides.

Overrides are `--config.key.sub=value` (or `key.sub=value`) strings. The value is parsed to the type of the existing
field: bools accept true/false/1/0/yes/no, tuples and lists accept Python literals (`(64,64,32)`) or comma lists
(`64,64,32`), and fields whose default is None accept any Python literal or, failing that, a plain string. A key that
the config does not have is an error: a typo must never be silently ignored.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_collections

from medseg_jax.errors import MedsegError


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    path = Path(path)
    if not path.is_file():
        raise MedsegError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"medseg_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a broken config file is the user's file, not our bug
        raise MedsegError(f"{path}: cannot load config file ({type(exc).__name__}: {exc})") from None
    if not hasattr(module, "get_config"):
        raise MedsegError(f"{path}: config file has no get_config() function")
    config = module.get_config()
    if isinstance(config, dict):
        config = ml_collections.ConfigDict(config)
    if not isinstance(config, ml_collections.ConfigDict):
        raise MedsegError(f"{path}: get_config() must return an ml_collections.ConfigDict")
    return config


def _parse_bool(text: str, key: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise MedsegError(f"config key '{key}': expected true or false, got '{text}'")


def _parse_literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _parse_value(text: str, current: Any, key: str):
    if isinstance(current, bool):
        return _parse_bool(text, key)
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise MedsegError(f"config key '{key}': expected an integer, got '{text}'") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise MedsegError(f"config key '{key}': expected a number, got '{text}'") from None
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        value = _parse_literal(text)
        if isinstance(value, str) or not isinstance(value, (tuple, list, int, float)):
            value = tuple(_parse_literal(part.strip()) for part in text.strip("()[]").split(",") if part.strip())
        if isinstance(value, (int, float)):
            value = (value,)
        element_type = type(current[0]) if len(current) else None
        if element_type in (int, float):
            try:
                value = tuple(element_type(v) for v in value)
            except (TypeError, ValueError):
                raise MedsegError(f"config key '{key}': expected a list of numbers, got '{text}'") from None
        return type(current)(value)
    if current is None:
        return _parse_literal(text)
    raise MedsegError(f"config key '{key}': cannot override a value of type {type(current).__name__}")


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Returns a copy of `config` with `key=value` overrides applied; unknown keys raise MedsegError."""
    config = ml_collections.ConfigDict(config.to_dict())
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if text.startswith("config."):
            text = text[len("config."):]
        if "=" not in text:
            raise MedsegError(f"config override '{item}': expected --config.key=value")
        key, value_text = text.split("=", 1)
        node, name = locate(config, key)
        current = node[name]
        if isinstance(current, ml_collections.ConfigDict):
            raise MedsegError(f"config key '{key}' is a group; override one of its fields "
                              f"({', '.join(current.keys())})")
        with node.ignore_type():
            node[name] = _parse_value(value_text, current, key)
    return config


def locate(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """(the group holding the dotted `key`, its last name); a key the config does not have is a MedsegError naming
    the keys known where the path left the config."""
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
            raise MedsegError(f"unknown config key '{key}'" + (f" (known at this level: {known})" if known else ""))
        if depth < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    return apply_overrides(load_config_file(path), overrides)


def config_to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(to_plain(config), indent=2)


def to_plain(config) -> dict:
    """ConfigDict -> plain JSON-friendly dict (tuples become lists)."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    if isinstance(config, dict):
        return {k: to_plain(v) for k, v in config.items()}
    if isinstance(config, (tuple, list)):
        return [to_plain(v) for v in config]
    return config


def from_plain(data: dict) -> ml_collections.ConfigDict:
    """Inverse of `to_plain`: lists become tuples so the config round-trips through JSON."""

    def convert(value):
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return tuple(convert(v) for v in value)
        return value

    return ml_collections.ConfigDict(convert(data))
