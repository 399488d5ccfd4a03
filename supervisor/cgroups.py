"""Cgroup v2: every generation in a cgroup of its own, so it is killed whole — grandchildren included.

A process tree is not a container: a prefork server's workers outlive their master, a daemon re-parents itself
to PID 1, and when the supervisor is SIGKILLed nothing remains to chase them. A cgroup keeps every descendant
whatever it does, and `cgroup.kill` (Linux 5.14) SIGKILLs all of them at once.

Layout, below the cgroup we were started in (usable when we may write it: root, or systemd's Delegate=yes):

    BASE/supervise.NAME.PID/supervisor   the supervisor itself (cgroup v2 lets only leaves hold processes once
                                         controllers are enabled, so we leave BASE and live in a leaf)
    BASE/supervise.NAME.PID/genN         the processes of generation N

A child enters its generation's cgroup itself, between fork and exec, by writing to a `cgroup.procs` fd the
supervisor opened beforehand (Python has no CLONE_INTO_CGROUP): it is inside before it runs a line of the
release's code, so no grandchild can be forked outside — unlike the supervisor writing the pid after fork, which
leaves a window — and it costs one write(), not a round trip through a pipe. An empty `supervisor` leaf means
its supervisor is dead: what is left of its directory is a leftover for the next one of that name (leftovers.py).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from .counted import counted
from .event_kinds import Kind
from .events import Events

_LEAF = "supervisor"
_PREFIX = "supervise."
_SETTLING = 2.0  # a directory younger than this may be one a starting supervisor has not moved into yet
_POLL = 0.01
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def own_cgroup() -> Path | None:
    """The directory of the cgroup v2 we are in, or None where there is no cgroup v2 mounted that shows it."""
    try:
        with open("/proc/self/cgroup") as handle:
            relative = next((line[3:].strip() for line in handle if line.startswith("0::")), None)
        with open("/proc/self/mountinfo") as handle:
            mounts = [line.split() for line in handle]
    except OSError:
        return None
    for fields in mounts:
        separator = fields.index("-") if "-" in fields else -1
        if relative is None or separator < 0 or fields[separator + 1] != "cgroup2":
            continue
        root, mount = fields[3], fields[4]
        if relative == root or relative.startswith(root.rstrip("/") + "/"):
            return Path(mount) / relative[len(root.rstrip("/")):].lstrip("/")
    return None


def usable(base: Path | None) -> bool:
    """Whether we may create cgroups below `base` and move processes between them."""
    return base is not None and os.access(base, os.W_OK) and os.access(base / "cgroup.procs", os.W_OK)


def home_prefix(name: str) -> str:
    """The start of the directory name of every supervisor of `name` (made safe for a file name)."""
    return f"{_PREFIX}{_UNSAFE.sub('_', name)[:200]}."


def processes(path: Path) -> list[int]:
    """Pids in the cgroup at `path` and every cgroup below it."""
    found: list[int] = []
    for directory, _, _ in os.walk(path):
        try:
            with open(os.path.join(directory, "cgroup.procs")) as handle:
                found.extend(int(item) for item in handle.read().split())
        except (OSError, ValueError):
            continue
    return found


def populated(path: Path) -> bool:
    """Whether any process is in the cgroup at `path` or below (False once it is gone)."""
    try:
        with open(path / "cgroup.events") as handle:
            return "populated 1" in handle.read()
    except OSError:
        return False


def is_dead_home(path: Path) -> bool:
    """Whether a supervisor's directory `supervise.NAME.PID` is an abandoned one: its supervisor leaf is empty (or
    missing), and it is not one being set up right now (its pid is gone, or it is older than a set-up takes)."""
    leaf = path / _LEAF
    try:
        age = time.time() - (leaf if leaf.exists() else path).stat().st_mtime
    except OSError:
        return False
    pid = path.name.rpartition(".")[2]
    return not populated(leaf) and (age > _SETTLING or not os.path.exists(f"/proc/{pid}"))


def kill_tree(path: Path, timeout: float) -> bool:
    """SIGKILL every process in the cgroup at `path` (and below), wait up to `timeout` for them to be gone, then
    remove the directories. Blocking: for start-up and exit, never the event loop's steady state."""
    try:
        (path / "cgroup.kill").write_text("1")
    except OSError:
        pass
    deadline = time.monotonic() + timeout
    while populated(path) and time.monotonic() < deadline:
        time.sleep(_POLL)
    return remove_tree(path)


def remove_tree(path: Path) -> bool:
    """Remove the cgroup at `path` and its children, deepest first; False if any is still in use."""
    removed = True
    for directory, _, _ in sorted(os.walk(path), key=lambda item: -item[0].count("/")):
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            continue
        except OSError:
            removed = False
    return removed


