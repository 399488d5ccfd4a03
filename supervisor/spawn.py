"""Starting one child process: fork, put the held sockets at fds 3.., set LISTEN_PID, exec.

Why fork and not `subprocess`/`posix_spawn`: LISTEN_PID must be the child's own pid, which exists only after
fork, and the parent-death signal must be set in the child. Why this is safe: the supervisor never runs
threads, and everything the child needs (argv, environment, fd map, signal lists, the prctl function) is
prepared before `fork()`; between fork and exec the child only makes system calls through `os` and `signal`.
An exec failure travels back through a close-on-exec pipe, so it is reported as one clear error instead of
a child that mysteriously exits 127.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from . import libc
from .credentials import Credentials
from .priority import Lowering, lower_in_child
from .states import FailureKind

_MAX_FD = 65536


@dataclass(frozen=True)
class ProcessSpec:
    """Exactly what to execute: resolved path, final argv and environment, working directory, fds to pass."""

    executable: str
    argv: tuple[str, ...]
    env: Mapping[str, str]
    cwd: str | None = None
    pass_fds: tuple[int, ...] = ()
    set_listen_pid: bool = False
    parent_death_signal: int | None = signal.SIGKILL
    credentials: Credentials | None = None
    fd_limit: tuple[int, int] | None = None  # RLIMIT_NOFILE to set in the child (the supervisor's raised its own)
    cgroup_procs: int | None = None  # an open cgroup.procs the child writes itself into before anything else
    lowering: Lowering | None = None  # a starting generation's CPU priority (priority.py), set before exec
    output: int | None = None  # where the child's stdout and stderr go, if not where ours go
    streams: tuple[int, int] | None = None  # or: the pipes of its stdout and stderr (capture.py)


class SpawnError(Exception):
    """The child could not be started (chdir or exec failed); the message names the command and the cause.
    `kind` says whose fault: exec-failed (the release's) or resources (ours, see OutOfFds)."""

    kind = FailureKind.EXEC_FAILED


class OutOfFds(SpawnError):
    """The supervisor ran out of file descriptors (EMFILE/ENFILE) while starting a child: no fault of the release."""

    kind = FailureKind.RESOURCES


def out_of_fds(exc: BaseException) -> bool:
    """Whether an error is the process (EMFILE) or the system (ENFILE) running out of file descriptors."""
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)


class NotContained(SpawnError):
    """The child could not enter its generation's cgroup: no fault of the release."""

    kind = FailureKind.RESOURCES


class ExecutableNotFound(SpawnError):
    """argv[0] does not resolve to an executable file."""


def resolve_executable(name: str, path: str | None, cwd: str | None) -> str:
    """Find the file to exec, as a shell would: a name with a slash is a path (relative to `cwd`), else $PATH."""
    if "/" in name:
        candidate = name if os.path.isabs(name) else os.path.join(cwd or os.getcwd(), name)
        if not os.path.exists(candidate):
            raise ExecutableNotFound(f"cannot execute {name}: no such file")
        if os.path.isdir(candidate) or not os.access(candidate, os.X_OK):
            raise ExecutableNotFound(f"cannot execute {name}: permission denied (not an executable file)")
        return candidate
    for directory in (path if path is not None else os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)
    raise ExecutableNotFound(f"cannot execute {name}: command not found in PATH")


def _above(fd: int, minimum: int) -> int:
    """A close-on-exec duplicate of `fd` numbered at least `minimum`, so remapping to 3.. never clobbers it."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, minimum)


def _signals_to_reset() -> list[int]:
    """Signals whose disposition is not the default. Ignored ones would survive exec (Python ignores SIGPIPE)."""
    found = []
    for signum in signal.valid_signals():
        if signum in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            handler = signal.getsignal(signum)
        except (OSError, ValueError):
            continue
        if handler not in (signal.SIG_DFL, None):
            found.append(int(signum))
    return found


def _exec_child(
    spec: ProcessSpec, executable: bytes, argv: list[bytes], env: dict[bytes, bytes], fds: list[int], report: int, parent: int, reset: list[int]
) -> None:
    """Runs in the forked child: system calls only, then exec. Never returns into the parent's code."""
    stage = "start"
    try:
        if spec.cgroup_procs is not None:
            stage = "cgroup"
            os.write(spec.cgroup_procs, b"0")  # "0" is the writer: inside before it can fork anything
            stage = "start"
        signal.set_wakeup_fd(-1)  # the parent's event loop must never hear about the child's signals
        for signum in reset:
            signal.signal(signum, signal.SIG_DFL)
        if spec.parent_death_signal is not None:
            libc.set_parent_death_signal(spec.parent_death_signal)
            if os.getppid() != parent:
                os._exit(1)  # the supervisor died before prctl: do not start an orphan
        os.setsid()
        if spec.output is not None:
            os.dup2(spec.output, 1)
            os.dup2(spec.output, 2)
        if spec.streams is not None:
            os.dup2(spec.streams[0], 1)
            os.dup2(spec.streams[1], 2)
        if spec.lowering is not None:
            lower_in_child(spec.lowering)  # best effort: a start-up at normal priority is still a start-up
        if spec.fd_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, spec.fd_limit)
        for index, fd in enumerate(fds):
            os.dup2(fd, 3 + index)
        first_free = 3 + len(fds)
        os.closerange(first_free, report)
        os.closerange(report + 1, _MAX_FD)
        if spec.credentials is not None:
            stage = "setuid"
            os.setgroups(spec.credentials.groups)
            os.setgid(spec.credentials.gid)
            os.setuid(spec.credentials.uid)
        if spec.cwd is not None:
            stage = "chdir"
            os.chdir(spec.cwd)
        if spec.set_listen_pid:
            env[b"LISTEN_PID"] = b"%d" % os.getpid()
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        stage = "exec"
        os.execve(executable, argv, env)
    except OSError as exc:
        os.write(report, b"%s:%d" % (stage.encode(), exc.errno or 0))
    except BaseException:  # noqa: BLE001 - anything at all: the child must never run the parent's code
        os.write(report, b"start:0")
    finally:
        os._exit(127)


