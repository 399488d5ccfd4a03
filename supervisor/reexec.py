"""Re-executing the supervisor in place (`supervise ctl reexec`): the supervise installed now replaces the running
one in the same pid, so every child keeps its parent, its parent-death signal and its sockets — systemd's
daemon-reexec, einhorn's `upgrade`, nginx's binary upgrade without a second master.

The steps, each of which can refuse and leave the running supervisor exactly as it was:
1. the state (carryover.py) is written to a file in the private runtime directory;
2. the new supervise runs once in check mode, with the same arguments: it imports every module it has, parses
   the arguments and config file as the new version reads them, and reads the state file; a broken install
   (an import error, a flag the new version refuses, a state it cannot read) fails here, with its last line;
3. the carried descriptors lose close-on-exec, every signal is blocked (one that arrives during the exec waits
   for the new image's handlers instead of killing the supervisor, and with it the children), and execve.

The new image is started the way this one was (sys.orig_argv: the console script, or `python -m supervisor`),
so a new package in the same environment, or a new interpreter behind the same path, is what runs.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from .carryover import carried_fds, encode
from .event_kinds import Kind
from .events import Events
from .reaper import Reaper
from .spawn import ProcessSpec, SpawnError, spawn

STATE_ENV = "SUPERVISE_REEXEC_STATE"  # the new image revives from this file
CHECK_ENV = "SUPERVISE_REEXEC_CHECK"  # check mode: read this state file, say whether it can be revived, exit
CHECK_TIMEOUT = 60.0
_STATE_NAME = "reexec.json"
_OUTPUT_NAME = "reexec-check.log"
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_TAIL = 4096


def command() -> list[str]:
    """How this supervisor was started: the interpreter and every argument after it."""
    return [sys.executable, *sys.orig_argv[1:]]


def write_state(runtime_dir: str, data: bytes) -> Path:
    """The state file, created anew (never through a link) and readable by us alone."""
    path = Path(runtime_dir) / _STATE_NAME
    path.unlink(missing_ok=True)  # one a failed re-exec left: the directory is ours alone
    fd = os.open(path, _CREATE, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    return path


async def check(state: Path, reaper: Reaper) -> str | None:
    """Run the new supervise in check mode: None if it can revive from `state`, else its last line of output."""
    output_path = state.with_name(_OUTPUT_NAME)
    output_path.unlink(missing_ok=True)
    output = os.open(output_path, _CREATE, 0o600)
    env = {**os.environ, CHECK_ENV: str(state)}
    env.pop(STATE_ENV, None)
    try:
        try:
            pid = spawn(ProcessSpec(sys.executable, tuple(command()), env, output=output))
        except SpawnError as exc:
            return str(exc)
        child = reaper.watch(pid)
        with anyio.move_on_after(CHECK_TIMEOUT):
            status = await child.wait()
            return None if status.ok else f"{status.describe()}: {_last_line(output_path) or 'no output'}"
        os.killpg(pid, signal.SIGKILL)
        return f"no answer within {CHECK_TIMEOUT:g}s"
    finally:
        os.close(output)
        output_path.unlink(missing_ok=True)


def _last_line(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - _TAIL))
            lines = handle.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def execute(state: Path, fds: list[int]) -> str:
    """Replace this process with the new supervise, reviving from `state`. Returns only if execve failed: why
    (the descriptors and the signal mask are as they were)."""
    for fd in fds:
        os.set_inheritable(fd, True)
    env = {**os.environ, STATE_ENV: str(state)}
    env.pop(CHECK_ENV, None)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        os.execve(sys.executable, command(), env)
    except OSError as exc:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for fd in fds:
            os.set_inheritable(fd, False)
        return f"cannot execute {shlex.join(command())}: {exc.strerror or exc}"
    raise AssertionError("execve returned without an error")  # pragma: no cover - it never does


@dataclass
class Reexec:
    """One re-exec, run by the supervisor while it holds its operations lock: `carry` says what is held now,
    `refusal` whether an operation came meanwhile."""

    events: Events
    reaper: Reaper
    runtime_dir: str
    carry: Callable[[], dict[str, Any]]
    refusal: Callable[[], str | None]

    async def run(self, answer: Callable[[str], Awaitable[None]]) -> str:
        """Check, answer the client, write the state again and execve; why not, if it does not happen."""
        path = write_state(self.runtime_dir, encode(self.carry()))
        try:
            if (failure := await check(path, self.reaper)) is not None:
                return f"the new supervise failed its check: {failure}"
            if (why := self.refusal()) is not None:
                return why
            message = f"re-executing {shlex.join(command())} in pid {os.getpid()}"
            with anyio.move_on_after(2.0):
                await answer(message)
            # From here to execve nothing awaits: no exit is reaped, no request taken, nothing changes after
            # the state is written; a signal that comes now waits for the new image.
            if (why := self.refusal()) is not None:
                return why
            state = self.carry()
            path = write_state(self.runtime_dir, encode(state))
            self.events.emit(Kind.REEXECUTING, message, command=command())
            if self.events.sink is not None:
                self.events.sink.flush(1.0)
            return execute(path, carried_fds(state))
        finally:
            path.unlink(missing_ok=True)


def unblock_signals() -> None:
    """In the new image, once its handlers are installed: signals that arrived during the exec are delivered."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def check_mode(state: Path, loop_options: dict[str, object]) -> int:
    """The new image's half of step 2: import every module of this install and read the state; exit status 0,
    or 1 with one line on stderr (which the running supervisor reports)."""
    import importlib
    import pkgutil

    from .carryover import Unreadable, load

    package = __name__.rpartition(".")[0]
    skipped = (f"{package}.testing", f"{package}.__main__")  # test helpers; and __main__ would run the command line
    try:
        for module in pkgutil.walk_packages(sys.modules[package].__path__, package + "."):
            if not module.name.startswith(skipped):
                importlib.import_module(module.name)
        if loop_options.get("use_uvloop"):
            importlib.import_module("uvloop")
        load(state.read_bytes())
    except (Unreadable, OSError) as exc:
        print(f"supervise: cannot revive from {state}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - a broken install, whatever it raises: one line, and the old one goes on
        print(f"supervise: broken install: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
