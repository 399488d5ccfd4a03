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
from collections.abc import Callable
from dataclasses import dataclass, field

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
    sock: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.sock.bind(self.path)
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
