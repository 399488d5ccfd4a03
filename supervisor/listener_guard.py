"""Keeping the held TCP listening sockets listening, with the backlog they started with.

Every generation inherits the very socket the supervisor holds, so one child can break it for all of them:
`shutdown(SHUT_RDWR)` on a listening socket stops it listening (every later connection is refused, for every
generation, for good), and `listen(1)` shrinks its accept queue for every generation to come. Neither is a
fault of the release that happens to be starting next. The guard looks at each held socket before every
spawn, whenever one of them hangs up (a shut-down listening socket reports EPOLLHUP at once: the wait below
wakes within milliseconds) and at least every second; it calls `listen()` again with the backlog the socket
had when the guard first saw it listening, which revives it and restores its queue, and says so.
"""

from __future__ import annotations

import asyncio
import errno
import select
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import anyio

from .event_kinds import Kind
from .events import Events
from .listeners import Listener

_TCP_INFO_SIZE = 104
_TCPI_STATE = 0
_TCPI_UNACKED = 24  # for a listening socket: connections waiting in the accept queue
_TCPI_SACKED = 28  # for a listening socket: the accept queue's limit (the backlog)
_TCP_LISTEN = 10


def accept_queue(sock: socket.socket) -> tuple[int, int] | None:
    """(waiting, limit) of a listening TCP socket's accept queue, from TCP_INFO; None where unsupported or when
    the socket does not listen."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        if struct.unpack_from("=B", info, _TCPI_STATE)[0] != _TCP_LISTEN:
            return None
        return struct.unpack_from("=I", info, _TCPI_UNACKED)[0], struct.unpack_from("=I", info, _TCPI_SACKED)[0]
    except (OSError, AttributeError, struct.error):
        return None


def listening(sock: socket.socket) -> bool:
    """Whether the socket still accepts connections (SO_ACCEPTCONN)."""
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


@dataclass(frozen=True)
class Baseline:
    """What a held socket looked like when the guard first saw it healthy: its address and backlog."""

    address: tuple[object, ...]
    backlog: int | None  # None: the system does not tell (no TCP_INFO)


@dataclass
class ListenerGuard:
    """Revives the held TCP listeners that a child shut down and restores a backlog a child shrank. `held` lists
    the listeners the supervisor holds now; `alive` the numbers of the generations alive (named in the log: one
    of them did it)."""

    events: Events
    held: Callable[[], Iterable[Listener]]
    alive: Callable[[], Iterable[int]]
    revived: Callable[[Listener], None] = lambda listener: None  # it listens again: it rejoined its reuseport group
    baselines: dict[Listener, Baseline] = field(default_factory=dict)
    lost: set[Listener] = field(default_factory=set)  # could not listen again: said once, retried quietly

    def _tcp(self) -> list[Listener]:
        return [listener for listener in self.held() if listener.kind == "tcp" and listener.sock.fileno() != -1]

    def check(self) -> list[Listener]:
        """Look at each held TCP listener now and revive what needs it; the listeners revived."""
        held = self._tcp()
        self.baselines = {listener: baseline for listener, baseline in self.baselines.items() if listener in held}
        self.lost &= set(held)
        return [listener for listener in held if self._check_one(listener)]

    def _check_one(self, listener: Listener) -> bool:
        sock = listener.sock
        queue = accept_queue(sock)
        listens = queue is not None or listening(sock)
        baseline = self.baselines.get(listener)
        if baseline is None:
            if listens:  # first sight, before any child could touch it: this is what it must stay like
                self.baselines[listener] = Baseline(tuple(sock.getsockname()), queue[1] if queue else None)
            return False
        if not listens:
            return self._revive(listener, baseline, "it no longer listened (a child called shutdown() on it?)")
        if baseline.backlog is None or queue is None or queue[1] >= baseline.backlog:
            return False
        # A server that calls listen() with its own smaller default (uvicorn: 2048) shows up here too: said at info.
        return self._revive(listener, baseline, f"its backlog was {queue[1]} instead of {baseline.backlog} (a child "
                            "called listen() on it; pass --backlog to match the server's own)", level="info")

    def _revive(self, listener: Listener, baseline: Baseline, reason: str, level: str = "warning") -> bool:
        """listen() again with the baseline backlog; first bind the old address again if the shutdown gave the
        port back (shutdown() releases a port the system picked, `:0`)."""
        sock, gens, backlog = listener.sock, sorted(self.alive()), baseline.backlog or socket.SOMAXCONN
        try:
            try:
                sock.bind(baseline.address)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: still bound to its address, as it should be
                    raise
            sock.listen(backlog)
        except OSError as exc:
            if listener not in self.lost:
                self.lost.add(listener)
                self.events.emit(Kind.LISTENER_LOST, f"listener {listener.name} ({listener.address}): {reason}, and it "
                                 f"cannot listen again: {exc.strerror or exc}", level="error", name=listener.name,
                                 address=listener.address, reason=reason, generations=gens)
            return False
        self.lost.discard(listener)
        self.revived(listener)
        self.events.emit(Kind.LISTENER_REVIVED, f"listener {listener.name} ({listener.address}) revived: {reason}; "
                         f"listening again with backlog {backlog} (generations alive: {', '.join(map(str, gens))})",
                         level=level, name=listener.name, address=listener.address, reason=reason,
                         backlog=backlog, generations=gens)
        return True

    async def watch_hangups(self, interval: float) -> None:
        """Forever: check at once when a held listener hangs up (shut down); the set of listeners is looked at
        again every `interval` (the periodic check of backlogs is the housekeeping sweep's)."""
        while True:
            try:
                if await self._hangup(interval):
                    self.check()
            except OSError:  # out of fds for the epoll instance: the sweep's periodic check is left
                await anyio.sleep(interval)

    async def _hangup(self, interval: float) -> bool:
        """Wait up to `interval` for a held listener to hang up; whether one did."""
        with select.epoll() as poller:  # a new one each time: a closed listener never lingers in it
            for listener in self._tcp():
                if listening(listener.sock):  # one that cannot listen again would wake us again and again
                    poller.register(listener.sock.fileno(), select.EPOLLRDHUP)  # not EPOLLIN: queued connections
            with anyio.move_on_after(interval):
                await _readable(poller.fileno())
                return True
        return False


async def _readable(fd: int) -> None:
    """Wait until `fd` is readable (an epoll fd: one of its sockets has an event)."""
    loop = asyncio.get_running_loop()
    ready = anyio.Event()
    loop.add_reader(fd, ready.set)
    try:
        await ready.wait()
    finally:
        loop.remove_reader(fd)
