"""Admitting control connections without starving the supervisor of file descriptors.

Every control connection costs the supervisor an fd, and so do the things an upgrade must do (a notify
socket, a pipe, probe connections, reading /proc). Clients that connect and then say nothing would otherwise
use up the open-files limit, and the next upgrade would fail half-way. So control connections get the fds
below a reserve: a connection accepted into the reserve first makes the oldest idle connections (no request
in progress) close, one for one (or itself, when none is idle and more than a few are open); when accept() itself
finds no fd, idle ones are closed too and it tries again.
The kernel hands out the lowest free fd, so an accepted connection's fd number is a lower bound of how many
are open: no scan of /proc/self/fd (which would need an fd of its own) is needed.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

_MIN_RESERVE = 24  # fds an upgrade may need at once beside what the supervisor holds anyway
_ALWAYS_ADMITTED = 4  # connections let in even within the reserve, when none is idle (ctl status must answer)


def fd_reserve(limit: int) -> int:
    """How many fds below the soft limit control connections must leave to the supervisor."""
    return max(_MIN_RESERVE, limit // 8)


def soft_fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class Admission:
    """The open control connections (oldest first) and which of them have a request in progress."""

    limit: Callable[[], int] = soft_fd_limit
    opened: dict[asyncio.BaseTransport, float] = field(default_factory=dict)  # transport → when accepted
    busy: Counter[asyncio.BaseTransport] = field(default_factory=Counter)
    shed_total: int = 0

    def admit(self, transport: asyncio.BaseTransport, fd: int) -> int:
        """Count a new connection on `fd`. One that went into the reserve takes the place of the oldest idle
        connection, which is closed; with none idle, the new one is closed itself, unless only a few are open.
        Returns how many were closed."""
        self._forget_closed()
        self.opened[transport] = time.monotonic()
        limit = self.limit()
        if fd < limit - fd_reserve(limit):
            return 0
        if self.shed(1, keep=transport):
            return 1
        if len(self.opened) <= _ALWAYS_ADMITTED:  # an operator can always get in, however tight fds are
            return 0
        transport.close()
        del self.opened[transport]
        self.shed_total += 1
        return 1

    def shed(self, count: int, keep: asyncio.BaseTransport | None = None) -> int:
        """Close up to `count` idle connections, oldest first (never `keep`); how many were closed."""
        self._forget_closed()
        idle = [transport for transport in self.opened if not self.busy[transport] and transport is not keep]
        for transport in idle[:count]:
            transport.close()
            del self.opened[transport]
        closed = min(count, len(idle))
        self.shed_total += closed
        return closed

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