def _describe_failure(spec: ProcessSpec, data: bytes) -> str:
    stage, _, number = data.decode(errors="replace").partition(":")
    code = int(number) if number.isdigit() else 0
    reason = os.strerror(code) if code else "unknown error"
    if code == errno.ENOEXEC:
        reason += " (not a binary and no #! line)"
    if stage == "chdir":
        return f"cannot start {spec.argv[0]}: cannot change directory to {spec.cwd}: {reason}"
    if stage == "cgroup":
        return f"cannot start {spec.argv[0]}: cannot enter the generation's cgroup: {reason}"
    if stage == "setuid" and spec.credentials is not None:
        return f"cannot start {spec.argv[0]}: cannot become user {spec.credentials.name}: {reason}"
    return f"cannot execute {spec.argv[0]}: {reason}"


def spawn(spec: ProcessSpec) -> int:
    """Fork and exec `spec`; return the child's pid once exec has succeeded, or raise SpawnError.

    The caller must register the pid with the reaper before its next await.
    """
    read_end, report, fds = _prepare_fds(spec)
    executable = os.fsencode(spec.executable)
    argv = [os.fsencode(arg) for arg in spec.argv]
    env = {os.fsencode(key): os.fsencode(value) for key, value in spec.env.items()}
    reset = _signals_to_reset()
    parent = os.getpid()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = os.fork()
        if pid == 0:
            _exec_child(spec, executable, argv, env, fds, report, parent, reset)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        os.close(report)
        for fd in fds:
            os.close(fd)
    try:
        data = _read_all(read_end)
    finally:
        os.close(read_end)
    if data:
        os.waitpid(pid, 0)  # it has already called _exit; collect it here so nobody sees a stray exit
        error = NotContained if data.startswith(b"cgroup:") else SpawnError
        raise error(_describe_failure(spec, data))
    return pid


def _prepare_fds(spec: ProcessSpec) -> tuple[int, int, list[int]]:
    """The exec-error pipe (read end, close-on-exec write end) and the fds to pass, all numbered above where they
    go; raises OutOfFds (nothing left open) when there are no fds for them."""
    first_free = 3 + len(spec.pass_fds)
    opened: list[int] = []
    try:
        fds = [_above(fd, first_free) for fd in spec.pass_fds]
        opened.extend(fds)
        read_end, write_end = os.pipe()
        opened.extend((read_end, write_end))
        report = _above(write_end, first_free)
        os.close(write_end)
    except OSError as exc:
        for fd in opened:
            try:
                os.close(fd)
            except OSError:
                continue
        if out_of_fds(exc):
            raise OutOfFds(f"cannot start {spec.argv[0]}: the supervisor is out of file descriptors ({exc.strerror})") from None
        raise
    return read_end, report, fds


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 256)
        except InterruptedError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def child_environment(base: Mapping[str, str], extra: Mapping[str, str], listen_fds: int, fd_names: Sequence[str]) -> dict[str, str]:
    """The environment for a child: ours, minus anything addressed to us by systemd, plus the child's own."""
    env = {key: value for key, value in base.items() if not _addressed_to_us(key)}
    env.update(extra)
    if listen_fds:
        env["LISTEN_FDS"] = str(listen_fds)
        env["LISTEN_FDNAMES"] = ":".join(fd_names)
    return env


def _addressed_to_us(key: str) -> bool:
    """Variables our own manager set for us (systemd, or an outer supervise), never meant for a child."""
    return key.startswith(("LISTEN_", "WATCHDOG_", "SUPERVISE_")) or key in ("NOTIFY_SOCKET", "MAINPID")
