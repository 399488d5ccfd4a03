"""Every setting's type and range, in one table shared by the config file and the command line.

Each entry checks a value two ways. `check` takes it as the TOML file gives it and is strict: an integer must
be an integer — not "3", 2.9 or true — and a table of strings must not hold a table. `parse` also takes the
text of a command-line flag (and a value `check` already returned, so it can run twice). Both return the one
form `config.build` works with (seconds as a float, lists as tuples, env as pairs) and raise Invalid, which
says what was expected and what was given; the caller adds where the value came from:
`config /etc/app.toml: key 'processes': expected an integer from 1 to 1024, got "3"`.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .envfile import reference as env_file_reference
from .errors import UserError
from .listeners import parse_listen, parse_tcp_address
from .names import check_name
from .probe_spec import parse_probe
from .strategy import STRATEGIES, parse_amount
from .units import mib, parse_duration, parse_signal, parse_size

MAX_PROCESSES = 1024  # also the limit of `ctl scale`
_HOUR, _DAY = 3600.0, 86400.0
_INTEGER_TEXT = re.compile(r"\s*[+-]?\d{1,4000}\s*")  # Python converts up to 4300 digits


class Invalid(ValueError):
    """A value that does not fit its setting; the message is one line without the value's origin."""

    @classmethod
    def expected(cls, what: str, got: object) -> Invalid:
        return cls(f"expected {what}, got {shown(got)}")


def shown(value: object) -> str:
    """A value as the person wrote it, short: `"3"`, `true`, `2.9`, `inf`, `a table`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 40 else value[:40] + "…", ensure_ascii=False)
    if isinstance(value, int):
        digits = str(value)
        return digits if len(digits) <= 24 else f"{digits[:12]}… ({len(digits)} digits)"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, (datetime.date, datetime.time)):
        return "a date or time"
    return type(value).__name__


class Kind(Protocol):
    """One setting's type and range."""

    def check(self, value: Any) -> Any: ...

    def parse(self, value: Any) -> Any: ...


@dataclass(frozen=True)
class Integer:
    low: int
    high: int

    def check(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not self.low <= value <= self.high:
            raise Invalid.expected(f"an integer from {self.low} to {self.high}", value)
        return value

    def parse(self, value: Any) -> int:
        if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value):
            return self.check(int(value))
        return self.check(value)


