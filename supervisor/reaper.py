"""Reaping: every child process of the supervisor is waited for here, and only here.

Each child we spawn gets a pidfd that becomes readable when it exits (no SIGCHLD handler: uvloop reserves that
signal); every wake-up reaps whatever has exited with `waitid(P_ALL)` and hands each status to whoever spawned
that pid. Orphaned grandchildren (we are their subreaper) are reaped by the same sweep, which also runs on a
short timer, so no zombie lingers. This works because the supervisor starts every child through `spawn.py` —
never through asyncio's subprocess machinery, whose own child watcher would race this one for exit statuses.
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass, field

import anyio


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended: an exit code, or the signal that killed it."""

    code: int | None = None
    signal: int | None = None

    def describe(self) -> str:
        """`exited with status 3`, `killed by SIGKILL`."""
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        return f"exited with status {self.code}"

    @property
    def ok(self) -> bool:
        """A clean exit (status 0)."""
        return self.code == 0


@dataclass
class ChildExit:
    """The pending or known exit of one child pid."""

    pid: int
    done: anyio.Event = field(default_factory=anyio.Event)
    status: ExitStatus | None = None

    async def wait(self) -> ExitStatus:
        """Wait for the child to exit."""
        await self.done.wait()
        assert self.status is not None
        return self.status


def _status_of(info: os.waitid_result) -> ExitStatus:
    if info.si_code == os.CLD_EXITED:
        return ExitStatus(code=info.si_status)
    return ExitStatus(signal=info.si_status)


_SWEEP_WITH_PIDFD = 1.0
_SWEEP_WITHOUT_PIDFD = 0.05


@dataclass
class Reaper:
    """Owns the exit statuses of all children. `watch(pid)` right after spawning, before any await."""

    children: dict[int, ChildExit] = field(default_factory=dict)
    orphans_reaped: int = 0
    pidfds: dict[int, int] = field(default_factory=dict)
    use_pidfd: bool = hasattr(os, "pidfd_open")

    def watch(self, pid: int) -> ChildExit:
        """Register a freshly spawned child; its exit will be delivered to the returned handle."""
        child = self.children.setdefault(pid, ChildExit(pid))
        if self.use_pidfd and pid not in self.pidfds:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                self.use_pidfd = False  # old kernel: the timer sweep takes over
            else:
                self.pidfds[pid] = fd
                asyncio.get_running_loop().add_reader(fd, self.reap)
        return child

    async def run(self) -> None:
        """Sweep on a timer: catches orphans (and every exit where pidfds are unavailable)."""
        while True:
            self.reap()
            await anyio.sleep(_SWEEP_WITH_PIDFD if self.use_pidfd else _SWEEP_WITHOUT_PIDFD)

    def reap(self) -> None:
        """Collect every exited child without blocking."""
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG)
            except ChildProcessError:
                return
            if info is None or info.si_pid == 0:
                return
            self._forget_pidfd(info.si_pid)
            child = self.children.pop(info.si_pid, None)
            if child is None:
                self.orphans_reaped += 1
                continue
            child.status = _status_of(info)
            child.done.set()

    def _forget_pidfd(self, pid: int) -> None:
        fd = self.pidfds.pop(pid, None)
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def close(self) -> None:
        """Drop every pidfd (at shutdown)."""
        for pid in list(self.pidfds):
            self._forget_pidfd(pid)
