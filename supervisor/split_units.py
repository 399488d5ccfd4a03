"""A value split from its unit on the command line: `supervise --watch 5 sec -- app`.

The run form stops reading options at the first word that is not one (the command may have options of its own),
so `5` is taken as the duration in seconds and `sec` as the command to run, `--` and `app` as its arguments. A
bare number followed by a unit word, before any `--`, is refused with the one-word spelling instead."""

from __future__ import annotations

import re
from collections.abc import Sequence

from . import schema
from .errors import UserError

_NUMBER = re.compile(r"\s*(\d+(\.\d+)?|\.\d+)\s*")
_DURATION_UNITS = {"ms": "ms", "msec": "ms", "msecs": "ms", "millisecond": "ms", "milliseconds": "ms",
                   "s": "s", "sec": "s", "secs": "s", "second": "s", "seconds": "s",
                   "m": "m", "min": "m", "mins": "m", "minute": "m", "minutes": "m",
                   "h": "h", "hr": "h", "hrs": "h", "hour": "h", "hours": "h"}
_SIZE_UNIT = re.compile(r"([kmgt])(i?b)?|kilobytes?|megabytes?|gigabytes?|terabytes?", re.IGNORECASE)


def _units(kind: schema.Kind, word: str) -> str | None:
    """The unit `word` spells, as one word after a number, for a setting of that kind; None if it is none."""
    if isinstance(kind, schema.Duration):
        return _DURATION_UNITS.get(word.lower())
    if isinstance(kind, schema.Size) and _SIZE_UNIT.fullmatch(word):
        return word[0].upper()
    return None


def refuse_split_units(args: Sequence[str]) -> None:
    """Raise UserError for `--watch 5 sec` (or `--watch=5 sec`, `--max-rss 512 M`) before the command's `--`."""
    kinds = {schema.flag(key): kind for key, kind in schema.SETTINGS.items()
             if isinstance(kind, (schema.Duration, schema.Size))}
    for index, arg in enumerate(args):
        if arg == "--":
            return
        option, equals, value = arg.partition("=")
        if option not in kinds:
            continue
        following = index + 1 if equals else index + 2
        if not equals:
            value = args[index + 1] if index + 1 < len(args) else ""
        if following < len(args) and _NUMBER.fullmatch(value):
            unit = _units(kinds[option], args[following])
            if unit is not None:
                written = f"{value.strip()} {args[following]}"
                raise UserError(f"option {option}: {written!r} is two words, and {args[following]!r} would be run as "
                                f"the command; write {value.strip()}{unit}")
