"""Which process accepted a connection: the proof that a probe was answered by the generation under test.

Old and new generations accept from one shared listening socket, so a probe's connection may be taken by
either. We find the server side of our probe connection (same 4-tuple, reversed), wait until some process has
accepted it (a queued connection has inode 0: no file, no owner yet), then look for that socket inode among the
fds of the generation's processes. Lookup is one exact netlink sock_diag query (sock_diag.py) — O(1) even with a
hundred thousand TIME_WAIT sockets on a loaded host — with /proc/net/tcp{,6} as the fallback.
"""

from __future__ import annotations

import os
import re
import socket
import struct
from collections.abc import Iterable

from . import sock_diag
from .proctree import proc_is_ours


def _netlink_inode(family: int, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """Inode of the socket with this local/remote pair, via sock_diag; None if not found (with the connection
    gone, the kernel answers with the listening socket: see sock_diag.lookup)."""
    found = sock_diag.lookup(family, socket.IPPROTO_TCP, local, remote)
    return None if found is None else found.inode


def _proc_hex(family: int, address: str) -> str:
    words = socket.inet_pton(family, address)
    return "".join(f"{word:08X}" for word in struct.unpack(f"={len(words) // 4}I", words))


def _proc_inode(family: int, local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The same lookup by reading /proc/net/tcp or tcp6 (slower: the whole table is read)."""
    table = "/proc/net/tcp6" if family == socket.AF_INET6 else "/proc/net/tcp"
    pattern = re.compile(
        rf"^\s*\d+: {_proc_hex(family, local[0])}:{local[1]:04X} {_proc_hex(family, remote[0])}:{remote[1]:04X}"
        r" \S\S \S+ \S+ \S+ +\d+ +\d+ (\d+)",
        re.MULTILINE,
    )
    try:
        with open(table) as handle:
            match = pattern.search(handle.read())
    except OSError:
        return None
    return int(match.group(1)) if match else None


def server_side_inode(client: socket.socket) -> int | None:
    """Inode of the server-side socket of our connected `client` socket: 0 while still queued, None if unknown.

    The server side's local address is our peer and its remote address is us.
    """
    family = client.family
    ours = client.getsockname()[:2]
    peer = client.getpeername()[:2]
    try:
        return _netlink_inode(family, peer, ours)
    except (OSError, struct.error):
        return _proc_inode(family, peer, ours)


def owner(inode: int, pids: Iterable[int]) -> int | None:
    """The first of `pids` that holds socket `inode` in its fd table, or None.

    Raises PermissionError when a process's fd table may not be read (children of another user need
    CAP_SYS_PTRACE or CAP_DAC_READ_SEARCH).
    """
    target = f"socket:[{inode}]"
    for pid in pids:
        directory = f"/proc/{pid}/fd"
        try:
            names = os.listdir(directory)
        except PermissionError:
            raise  # the caller must say so: without access every probe would look answered by someone else
        except OSError:
            continue
        for name in names:
            try:
                if os.readlink(f"{directory}/{name}") == target:
                    return pid
            except OSError:
                continue
    return None


def available() -> bool:
    """Whether this system can attribute connections at all (Linux /proc, numbering pids as we do)."""
    return proc_is_ours() and os.path.isdir("/proc/self/fd") and os.path.exists("/proc/net/tcp")
