"""Typed, validated settings: everything the supervisor needs to know, checked before anything starts."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .listeners import ListenSpec, parse_listen
from .probes import ProbeSpec, parse_probe
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
    hooks: Hooks = field(default_factory=Hooks)
    log_format: str = "text"
    log_level: str = "info"
    loop: str = "auto"

    @property
    def control_path(self) -> Path:
        """The control socket's path: --control, else derived from --name."""
        return self.control or default_runtime_dir() / f"{self.name}.sock"

    @property
    def state_path(self) -> Path:
        """Where rollout history and last-known-good/bad persist: --state-dir, else beside the control socket."""
        return (self.state_dir or self.control_path.parent) / f"{self.name}.state.json"
