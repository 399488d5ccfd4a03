"""Admitting control connections without starving the supervisor of file descriptors.

Every control connection costs the supervisor an fd, and so do the things an upgrade must do (a notify
socket, a pipe, probe connections, reading /proc). Clients that connect and then say nothing would otherwise
use up the open-files limit, and the next upgrade would fail half-way. So control connections get the fds
below a reserve: one accepted while the fds in use reach into the reserve takes the place of the oldest idle
connection (no request in progress), which is closed — or is closed itself when none is idle and more than a
few are open; when accept() itself finds no fd, idle ones are closed too and it tries again. The fds in use
are counted in /proc/self/fd on each new connection (control connections are few and far between).
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import anyio

_MIN_RESERVE = 24  # fds an upgrade may need at once beside what the supervisor holds anyway
_ALWAYS_ADMITTED = 4  # connections let in even within the reserve, when none is idle (ctl status must answer)


def fd_reserve(limit: int) -> int:
    """How many fds below the soft limit control connections must leave to the supervisor."""
    return max(_MIN_RESERVE, limit // 8)


def soft_fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_fds(newest: int) -> int:
    """How many fds this process has open. Where /proc cannot be listed (or there is no fd left to list it),
    `newest` + 1 — a lower bound, as the kernel hands out the lowest free fd — or the limit itself."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the directory's own
    except OSError as exc:
        return soft_fd_limit() if exc.errno in (errno.EMFILE, errno.ENFILE) else newest + 1


@dataclass
class Admission:
    """The open control connections (oldest first) and which of them have a request in progress."""

    limit: Callable[[], int] = soft_fd_limit
    count: Callable[[int], int] = open_fds
    opened: dict[asyncio.BaseTransport, float] = field(default_factory=dict)  # transport → when accepted
    busy: Counter[asyncio.BaseTransport] = field(default_factory=Counter)

    def admit(self, transport: asyncio.BaseTransport, fd: int) -> int:
        """Count a new connection on `fd`. One that went into the reserve takes the place of the oldest idle
        connection, which is closed; with none idle, the new one is closed itself, unless only a few are open.
        Returns how many were closed."""
        self._forget_closed()
        self.opened[transport] = anyio.current_time()
        limit = self.limit()
        if self.count(fd) < limit - fd_reserve(limit):
            return 0
        if self.shed(1, keep=transport):
            return 1
        if len(self.opened) <= _ALWAYS_ADMITTED:  # an operator can always get in, however tight fds are
            return 0
        transport.close()
        del self.opened[transport]
        return 1

    def shed(self, count: int, keep: asyncio.BaseTransport | None = None) -> int:
        """Close up to `count` idle connections, oldest first (never `keep`); how many were closed."""
        self._forget_closed()
        idle = [transport for transport in self.opened if not self.busy[transport] and transport is not keep]
        for transport in idle[:count]:
            transport.close()
            del self.opened[transport]
        return min(count, len(idle))

    def _forget_closed(self) -> None:
        for transport in [transport for transport in self.opened if transport.is_closing()]:
            del self.opened[transport]
            self.busy.pop(transport, None)

    @contextmanager
    def request(self, transport: asyncio.BaseTransport | None) -> Iterator[None]:
        """Mark a connection busy while one of its requests is handled (a stream stays busy while it runs)."""
        if transport is None:
            yield
            return
        self.busy[transport] += 1
        try:
            yield
        finally:
            self.busy[transport] -= 1
            if self.busy[transport] <= 0:
                del self.busy[transport]
