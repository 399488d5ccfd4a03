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

from . import envfile, schema
from .errors import UserError
from .listeners import ListenSpec, parse_listen, parse_tcp_address
from .names import default_name
from .probe_spec import ProbeSpec, parse_probe
from .strategy import Strategy, build_strategy
from .textfile import read_text
from .units import parse_signal


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
    liveness_interval: float = 10.0  # between the serving generation's health and --max-rss checks
    max_rss: int | None = None  # bytes an instance's process tree may hold; None: no limit
    drain_signal: signal.Signals = signal.SIGTERM
    drain_timeout: float = 30.0
    drain_delay: float = 1.0
    ramp: float = 0.0
    cutover: str = "steered"
    start_priority: str = "low"
    name: str = "supervise"
    control: Path | None = None
    metrics_listen: ListenSpec | None = None  # the read-only TCP endpoint of /metrics and /status
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
    env: tuple[tuple[str, str], ...] = ()  # with the --env-file variables under the explicit ones
    env_file: tuple[envfile.EnvFile, ...] = ()  # read again with the config file on every upgrade
    version_file: str | None = None
    hooks: Hooks = field(default_factory=Hooks)
    log_format: str = "text"
    log_level: str = "info"
    child_output: str = "prefix"  # the children's stdout and stderr: through supervise's log, or inherited as is
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
          "change_settle", "cutover", "metrics_listen", "child_output", "liveness_interval")
_DURATIONS = ("ready_timeout", "probe_timeout", "watch", "health_interval", "liveness_interval", "drain_timeout",
              "drain_delay", "ramp", "restart_window", "change_settle")
_COUNTS = ("health_threshold", "max_restarts", "backlog", "processes")
_PATHS = ("control", "state_dir", "pidfile")


@dataclass(frozen=True)
class Sources:
    """Where settings came from, kept so the file can be read again: the file, and the command line's values."""

    path: Path | None  # None: no config file, only --env-file to read again
    options: Mapping[str, Any]  # every option as parsed, defaults included
    explicit: frozenset[str]  # the options actually given on the command line: they win over the file


def read_file(path: Path) -> dict[str, Any]:
    """A TOML config file as option values (the same names as the flags, with underscores), each checked
    against the schema; any fault is one UserError line naming the file (and the key)."""
    try:
        data = tomllib.loads(read_text(path, "config"))
        return schema.file_options(data)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"config {path}: invalid TOML: {exc}") from None
    except RecursionError:
        raise UserError(f"config {path}: invalid TOML: nested too deeply") from None
    except schema.Invalid as exc:
        raise UserError(f"config {path}: {exc}") from None
    except ValueError:  # an integer of more digits than Python converts
        raise UserError(f"config {path}: invalid TOML: a number too long to read") from None


def build(options: Mapping[str, Any], sources: Sources | None = None) -> Settings:
    """Validated Settings from option values (flags, file or both); raises UserError with one clear line."""
    values = schema.command_line_options(options)
    command = values.get("command") or ()
    if not command:
        raise UserError("no command given: usage: supervise [OPTIONS] -- COMMAND [ARG...] (or command = [...] in --config)")
    listen = tuple(parse_listen(item, index) for index, item in enumerate(values.get("listen") or ()))
    env_file = tuple(envfile.reference(item) for item in values.get("env_file") or ())
    text = {key: values.get(key) or None for key in ("ready", "chdir", "user", "group", "version_file", "unix_mode",
                                                     "pre_upgrade", "post_upgrade", "on_rollback")}
    return Settings(
        command=command,
        listen=listen,
        ready=parse_probe(text["ready"]) if text["ready"] else None,
        **{key: values[key] for key in (*_DURATIONS, *_COUNTS)},
        drain_signal=parse_signal(values.get("drain_signal") or "TERM"),
        name=values.get("name") or default_name(command, listen),
        **{key: Path(values[key]) if values.get(key) else None for key in _PATHS},
        metrics_listen=parse_tcp_address(values["metrics_listen"], "--metrics-listen") if values.get("metrics_listen")
        else None,
        nodelay=not values.get("no_nodelay"),
        max_rss=values.get("max_rss"),
        unix_mode=int(text["unix_mode"], 8) if text["unix_mode"] else None,
        chdir=text["chdir"],
        user=text["user"],
        group=text["group"],
        env=envfile.environment(env_file, values.get("env") or ()),
        env_file=env_file,
        version_file=text["version_file"],
        upgrade_on_change=tuple(os.path.abspath(item) for item in values.get("upgrade_on_change") or ()),
        hooks=Hooks(text["pre_upgrade"], text["post_upgrade"], text["on_rollback"], values["hook_timeout"]),
        log_format=values.get("log_format") or "text",
        log_level=values.get("log_level") or "info",
        child_output=values.get("child_output") or "prefix",
        loop=values.get("loop") or "auto",
        cutover=values.get("cutover") or "steered",
        start_priority=values.get("start_priority") or "low",
        strategy=build_strategy(values.get("strategy"), values.get("batch"), values.get("max_surge"),
                                values.get("success_percent", 100)),
        sources=sources,
    )


def from_command_line(options: Mapping[str, Any], explicit: frozenset[str], config: Path | None) -> Settings:
    """Settings at start-up: defaults, overlaid by the config file (if any), overlaid by explicit flags. With a
    config file or an env file, the sources are kept to be read again on each upgrade."""
    if config is None and not options.get("env_file"):
        return build(options)
    sources = Sources(config, dict(options), explicit)
    return build(_layered(sources), sources)


def reread(current: Settings) -> Settings:
    """The settings with the config file and env files read again (for an upgrade); what cannot change live is kept."""
    if current.sources is None:
        return current
    fresh = build(_layered(current.sources), current.sources)
    return dataclasses.replace(fresh, **{key: getattr(current, key) for key in _FIXED})


def invalid(exc: UserError) -> str:
    """Why an upgrade is refused for its settings: "invalid config /etc/app.toml: …" when the file is named (or
    "invalid env file /etc/app.env line 3: …")."""
    message = str(exc)
    if message.startswith("cannot read env file "):
        return message
    return f"invalid {message}" if message.startswith(("config ", "env file ")) else f"invalid config: {message}"


def _layered(sources: Sources) -> dict[str, Any]:
    if sources.path is None:
        return dict(sources.options)
    from_file = {key: value for key, value in read_file(sources.path).items() if key not in sources.explicit}
    return {**sources.options, **from_file}
