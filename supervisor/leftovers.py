"""What an earlier supervisor of the same name left running: found at start, before binding, and removed.

A supervisor killed with SIGKILL takes its children with it (PR_SET_PDEATHSIG) but not their children: a
prefork server's workers are re-parented to PID 1 and go on serving the old code on the port, and the next
supervisor cannot bind it. Two ways to find them, both limited to what is certainly ours to remove:

- by cgroup (cgroups.py): a directory `supervise.NAME.PID` below our own cgroup whose supervisor leaf is empty;
- by /proc: a process of our uid (or our children's) whose environment names this supervisor name
  (SUPERVISE_NAME) and a supervisor that no longer runs (SUPERVISE_SUPERVISOR: its pid and start time), and
  which holds a listening socket on one of the addresses we are about to bind.

A live supervisor, another name, another user, or a process that does not hold our address is never touched.
Each one found is said in one line (pid, command), sent SIGTERM, and SIGKILLed if it has not gone shortly after.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import cgroups
from .counted import counted
from .event_kinds import Kind
from .events import Events
from .listeners import ListenSpec
from .proctree import proc_is_ours, still_running

NAME_VARIABLE = "SUPERVISE_NAME"
SUPERVISOR_VARIABLE = "SUPERVISE_SUPERVISOR"
_GRACE = 1.0  # after SIGTERM, before SIGKILL
_POLL = 0.02
_TCP_LISTEN, _UDP_UNCONNECTED, _UNIX_ACCEPTING = "0A", "07", 0x10000


@dataclass(frozen=True)
class Leftover:
    """One process to remove, and why it is ours."""

    pid: int
    command: str
    why: str


def start_time(pid: int | str) -> str | None:
    """The start time of a process (clock ticks since boot) from /proc/PID/stat: with the pid, it names one process."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def marker(name: str) -> dict[str, str]:
    """The variables that let a later supervisor tell this one's leftovers: our name, our pid and start time."""
    return {NAME_VARIABLE: name, SUPERVISOR_VARIABLE: f"{os.getpid()}:{start_time('self') or 0}"}


def remove(name: str, specs: Sequence[ListenSpec], uids: Iterable[int], events: Events) -> int:
    """Find and remove the leftovers of earlier supervisors of `name`; how many processes were removed."""
    began = time.monotonic()
    found: dict[int, Leftover] = {}
    base = cgroups.own_cgroup()
    homes = _dead_homes(base, name) if cgroups.usable(base) else []
    for home in homes:
        for pid in cgroups.processes(home):
            found.setdefault(pid, Leftover(pid, _command(pid), f"in cgroup {home.name} of a supervisor that is gone"))
    if proc_is_ours():
        inodes = _listening_inodes(specs)
        if inodes:
            for leftover in _holding(name, inodes, set(uids)):
                found.setdefault(leftover.pid, leftover)
    for leftover in found.values():
        events.emit(Kind.LEFTOVER_REMOVED, f"removing pid {leftover.pid} ({leftover.command}): left by an earlier supervisor "
                    f"of {name!r}, {leftover.why}", level="warning", pids=(leftover.pid,), command=leftover.command)
    _terminate(list(found))
    for home in homes:
        cgroups.kill_tree(home, 5.0)
    if found or homes:
        elapsed = time.monotonic() - began
        events.emit(Kind.LEFTOVERS_REMOVED, f"removed {counted(len(found), 'leftover process')} and "
                    f"{counted(len(homes), 'cgroup')} of earlier supervisors of {name!r} in {elapsed * 1000:.0f}ms",
                    count=len(found), cgroups=len(homes), elapsed=round(elapsed, 6))
    return len(found)


def _dead_homes(base: Path | None, name: str) -> list[Path]:
    prefix = cgroups.home_prefix(name)
    try:
        entries = list(base.iterdir()) if base is not None else []
    except OSError:
        return []
    return [entry for entry in entries if entry.name.startswith(prefix) and entry.name[len(prefix):].isdigit()
            and entry.is_dir() and cgroups.is_dead_home(entry)]


