"""Process-level set-up around the Supervisor: resolve, bind, write the pidfile, run the event loop, clean up.

Everything that can fail because of user input fails here, before any child is started, as a UserError.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio

from . import carryover, leftovers, libc, reexec, revive, steering
from .cgroups import Cgroups
from .config import Settings
from .control.metrics_http import MetricsServer
from .control.server import ControlServer
from .credentials import resolve as resolve_credentials
from .errors import UserError
from .event_kinds import Kind
from .events import Events
from .fdlimit import raise_fd_limit
from .history import History
from .listeners import Listener, inherited_from_systemd, open_listeners
from .logsink import stderr_sink
from .notify import SystemdNotifier
from .release import check_templates, logical_cwd, resolve
from .release_book import ReleaseBook
from .rundir import RuntimeDir, own_directory, runtime_parent
from .safefile import write_atomically
from .spawn import ExecutableNotFound
from .supervisor import Supervisor
from .traffic import Traffic


def _backend_options(loop: str) -> dict[str, object]:
    if loop == "asyncio":
        return {}
    try:
        import uvloop  # noqa: F401 - only checking that it can be used
    except ImportError:
        if loop == "uvloop":
            raise UserError("--loop uvloop: uvloop is not installed") from None
        return {}
    return {"use_uvloop": True}


def _check_writable(path: Path, what: str) -> None:
    """Fail early, with one line, if `path` cannot be created where it is asked for."""
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise UserError(f"cannot write {what} {path}: {exc.strerror}") from None
    if path.is_dir():
        raise UserError(f"cannot write {what} {path}: it is a directory")
    if not os.access(directory, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"cannot write {what} {path}: permission denied")


def _check_directories(settings: Settings) -> None:
    """The control socket's and the state's directories must be ours (see rundir.own_directory)."""
    own_directory(settings.control_path.parent, "control socket directory", private=settings.control is None)
    if settings.state_dir is not None:
        own_directory(settings.state_dir, "state directory", private=False)


def _write_pidfile(path: Path) -> None:
    try:
        write_atomically(path, f"{os.getpid()}\n".encode(), 0o644)
    except OSError as exc:
        raise UserError(f"cannot write pidfile {path}: {exc.strerror}") from None


def _remove_pidfile(path: Path) -> None:
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except OSError:
        pass


def run(settings: Settings) -> int:
    """Run the supervisor to completion and return its exit code; its log never blocks it (logsink.py). After a
    re-exec (reexec.py) it revives what the old image held instead; in check mode it only says whether it could."""
    if (checking := os.environ.get(reexec.CHECK_ENV)) is not None:
        return reexec.check_mode(Path(checking), _backend_options(settings.loop))
    carried = os.environ.pop(reexec.STATE_ENV, None)
    events = Events(settings.log_format, settings.log_level)
    with stderr_sink(events.dropped_line) as sink:
        events.sink = sink
        try:
            return _revive(settings, events, Path(carried)) if carried else _run(settings, events)
        finally:
            events.sink = None  # the sink's descriptor is closed next: nothing may write to it any more


def _run(settings: Settings, events: Events) -> int:
    fd_limit = raise_fd_limit()
    if fd_limit is not None:
        events.emit(Kind.FD_LIMIT_RAISED, f"open-files limit raised from {fd_limit.soft} to {fd_limit.hard} (children "
                    f"keep {fd_limit.soft})", level="debug", soft=fd_limit.soft, hard=fd_limit.hard)
    try:
        release = resolve(settings.command, logical_cwd(settings.chdir), settings.env, os.environ.get("PATH"),
                          settings.version_file)
    except ExecutableNotFound as exc:
        raise UserError(str(exc)) from None
    backend_options = _backend_options(settings.loop)
    credentials = resolve_credentials(settings.user, settings.group)
    if settings.pidfile:
        _check_writable(settings.pidfile, "pidfile")
    _check_writable(settings.control_path, "control socket")
    _check_directories(settings)
    parent = runtime_parent()
    leftovers.remove(settings.name, settings.listen, {os.getuid(), *([credentials.uid] if credentials else [])}, events)
    inherited = inherited_from_systemd(os.environ)
    traffic = Traffic(events, steer=settings.cutover == "steered" and steering.supported())
    listeners: list[Listener] = open_listeners(settings.listen, settings.backlog, settings.nodelay, settings.unix_mode,
                                               inherited, lambda spec: traffic.steerable(spec, adopted=False))
    runtime_dir: RuntimeDir | None = None
    control = ControlServer(settings.control_path)
    metrics = MetricsServer(settings.metrics_listen) if settings.metrics_listen else None
    cgroups = Cgroups.setup(settings.name, events)
    try:
        check_templates(settings.command, [listener.name for listener in listeners])
        book = ReleaseBook(History.load(settings.state_path, events), events)
        control.bind()
        metrics_address = metrics.bind() if metrics else None
        events.emit(Kind.STARTING, f"supervise {settings.name} starting (pid {os.getpid()}): control socket "
                    f"{settings.control_path}, state {settings.state_path}", name=settings.name,
                    control=str(settings.control_path), state=str(settings.state_path))
        for listener in listeners:
            how = "adopted from systemd" if listener.adopted else "listening"
            events.emit(Kind.LISTENING, f"{how} on {listener.address} (fd {3 + listeners.index(listener)} in children, "
                        f"name {listener.name})", name=listener.name, address=listener.address, adopted=listener.adopted)
        if metrics_address is not None:
            events.emit(Kind.METRICS_LISTENING, f"metrics on http://{metrics_address}/metrics (and /status), read-only",
                        address=metrics_address)
        if settings.pidfile:
            _write_pidfile(settings.pidfile)
        runtime_dir = RuntimeDir.create(parent, shared=credentials is not None)
        supervisor = Supervisor(settings, listeners, events, release, book,
                                systemd=SystemdNotifier.from_environ(os.environ), credentials=credentials,
                                child_fd_limit=fd_limit.pair if fd_limit else None, cgroups=cgroups,
                                runtime_dir=str(runtime_dir.path), control=control, metrics=metrics,
                                traffic=traffic, held=_held(control, metrics, runtime_dir))
        return _serve(supervisor, backend_options)
    finally:
        _clean_up(settings, control, metrics, cgroups, listeners, runtime_dir)


def _held(control: ControlServer, metrics: MetricsServer | None, runtime_dir: RuntimeDir) -> dict[str, int]:
    """The descriptors besides listeners and notify sockets that a re-exec keeps open, by name."""
    assert control.sock is not None
    held = {"control": control.sock.fileno(), "runtime_lock": runtime_dir.lock}
    if metrics is not None and metrics.listener is not None:
        held["metrics"] = metrics.listener.sock.fileno()
    return held


def _serve(supervisor: Supervisor, backend_options: dict[str, object]) -> int:
    libc.set_child_subreaper()
    return anyio.run(supervisor.run, backend="asyncio", backend_options=backend_options)


def _clean_up(settings: Settings, control: ControlServer, metrics: MetricsServer | None, cgroups: Cgroups | None,
              listeners: list[Listener], runtime_dir: RuntimeDir | None) -> None:
    control.close()
    if metrics is not None:
        metrics.close()
    if cgroups is not None:
        cgroups.close()
    for listener in listeners:
        listener.close()
    if settings.pidfile:
        _remove_pidfile(settings.pidfile)
    if runtime_dir is not None:
        runtime_dir.remove()


def _revive(settings: Settings, events: Events, path: Path) -> int:
    """The new image after a re-exec: everything the old one held, from the state it wrote and the descriptors
    it kept open; nothing is bound, checked against leftovers or started (the children never stopped)."""
    try:
        state = carryover.load(path.read_bytes())
    except (OSError, carryover.Unreadable) as exc:  # the check read this very file: only a bug gets here
        raise UserError(f"cannot revive after a re-exec from {path}: {exc}") from None
    finally:
        path.unlink(missing_ok=True)
    own, held = state["supervisor"], state["held"]
    revive.close_on_exec(state)
    listeners = revive.listeners(state)
    traffic = Traffic(events, steer=state["traffic"]["steer"])
    revive.traffic(traffic, state["traffic"], listeners)
    control = ControlServer(settings.control_path)
    control.adopt(held["control"])
    metrics = MetricsServer(settings.metrics_listen) if settings.metrics_listen else None
    if metrics is not None and "metrics" in held:
        metrics.adopt(held["metrics"])
    cgroups = Cgroups(Path(state["fleet"]["cgroups"][0]), Path(state["fleet"]["cgroups"][1]), events) \
        if state["fleet"]["cgroups"] else None
    runtime_dir = RuntimeDir(Path(own["runtime_dir"]), held["runtime_lock"])
    try:
        book = ReleaseBook(History.load(settings.state_path, events), events,
                           revive.release(state["previous"]) if state["previous"] else None)
        limit = own["child_fd_limit"]
        supervisor = Supervisor(settings, [listeners[fd] for fd in state["fleet"]["listeners"]], events,
                                revive.release(state["release"]), book,
                                systemd=SystemdNotifier.from_environ(os.environ),
                                credentials=resolve_credentials(settings.user, settings.group),
                                child_fd_limit=(limit[0], limit[1]) if limit else None, cgroups=cgroups,
                                runtime_dir=own["runtime_dir"], control=control, metrics=metrics, traffic=traffic,
                                carried=revive.Carried(state, listeners), held=dict(held))
        return _serve(supervisor, _backend_options(settings.loop))
    finally:
        _clean_up(settings, control, metrics, cgroups, list(listeners.values()), runtime_dir)
