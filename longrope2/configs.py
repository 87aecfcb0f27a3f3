"""Strict YAML -> dataclass loading: unknown keys and missing required keys are errors, nested
dataclass sections are built recursively, and ``__post_init__`` checks run as usual."""

from __future__ import annotations

import dataclasses
import functools
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import pydantic
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
        many = _sections_type(hints.get(name))
        if hint is not None and isinstance(value, Mapping):
            values[name] = from_dict(hint, value, f"{source}.{name}")
        elif many is not None:
            values[name] = _sections(many, value, f"{source}.{name}")
        elif hint is None and name in hints:
            values[name] = _checked(value, hints[name], f"{source}.{name}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from None


@functools.lru_cache(maxsize=None)
def _adapter(hint: Any) -> pydantic.TypeAdapter | None:
    try:
        return pydantic.TypeAdapter(hint)
    except pydantic.PydanticSchemaGenerationError:  # a type pydantic cannot express: __post_init__ checks it
        return None


def _checked(value: Any, hint: Any, where: str) -> Any:
    """``value`` as the field's annotated type (pydantic's lax rules: ``"3"`` or ``3.0`` for an
    int, ``1`` for a float), or a ``ValueError`` naming the field, the value and the type."""
    adapter = _adapter(hint)
    if adapter is None:
        return value
    try:
        return adapter.validate_python(value)
    except pydantic.ValidationError as error:
        first = error.errors()[0]
        return_type = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        raise ValueError(f"{where}: {first['msg'].lower()}, got {value!r} (expected {return_type})") from None


def _section_type(hint: Any) -> type | None:
    """The dataclass of a section field (``Section`` or ``Optional[Section]``), else None."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _sections_type(hint: Any) -> tuple[type, type] | None:
    """``(list, Section)`` for ``list[Section]``, ``(dict, Section)`` for ``dict[str, Section]``."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is list and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return list, args[0]
    if typing.get_origin(hint) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return dict, args[1]
    return None


def _sections(kind: tuple[type, type], value: Any, where: str):
    container, section = kind
    if container is list:
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise ValueError(f"{where}: expected a list of {section.__name__} sections, got {value!r}")
        return [from_dict(section, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
        raise ValueError(f"{where}: expected NAME: {section.__name__} sections, got {value!r}")
    return {str(k): from_dict(section, v, f"{where}.{k}") for k, v in value.items()}


def load_yaml(cls: type[T], path: str | Path, section: str | None = None,
              overrides: dict[str, Any] | None = None, what: str = "config") -> T:
    """``cls`` from a YAML file (or its ``section``), top-level ``overrides`` (command-line
    flags) applied before the strict check."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    values = parse_yaml(path) or {}
    if not isinstance(values, Mapping):
        raise ValueError(f"{path}: expected a mapping of keys to values, got a YAML {type(values).__name__}")
    if section is not None and section in values:
        values = values[section]
    values.update(overrides or {})
    return from_dict(cls, values, source=str(path))


def parse_yaml(path: str | Path) -> Any:
    """A YAML file's contents; a syntax error is a ``ValueError`` naming the file and the line."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{path}: not valid YAML: {problem}{where}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
