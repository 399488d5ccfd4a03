"""Whether data decoded from JSON has the shape a dataclass expects, checked against the class's own type hints.

Used before trusting a file we wrote earlier (the state file): anything can be in it after a crash, a disk error,
a hand edit or an older version, and a wrong type found there must never surface later as a crash in the middle
of an upgrade. The hints are read from the dataclass itself, so a new field is checked without a second list.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any


class ShapeError(ValueError):
    """The data does not have the expected shape; the message says where and what."""


def build(cls: type, data: Any, where: str) -> Any:
    """An instance of dataclass `cls` from a JSON object, every field checked against its hint (unknown keys are
    ignored, a missing key without a default is an error); raises ShapeError."""
    if not isinstance(data, dict):
        raise ShapeError(f"{where}: expected an object, found {_kind(data)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in data:
            check(data[field.name], hints[field.name], f"{where}.{field.name}")
            values[field.name] = data[field.name]
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ShapeError(f"{where}: {field.name} is missing")
    return cls(**values)


def check(value: Any, hint: Any, where: str) -> None:
    """Raise ShapeError unless `value` (decoded JSON) fits `hint` (Any, None, bool, int, float, str, unions,
    dict[str, T], list[T], tuple[T, ...])."""
    if hint is Any:
        return
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if not any(_fits(value, option) for option in args):
            raise ShapeError(f"{where}: expected {_name(hint)}, found {_kind(value)}")
        return
    if origin is dict:
        _check_dict(value, args, where)
    elif origin in (list, tuple):
        if not isinstance(value, list):
            raise ShapeError(f"{where}: expected a list, found {_kind(value)}")
        for index, item in enumerate(value):
            check(item, args[0] if args else Any, f"{where}[{index}]")
    elif not _fits_scalar(value, hint):
        raise ShapeError(f"{where}: expected {_name(hint)}, found {_kind(value)}")


def _check_dict(value: Any, args: tuple[Any, ...], where: str) -> None:
    if not isinstance(value, dict):
        raise ShapeError(f"{where}: expected an object, found {_kind(value)}")
    for key, item in value.items():
        check(item, args[1] if args else Any, f"{where}.{key}")


def _fits(value: Any, hint: Any) -> bool:
    try:
        check(value, hint, "")
    except ShapeError:
        return False
    return True


def _fits_scalar(value: Any, hint: Any) -> bool:
    if hint is None or hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    raise TypeError(f"shapes.check does not know {hint!r}")  # a programming error: a hint this module cannot check


def _name(hint: Any) -> str:
    return " or ".join(_name(option) for option in typing.get_args(hint)) if typing.get_origin(hint) in (
        typing.Union, types.UnionType) else "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
