"""Strict YAML -> dataclass loading: unknown keys and missing required keys are errors, nested
dataclass sections are built recursively, and ``__post_init__`` checks run as usual."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


def from_dict(cls: type[T], values: Mapping[str, Any] | None, source: str = "config") -> T:
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; known keys: {sorted(fields)}")
    missing = sorted(
        name for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and name not in values
    )
    if missing:
        raise ValueError(f"{source}: missing keys {missing}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        hint = _section_type(hints.get(name))
        if hint is not None and isinstance(value, Mapping):
            values[name] = from_dict(hint, value, f"{source}.{name}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from None


def _section_type(hint: Any) -> type | None:
    """The dataclass of a section field (``Section`` or ``Optional[Section]``), else None."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def load_yaml(cls: type[T], path: str | Path, section: str | None = None,
              overrides: dict[str, Any] | None = None, what: str = "config") -> T:
    """``cls`` from a YAML file (or its ``section``), top-level ``overrides`` (command-line
    flags) applied before the strict check."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    values = yaml.safe_load(path.read_text()) or {}
    if section is not None and section in values:
        values = values[section]
    values.update(overrides or {})
    return from_dict(cls, values, source=str(path))


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
