"""Helpers shared by the model-family configs: dict/YAML round trips with strict key checking.

Each family keeps its own `@dataclass` config in its own file; these functions only move values in and
out, so a typo in a YAML preset fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lamina.errors import ConfigError

T = TypeVar("T")
C = TypeVar("C", bound="ConfigIO")


class ConfigIO:
    """The dict/YAML round trip every family config shares (a config is a plain `@dataclass` that inherits
    this, and stays readable top to bottom: its fields and their checks, nothing else)."""

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        return config_from_dict(cls, data)

    @classmethod
    def from_yaml(cls: type[C], path: str | Path) -> C:
        return cls.from_dict(load_yaml(path))

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass `cls` from `data`, recursing into nested dataclass fields; unknown keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{cls.__name__} expects a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        nested = _dataclass_in(hints[name])
        kwargs[name] = config_from_dict(nested, value) if nested and isinstance(value, dict) else value
    return cls(**kwargs)


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass type inside `X` or `X | None`, if any."""
    if dataclasses.is_dataclass(hint):
        return hint  # type: ignore[return-value]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg  # type: ignore[return-value]
    return None


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {str(path)!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {str(path)!r} is not valid YAML: {e}") from None
    return data or {}


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)
