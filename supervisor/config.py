"""Typed, validated settings: everything the supervisor needs to know, checked before anything starts.

Settings come from three layers: option defaults, then a TOML file (--config), then flags given on the
command line. The file is read again on every upgrade, so a new command line, environment, probe or listener
reaches the next generation; the same builder validates both, so a bad file is refused like a bad flag.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .listeners import ListenSpec, parse_listen
from .probes import ProbeSpec, parse_probe
from .strategy import Strategy, build_strategy
from .units import parse_duration, parse_signal


def default_runtime_dir() -> Path:
    """Where per-user runtime files live: $XDG_RUNTIME_DIR/supervise, /run/supervise as root, else the temp dir."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "supervise"
    if os.geteuid() == 0:
        return Path("/run/supervise")
    return Path(os.environ.get("TMPDIR") or "/tmp") / f"supervise-{os.getuid()}"


@dataclass(frozen=True)
class Hooks:
    """Operator commands run around an upgrade (shell command lines)."""

    pre_upgrade: str | None = None
    post_upgrade: str | None = None
    on_rollback: str | None = None
    timeout: float = 60.0


@dataclass(frozen=True)
class Settings:
    """Everything one supervisor run is configured with."""

    command: tuple[str, ...]
    listen: tuple[ListenSpec, ...] = ()
    ready: ProbeSpec | None = None
    ready_timeout: float = 60.0
    probe_timeout: float = 2.0
    watch: float = 5.0
    health_interval: float = 1.0
    health_threshold: int = 3
    drain_signal: signal.Signals = signal.SIGTERM
    drain_timeout: float = 30.0
    name: str = "supervise"
    control: Path | None = None
    state_dir: Path | None = None
    pidfile: Path | None = None
    max_restarts: int = 5
    restart_window: float = 60.0
    backlog: int = 4096
    nodelay: bool = True
    unix_mode: int | None = None
    chdir: str | None = None
    user: str | None = None
    group: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    version_file: str | None = None
    hooks: Hooks = field(default_factory=Hooks)
    log_format: str = "text"
    log_level: str = "info"
    loop: str = "auto"
    upgrade_on_change: tuple[str, ...] = ()
    change_settle: float = 1.0
    processes: int = 1
    strategy: Strategy = field(default_factory=Strategy)
    sources: Sources | None = field(default=None, compare=False)

    @property
    def control_path(self) -> Path:
        """The control socket's path: --control, else derived from --name."""
        return self.control or default_runtime_dir() / f"{self.name}.sock"

    @property
    def state_path(self) -> Path:
        """Where rollout history and last-known-good/bad persist: --state-dir, else beside the control socket."""
        return (self.state_dir or self.control_path.parent) / f"{self.name}.state.json"


# Options a running supervisor cannot change: a re-read file keeps the values it started with.
_FIXED = ("name", "control", "state_dir", "pidfile", "log_format", "log_level", "loop", "sources", "upgrade_on_change",
          "change_settle")
_DURATIONS = ("ready_timeout", "probe_timeout", "watch", "health_interval", "drain_timeout", "restart_window", "hook_timeout",
              "change_settle")
_COUNTS = {"health_threshold": 1, "max_restarts": 0, "backlog": 1, "processes": 1}
_TEXTS = ("ready", "drain_signal", "name", "chdir", "user", "group", "unix_mode", "pre_upgrade", "post_upgrade",
          "on_rollback", "log_format", "log_level", "loop", "version_file")
_PATHS = ("control", "state_dir", "pidfile")
_FILE_TABLES = {"hooks": {"pre_upgrade": "pre_upgrade", "post_upgrade": "post_upgrade", "on_rollback": "on_rollback",
                          "timeout": "hook_timeout"}}
_STRATEGY = ("strategy", "batch", "max_surge", "success_percent")
FILE_KEYS = frozenset((*_DURATIONS, *_COUNTS, *_TEXTS, *_PATHS, *_STRATEGY, "listen", "command", "env", "nodelay", "hooks",
                       "upgrade_on_change"))


@dataclass(frozen=True)
class Sources:
    """Where settings came from, kept so the file can be read again: the file, and the command line's values."""

    path: Path
    options: Mapping[str, Any]  # every option as parsed, defaults included
    explicit: frozenset[str]  # the options actually given on the command line: they win over the file