@dataclass(frozen=True)
class Duration:
    low: float
    high: float

    def check(self, value: Any) -> float:
        what = f"a duration from {_human(self.low)} to {_human(self.high)} (like 250ms, 5s, 2m)"
        try:
            if isinstance(value, str):
                seconds = parse_duration(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                seconds = float(value)
            else:
                raise Invalid.expected(what, value)
        except (UserError, OverflowError):
            raise Invalid.expected(what, value) from None
        if not (math.isfinite(seconds) and self.low <= seconds <= self.high):
            raise Invalid.expected(what, value)
        return seconds

    parse = check


@dataclass(frozen=True)
class Size:
    """A number of bytes: `512M`, `2G`, `1500000K` (powers of 1024), or an integer of bytes."""

    low: int
    high: int

    def check(self, value: Any) -> int:
        what = f"a size from {mib(self.low)} to {mib(self.high)} (like 512M, 2G)"
        try:
            if isinstance(value, str):
                size = parse_size(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                size = value
            else:
                raise Invalid.expected(what, value)
        except UserError:
            raise Invalid.expected(what, value) from None
        if not self.low <= size <= self.high:
            raise Invalid.expected(what, value)
        return size

    parse = check


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or value not in self.values:
            raise Invalid.expected(f"one of {', '.join(self.values)}", value)
        return value

    parse = check


@dataclass(frozen=True)
class Text:
    """A string without NUL, at most `limit` characters; `pattern` (described by `meaning`) and `parser` (one
    of the option's own parsers, whose UserError is kept as it is) check its form."""

    limit: int
    pattern: str | None = None
    meaning: str = "text"
    parser: Callable[[str], object] | None = None

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or "\0" in value or len(value) > self.limit:
            raise Invalid.expected(self.meaning if self.pattern else f"{self.meaning} of at most {self.limit} characters",
                                   value)
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise Invalid.expected(self.meaning, value)
        if self.parser is not None:
            try:
                self.parser(value)
            except UserError as exc:
                raise Invalid(str(exc)) from None
        return value

    def parse(self, value: Any) -> str:
        return self.check(os.fspath(value) if isinstance(value, os.PathLike) else value)


@dataclass(frozen=True)
class Flag:
    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise Invalid.expected("true or false", value)
        return value

    def parse(self, value: Any) -> bool:
        return bool(value)


@dataclass(frozen=True)
class TextList:
    """A list of strings (or, where `single`, one string standing for a list of one)."""

    item: Text
    limit: int
    single: bool = False

    def check(self, value: Any) -> tuple[str, ...]:
        if self.single and isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or len(value) > self.limit:
            raise Invalid.expected(f"a list of at most {self.limit} strings" + (" (or one string)" if self.single else ""),
                                   value)
        return tuple(self.item.check(item) for item in value)

    def parse(self, value: Any) -> tuple[str, ...]:
        return self.check(tuple(self.item.parse(item) for item in value) if isinstance(value, (list, tuple)) else value)


@dataclass(frozen=True)
class Environment:
    """Variables for the children: a flat table of strings in the file, KEY=VALUE on the command line."""

    limit: int = 1024

    def check(self, value: Any) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, Mapping) or len(value) > self.limit:
            raise Invalid.expected(f"a table of at most {self.limit} variables", value)
        return tuple(self._pair(name, item) for name, item in value.items())

    def parse(self, value: Any) -> tuple[tuple[str, str], ...]:
        if isinstance(value, Mapping):
            return self.check(value)
        pairs = [item if isinstance(item, tuple) else _split(item) for item in value]
        if len(pairs) > self.limit:
            raise Invalid(f"at most {self.limit} variables")
        return tuple(self._pair(name, item) for name, item in pairs)

    @staticmethod
    def _pair(name: Any, value: Any) -> tuple[str, str]:
        if not isinstance(name, str) or not name or "=" in name or "\0" in name or len(name) > 256:
            raise Invalid.expected("a variable name (no '=', at most 256 characters)", name)
        if not isinstance(value, str) or "\0" in value or len(value) > 131072:
            raise Invalid(f"variable {name}: expected a string of at most 131072 characters, got {shown(value)}")
        return name, value


def _split(text: Any) -> tuple[str, str]:
    name, sep, value = str(text).partition("=")
    if not sep or not name:
        raise Invalid.expected("KEY=VALUE", text)
    return name, value


@dataclass(frozen=True)
class Amount:
    """--batch, --max-surge: a count of instances or a percentage of them; kept as text (`2`, `25%`)."""

    option: str

    def check(self, value: Any) -> str:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(Integer(1, MAX_PROCESSES).check(value))
        if not isinstance(value, str) or len(value) > 8:
            raise Invalid.expected(f"a count from 1 to {MAX_PROCESSES} or a percentage like 25%", value)
        try:
            parse_amount(value, self.option)
        except UserError as exc:
            raise Invalid(str(exc)) from None
        return value

    parse = check


def _human(seconds: float) -> str:
    if seconds == 0 or seconds >= 1:
        return f"{seconds / _HOUR:g}h" if seconds >= _HOUR else f"{seconds:g}s"
    return f"{seconds * 1000:g}ms"


_PATH = Text(4096, meaning="a path")
_COMMAND_LINE = Text(65536, meaning="a shell command")

SETTINGS: dict[str, Kind] = {
    "command": TextList(Text(131072), 4096),
    "listen": TextList(Text(4096, parser=lambda text: parse_listen(text, 0)), 256, single=True),
    "ready": Text(4096, parser=parse_probe),
    "ready_timeout": Duration(0.1, _DAY),
    "probe_timeout": Duration(0.01, _HOUR),
    "watch": Duration(0, _DAY),
    "health_interval": Duration(0.05, _HOUR),
    "health_threshold": Integer(1, 1000),
    "liveness_interval": Duration(0.05, _HOUR),
    "max_rss": Size(1 << 20, 16 << 40),
    "drain_signal": Text(32, parser=parse_signal),
    "drain_timeout": Duration(0, _DAY),
    "drain_delay": Duration(0, _HOUR),
    "ramp": Duration(0, _HOUR),
    "cutover": Choice(("steered", "shared")),
    "start_priority": Choice(("low", "normal")),
    "max_restarts": Integer(0, 1000),
    "restart_window": Duration(0.1, _DAY),
    "processes": Integer(1, MAX_PROCESSES),
    "strategy": Choice(STRATEGIES),
    "batch": Amount("--batch"),
    "max_surge": Amount("--max-surge"),
    "success_percent": Integer(1, 100),
    "upgrade_on_change": TextList(_PATH, 256, single=True),
    "change_settle": Duration(0, _HOUR),
    "pre_upgrade": _COMMAND_LINE,
    "post_upgrade": _COMMAND_LINE,
    "on_rollback": _COMMAND_LINE,
    "hook_timeout": Duration(0.1, _DAY),
    "chdir": _PATH,
    "user": Text(256, meaning="a user name or uid"),
    "group": Text(256, meaning="a group name or gid"),
    "env": Environment(),
    "env_file": TextList(Text(4096, meaning="a path", parser=env_file_reference), 64, single=True),
    "version_file": _PATH,
    "backlog": Integer(1, 65535),
    "nodelay": Flag(),
    "no_nodelay": Flag(),
    "unix_mode": Text(4, pattern="[0-7]{1,4}", meaning="an octal file mode like \"660\""),
    "name": Text(4096, parser=check_name),
    "control": _PATH,
    "metrics_listen": Text(4096, parser=lambda text: parse_tcp_address(text, "--metrics-listen")),
    "state_dir": _PATH,
    "pidfile": _PATH,
    "log_format": Choice(("text", "json")),
    "child_output": Choice(("prefix", "inherit")),
    "log_level": Choice(("debug", "info", "warning", "error")),
    "loop": Choice(("auto", "uvloop", "asyncio")),
}
_COMMAND_LINE_ONLY = frozenset({"no_nodelay"})
FILE_TABLES = {"hooks": {"pre_upgrade": "pre_upgrade", "post_upgrade": "post_upgrade", "on_rollback": "on_rollback",
                         "timeout": "hook_timeout"}}
FILE_KEYS = frozenset((set(SETTINGS) - _COMMAND_LINE_ONLY) | set(FILE_TABLES))


def choices(key: str) -> tuple[str, ...]:
    """The allowed values of an enumerated setting (for the command line's help)."""
    kind = SETTINGS[key]
    assert isinstance(kind, Choice)
    return kind.values


def flag(key: str) -> str:
    """How a person names the setting on the command line: `--health-interval` (or `command`)."""
    return "command" if key == "command" else "--" + key.replace("_", "-")


def file_options(data: Mapping[str, Any]) -> dict[str, Any]:
    """Option values from a parsed config file, each checked strictly; Invalid names the key at fault."""
    options: dict[str, Any] = {}
    for key, value in data.items():
        if key in FILE_TABLES:
            if not isinstance(value, Mapping):
                raise Invalid(f"key {key!r}: expected a table, got {shown(value)}")
            for name, item in value.items():
                known = FILE_TABLES[key]
                if name not in known:
                    raise Invalid(_unknown(f"{key}.{name}", (f"{key}.{other}" for other in known)))
                options[known[name]] = _checked(f"{key}.{name}", known[name], item)
        elif key not in FILE_KEYS:
            raise Invalid(_unknown(key, FILE_KEYS | {f"{table}.{name}" for table in FILE_TABLES for name in FILE_TABLES[table]}))
        elif key == "nodelay":
            options["no_nodelay"] = not _checked(key, key, value)
        else:
            options[key] = _checked(key, key, value)
    return options


def command_line_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Every option that has a value, parsed and range-checked; a UserError names the flag at fault."""
    values: dict[str, Any] = {}
    for key, value in options.items():
        if key not in SETTINGS or value is None:
            values[key] = value
            continue
        try:
            values[key] = SETTINGS[key].parse(value)
        except Invalid as exc:
            raise UserError(f"option {flag(key)}: {exc}") from None
    return values


def _checked(shown_key: str, key: str, value: Any) -> Any:
    try:
        return SETTINGS[key].check(value)
    except Invalid as exc:
        raise Invalid(f"key {shown_key!r}: {exc}") from None


def _unknown(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else " (see the options in supervise --help)")