def _command(pid: int) -> str:
    if not proc_is_ours():
        return "?"  # /proc/PID would be another process
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return " ".join(handle.read().replace(b"\0", b" ").decode(errors="replace").split())[:200] or "?"  # one line: no NULs, no newlines
    except OSError:
        return "?"


# -- the /proc scan -----------------------------------------------------------------------------------------------

def _holding(name: str, inodes: set[int], uids: set[int]) -> list[Leftover]:
    """Processes of `uids` marked with `name` whose supervisor is gone and that hold one of the socket `inodes`."""
    found = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid not in uids:
                continue
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = dict(item.partition(b"=")[::2] for item in handle.read().split(b"\0") if item)
        except OSError:
            continue
        if environ.get(NAME_VARIABLE.encode()) != name.encode():
            continue
        supervisor = environ.get(SUPERVISOR_VARIABLE.encode(), b"").decode(errors="replace")
        if _alive(supervisor):
            continue
        held = _sockets(int(entry)) & inodes
        if held:
            found.append(Leftover(int(entry), _command(int(entry)), "holding one of our addresses (its supervisor "
                                  f"pid {supervisor.partition(':')[0] or '?'} is gone)"))
    return found


def _alive(token: str) -> bool:
    """Whether the supervisor `pid:starttime` still runs (the same process, not a reused pid)."""
    pid, _, started = token.partition(":")
    return pid.isdigit() and start_time(pid) == started


def _sockets(pid: int) -> set[int]:
    found = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def _listening_inodes(specs: Sequence[ListenSpec]) -> set[int]:
    """Inodes of the sockets bound to the addresses `specs` name (a wildcard on either side matches)."""
    found: set[int] = set()
    for spec in specs:
        if spec.kind == "unix":
            found.update(_unix_inodes(spec.path or ""))
            continue
        wanted = _addresses(spec)
        for table, state in (("tcp", _TCP_LISTEN), ("tcp6", _TCP_LISTEN)) if spec.kind == "tcp" else \
                (("udp", _UDP_UNCONNECTED), ("udp6", _UDP_UNCONNECTED)):
            for address, port, inode in _inet_table(table, state):
                if port == spec.port and (not wanted or address in wanted or address in ("0.0.0.0", "::")):
                    found.add(inode)
    return found


def _addresses(spec: ListenSpec) -> set[str]:
    """The IP addresses `spec` binds; empty for every address."""
    if spec.host is None or spec.host in ("", "0.0.0.0", "::"):
        return set()
    try:
        return {info[4][0] for info in socket.getaddrinfo(spec.host, spec.port, proto=socket.IPPROTO_TCP)}
    except socket.gaierror:
        return {spec.host}


def _inet_table(table: str, state: str) -> list[tuple[str, int, int]]:
    """(address, port, inode) of the sockets in /proc/net/TABLE in `state`."""
    rows = []
    try:
        with open(f"/proc/net/{table}") as handle:
            lines = handle.read().splitlines()[1:]
    except OSError:
        return rows
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or fields[3] != state:
            continue
        address, _, port = fields[1].partition(":")
        rows.append((_address(address), int(port, 16), int(fields[9])))
    return rows


def _address(text: str) -> str:
    """An address as /proc/net shows it (32-bit words in host order) in the usual notation; v4-mapped as v4."""
    raw = bytes.fromhex(text)
    packed = b"".join(struct.pack("=I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, len(raw), 4))
    if len(packed) == 16:
        if packed.startswith(b"\0" * 10 + b"\xff\xff"):
            return socket.inet_ntop(socket.AF_INET, packed[12:])
        return socket.inet_ntop(socket.AF_INET6, packed)
    return socket.inet_ntop(socket.AF_INET, packed)


def _unix_inodes(path: str) -> set[int]:
    found: set[int] = set()
    try:
        with open("/proc/net/unix") as handle:
            lines = handle.read().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & _UNIX_ACCEPTING:
            found.add(int(fields[6]))
    return found


def _terminate(pids: list[int]) -> None:
    """SIGTERM, up to _GRACE seconds to exit, then SIGKILL (blocking: this runs before the event loop starts)."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                continue
        deadline = time.monotonic() + _GRACE
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if still_running(pid)]
            time.sleep(_POLL)
        if not pids:
            return