def read_file(path: Path) -> dict[str, Any]:
    """A TOML config file as option values (the same names as the flags, with underscores)."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read config {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"invalid config {path}: {exc}") from None
    unknown = sorted(set(data) - FILE_KEYS)
    if unknown:
        raise UserError(f"invalid config {path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(FILE_KEYS))})")
    options: dict[str, Any] = {}
    for key, value in data.items():
        if key in _FILE_TABLES:
            table = _expect(path, key, value, dict)
            for name, item in table.items():
                if name not in _FILE_TABLES[key]:
                    raise UserError(f"invalid config {path}: unknown key {key}.{name}")
                options[_FILE_TABLES[key][name]] = item
        elif key == "nodelay":
            options["no_nodelay"] = not _expect(path, key, value, bool)
        elif key == "env":
            options["env"] = [f"{name}={item}" for name, item in _expect(path, key, value, dict).items()]
        elif key in ("listen", "command", "upgrade_on_change"):
            options[key] = [value] if key != "command" and isinstance(value, str) else _expect(path, key, value, list)
        else:
            options[key] = value
    return options


def _expect(path: Path, key: str, value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise UserError(f"invalid config {path}: {key} must be a {kind.__name__}, not {type(value).__name__}")
    return value


def _duration(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"invalid {key}: {value!r} is not a duration")
    return float(value) if not isinstance(value, str) else parse_duration(value, key.replace("_", "-"))


def _count(key: str, value: Any) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise UserError(f"invalid {key}: {value!r} is not a whole number") from None
    if number < _COUNTS[key]:
        raise UserError(f"invalid {key}: {number} is below {_COUNTS[key]}")
    return number


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = str(text).partition("=")
    if not sep or not key:
        raise UserError(f"invalid env {text!r}: expected KEY=VALUE")
    return key, value


def _octal(text: Any) -> int | None:
    if text is None:
        return None
    try:
        return int(str(text), 8)
    except ValueError:
        raise UserError(f"invalid unix-mode {text!r}: expected an octal mode like 660") from None


def _text(options: Mapping[str, Any], key: str) -> str | None:
    return None if options.get(key) is None else str(options[key])


def build(options: Mapping[str, Any], sources: Sources | None = None) -> Settings:
    """Validated Settings from option values (flags, file or both); raises UserError with one clear line."""
    command = tuple(str(arg) for arg in options.get("command") or ())
    if not command:
        raise UserError("no command given: usage: supervise [OPTIONS] -- COMMAND [ARG...] (or command = [...] in --config)")
    text = {key: (str(options[key]) if options.get(key) is not None else None) for key in _TEXTS}
    return Settings(
        command=command,
        listen=tuple(parse_listen(str(item), index) for index, item in enumerate(options.get("listen") or ())),
        ready=parse_probe(text["ready"]) if text["ready"] else None,
        **{key: _duration(key, options[key]) for key in _DURATIONS if key != "hook_timeout"},
        **{key: _count(key, options[key]) for key in _COUNTS},
        drain_signal=parse_signal(text["drain_signal"]),
        name=text["name"] or os.path.basename(command[0]) or "supervise",
        **{key: Path(options[key]) if options.get(key) else None for key in _PATHS},
        nodelay=not options.get("no_nodelay"),
        unix_mode=_octal(text["unix_mode"]),
        chdir=text["chdir"],
        user=text["user"],
        group=text["group"],
        env=tuple(_env_pair(item) for item in options.get("env") or ()),
        version_file=text["version_file"],
        upgrade_on_change=tuple(os.path.abspath(str(item)) for item in options.get("upgrade_on_change") or ()),
        hooks=Hooks(text["pre_upgrade"], text["post_upgrade"], text["on_rollback"],
                    _duration("hook_timeout", options["hook_timeout"])),
        log_format=text["log_format"] or "text",
        log_level=text["log_level"] or "info",
        loop=text["loop"] or "auto",
        strategy=build_strategy(_text(options, "strategy"), _text(options, "batch"), _text(options, "max_surge"),
                                options.get("success_percent", 100)),
        sources=sources,
    )


def from_command_line(options: Mapping[str, Any], explicit: frozenset[str], config: Path | None) -> Settings:
    """Settings at start-up: defaults, overlaid by the config file (if any), overlaid by explicit flags."""
    if config is None:
        return build(options)
    sources = Sources(config, dict(options), explicit)
    return build(_layered(sources), sources)


def reread(current: Settings) -> Settings:
    """The settings with the config file read again (for an upgrade); what cannot change live is kept."""
    if current.sources is None:
        return current
    fresh = build(_layered(current.sources), current.sources)
    return dataclasses.replace(fresh, **{key: getattr(current, key) for key in _FIXED})


def _layered(sources: Sources) -> dict[str, Any]:
    from_file = {key: value for key, value in read_file(sources.path).items() if key not in sources.explicit}
    return {**sources.options, **from_file}
