"""sd_notify, receiving side: one NOTIFY_SOCKET per generation.

A socket private to each generation is what lets `READY=1` prove something: on a shared socket an old
generation's message could not be told from a new one's. The sender's pid arrives with every datagram
(SCM_CREDENTIALS, checked by the kernel), and fds sent along (sd_notify_barrier) are closed at once, which is
how a barrier learns its messages were read.
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field

from .event_kinds import Kind
from .events import Event
from .states import Phase

_UCRED = struct.Struct("iII")
_MAX_DATAGRAM = 4096
_ANCILLARY = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(253 * 4)

NotifyHandler = Callable[[int, dict[str, str]], None]


def parse_message(data: bytes) -> dict[str, str]:
    """`READY=1\\nSTATUS=x` → {'READY': '1', 'STATUS': 'x'}; lines without `=` are ignored, as systemd does."""
    fields = {}
    for line in data.decode("utf-8", errors="replace").split("\n"):
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields


def _close_passed_fds(data: bytes) -> None:
    fds = array.array("i")
    fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass
class NotifySocket:
    """A bound datagram socket that hands each message, with the sender's pid, to `handler`."""

    path: str
    handler: NotifyHandler
    owner: tuple[int, int] | None = None  # (uid, gid) of children that run as another user: they must reach it
    sock: socket.socket = field(init=False)
    fd: InitVar[int | None] = None  # the bound socket carried over a re-exec of the supervisor, else bind one

    def __post_init__(self, fd: int | None) -> None:
        if fd is not None:
            self.sock = socket.socket(fileno=fd)
            self.sock.setblocking(False)
            return
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.sock.bind(self.path)
            if self.owner is not None:
                os.chown(self.path, *self.owner)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise

    def start(self) -> None:
        """Begin delivering messages (on the running event loop)."""
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(_MAX_DATAGRAM, _ANCILLARY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _UCRED.size:
                    pid = _UCRED.unpack_from(payload)[0]
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    _close_passed_fds(payload)
            if pid:
                self.handler(pid, parse_message(data))

    def close(self) -> None:
        """Stop listening and remove the socket file."""
        try:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        except (RuntimeError, ValueError):
            pass
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _address(value: str) -> str | None:
    """NOTIFY_SOCKET as given by systemd: a path, or `@name` for the abstract namespace."""
    if value.startswith("@"):
        return "\0" + value[1:]
    return value if value.startswith("/") else None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as RELOADING=1 wants it in MONOTONIC_USEC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


@dataclass
class SystemdNotifier:
    """sd_notify, sending side: tells the supervisor's own manager (systemd) what is going on.

    Driven by events: READY=1 when the first generation serves; RELOADING=1 (with MONOTONIC_USEC) when an
    upgrade starts and READY=1 again when it is promoted, rolled back or refused (so `Type=notify-reload` and
    TimeoutStartSec apply to reloads); STATUS= one line; STOPPING=1. The pid never changes: MAINPID stays right.
    """

    address: str
    sock: socket.socket = field(init=False)
    ready_sent: bool = False
    last_outcome: str = ""

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)  # a manager that stops reading must never stall the event loop

    @classmethod
    def from_environ(cls, environ: dict[str, str] | os._Environ[str]) -> SystemdNotifier | None:
        """A notifier if systemd gave us a NOTIFY_SOCKET, else None."""
        address = _address(environ.get("NOTIFY_SOCKET", ""))
        return cls(address) if address else None

    def send(self, **fields: object) -> None:
        """Send one message; if the manager is gone or its queue is full the message is dropped, not waited for."""
        message = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self.sock.sendto(message.encode(), self.address)
        except OSError:
            pass

    def on_event(self, event: Event) -> None:
        """Translate supervisor events into sd_notify messages."""
        if event.kind == Kind.SERVING:  # the first generation, or one that replaced a dead one
            status = f"serving generation {event.gen} (pid {_pids(event)})"
            if self.ready_sent:
                self.send(STATUS=status)
            else:
                self.ready_sent = True
                self.send(READY=1, STATUS=status)
        elif event.kind == Kind.TRANSITION and event.fields.get("previous") == Phase.IDLE and self.ready_sent:
            self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec(), STATUS="upgrading")
        elif event.kind == Kind.PROMOTED:
            self.send(READY=1, STATUS=f"serving generation {event.gen} (pid {_pids(event)}); last upgrade promoted")
        elif event.kind == Kind.ROLLED_BACK:
            old = event.fields.get("old_gen")
            self.send(READY=1, STATUS=f"upgrade to generation {event.gen} rolled back: {event.fields.get('reason')}"
                      + (f"; serving generation {old}" if old else ""))
        elif event.kind == Kind.UPGRADE_REFUSED:
            self.send(READY=1, STATUS=f"upgrade refused: {event.fields.get('reason')}")
        elif event.kind == Kind.RESTARTING:
            self.send(STATUS=f"restarting: {event.fields.get('reason')}")
        elif event.kind == Kind.REEXECUTED:
            self.send(STATUS=f"re-executed: supervise {event.fields.get('version')}"
                      + (f"; serving generation {event.gen}" if event.gen else ""))
        elif event.kind == Kind.REEXEC_REFUSED:
            self.send(STATUS=f"re-exec refused: {event.fields.get('reason')}")
        elif event.kind == Kind.STOPPING:
            self.send(STOPPING=1, STATUS="stopping: draining every generation")

    def watchdog_interval(self, environ: dict[str, str] | os._Environ[str]) -> float | None:
        """Half of WATCHDOG_USEC, if the watchdog is enabled for this process."""
        try:
            usec = int(environ.get("WATCHDOG_USEC", "0"))
            pid = int(environ.get("WATCHDOG_PID", str(os.getpid())))
        except ValueError:
            return None
        return usec / 2_000_000 if usec > 0 and pid == os.getpid() else None

    async def ping(self) -> None:
        """WATCHDOG=1: sent from the event loop, so a stuck loop stops the pings and systemd acts."""
        self.send(WATCHDOG=1)

    def close(self) -> None:
        self.sock.close()


def _pids(event: Event) -> str:
    return ",".join(map(str, event.pids)) or "?"