@dataclass
class GenerationCgroup:
    """The cgroup of one generation, and the open `cgroup.procs` its children write themselves into."""

    number: int
    path: Path
    procs_fd: int

    async def clear(self, timeout: float = 5.0) -> tuple[list[int], float]:
        """Kill whatever is still in it (the escapees of its drain), wait for it to empty, remove it.
        Returns the pids that were still there and the seconds it took."""
        began = time.monotonic()
        left = processes(self.path)
        if left:
            try:
                (self.path / "cgroup.kill").write_text("1")
            except OSError:
                pass  # gone already
            with anyio.move_on_after(timeout):
                while populated(self.path):
                    await anyio.sleep(_POLL)
        self.close()
        remove_tree(self.path)
        return left, time.monotonic() - began

    def close(self) -> None:
        if self.procs_fd >= 0:
            os.close(self.procs_fd)
            self.procs_fd = -1


@dataclass
class Cgroups:
    """This supervisor's cgroup directory: its own leaf, and one cgroup per generation."""

    base: Path
    home: Path
    events: Events
    generations: dict[int, GenerationCgroup] = field(default_factory=dict)

    @classmethod
    def setup(cls, name: str, events: Events) -> Cgroups | None:
        """Make our directory and move in; None (said in one info line) where cgroups cannot be used."""
        base = own_cgroup()
        if not usable(base):
            events.emit(Kind.CGROUPS_UNAVAILABLE, "cgroup v2 is not writable here (needs root, or Delegate=yes under "
                        "systemd): generations are followed by process tree only", level="info")
            return None
        assert base is not None
        home = base / f"{home_prefix(name)}{os.getpid()}"
        created = False
        try:
            home.mkdir()  # exclusive: a supervisor of that name and pid in another PID namespace keeps its own
            created = True
            (home / _LEAF).mkdir()
            (home / _LEAF / "cgroup.procs").write_text(str(os.getpid()))
            if not (home / _LEAF / "cgroup.kill").exists():
                raise OSError(0, "no cgroup.kill (Linux 5.14 or later needed)")
        except OSError as exc:
            if created:
                _move(os.getpid(), base)
                remove_tree(home)
            events.emit(Kind.CGROUPS_UNAVAILABLE, f"cannot use cgroup {home}: {exc.strerror or exc}: generations are "
                        "followed by process tree only", level="info")
            return None
        events.emit(Kind.CGROUPS, f"generations get cgroups of their own below {home}", level="debug", path=str(home))
        return cls(base, home, events)

    def create(self, number: int) -> GenerationCgroup | None:
        """The cgroup of generation `number` (made once: a replaced instance joins its generation's); None (with a
        warning) if it cannot be made, and that generation is followed by process tree only."""
        if number in self.generations:
            return self.generations[number]
        path = self.home / f"gen{number}"
        try:
            path.mkdir(exist_ok=True)
            fd = os.open(path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            self.events.emit(Kind.CGROUP_FAILED, f"cannot create cgroup {path} for generation {number}: {exc.strerror}",
                             level="warning", gen=number)
            return None
        self.generations[number] = GenerationCgroup(number, path, fd)
        return self.generations[number]

    async def retire(self, number: int) -> None:
        """A generation is finished: kill what is left in its cgroup and remove it; say what that took."""
        cgroup = self.generations.pop(number, None)
        if cgroup is None:
            return
        left, elapsed = await cgroup.clear()
        if left:
            pids = ", ".join(map(str, sorted(left)))
            self.events.emit(Kind.CGROUP_KILLED, f"generation {number}: killed {counted(len(left), 'process')} still "
                             f"in its cgroup after its drain: pids {pids}", level="warning",
                             gen=number, pids=sorted(left), elapsed=round(elapsed, 6))
        self.events.emit(Kind.CGROUP_REMOVED, f"generation {number}: cgroup removed after {elapsed * 1000:.1f}ms",
                         level="debug", gen=number, elapsed=round(elapsed, 6))

    def close(self) -> None:
        """At exit: kill anything still in a generation's cgroup, move back to where we started, remove our directory."""
        for cgroup in self.generations.values():
            cgroup.close()
        self.generations.clear()
        try:
            entries = [entry for entry in self.home.iterdir() if entry.is_dir() and entry.name != _LEAF]
        except OSError:
            entries = []
        for entry in entries:
            kill_tree(entry, 5.0)
        _move(os.getpid(), self.base)
        remove_tree(self.home)


def _move(pid: int, path: Path) -> None:
    try:
        (path / "cgroup.procs").write_text(str(pid))
    except OSError:
        pass
