"""Upgrade triggers besides SIGHUP and `ctl upgrade`: a watched file or symlink changed (--upgrade-on-change).

A deploy replaces a binary or flips a `current` symlink; once the paths have been quiet for the settle delay,
one upgrade is requested (a change during an upgrade queues one more, as SIGHUP does). inotify wakes us where
it exists; either way the decision is made by comparing what each path resolves to (target, inode, size,
mtime), so a spurious wake-up does nothing and a missed one is caught by the poll.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

_IN_NONBLOCK = 0o4000
_IN_CLOEXEC = 0o2000000
# modified, attributes, closed after write, moved in/out, created, deleted
_IN_MASK = 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200
_POLL_WITH_INOTIFY = 5.0
_POLL_WITHOUT = 0.5

Signature = tuple[object, ...]


def signature(path: str) -> Signature:
    """What `path` is right now: where it points and which file that is (None if missing)."""
    try:
        link = os.readlink(path) if os.path.islink(path) else None
        st = os.stat(path)
    except OSError:
        return (None,)
    return (link, os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class Inotify:
    """A minimal inotify: readable when something changed in one of the watched directories."""

    fd: int
    add_watch: Callable[..., int]

    @classmethod
    def open(cls) -> Inotify | None:
        if not sys.platform.startswith("linux"):
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        except (OSError, AttributeError):
            return None
        return cls(fd, libc.inotify_add_watch) if fd >= 0 else None

    def watch(self, directory: str) -> None:
        self.add_watch(self.fd, os.fsencode(directory), _IN_MASK)  # a failure just leaves it to polling

    def drain(self) -> None:
        try:
            while os.read(self.fd, 65536):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class ChangeTrigger:
    """Calls `on_change(description)` once the watched paths changed and then stayed quiet for `settle` seconds."""

    paths: tuple[str, ...]
    settle: float
    on_change: Callable[[str], object]
    seen: dict[str, Signature] = field(default_factory=dict)
    woken: anyio.Event = field(default_factory=anyio.Event)

    async def run(self) -> None:
        self.seen = {path: signature(path) for path in self.paths}
        inotify = Inotify.open()
        if inotify is not None:
            self._watch_directories(inotify)
            asyncio.get_running_loop().add_reader(inotify.fd, self._readable, inotify)
        try:
            await self._loop(_POLL_WITH_INOTIFY if inotify else _POLL_WITHOUT, inotify)
        finally:
            if inotify is not None:
                asyncio.get_running_loop().remove_reader(inotify.fd)
                inotify.close()

    def _readable(self, inotify: Inotify) -> None:
        inotify.drain()
        self.woken.set()

    async def _loop(self, poll: float, inotify: Inotify | None) -> None:
        changed: list[str] = []
        while True:
            with anyio.move_on_after(self.settle if changed else poll):
                await self.woken.wait()
            self.woken = anyio.Event()
            now = [path for path in self.paths if signature(path) != self.seen[path]]
            if now:
                for path in now:
                    self.seen[path] = signature(path)
                changed = sorted(set(changed) | set(now))
                if inotify is not None:
                    self._watch_directories(inotify)  # a flipped symlink may point into a new directory
                continue  # wait for quiet: a deploy writes in several steps
            if changed:
                self.on_change("changed: " + ", ".join(changed))
                changed = []

    def _watch_directories(self, inotify: Inotify) -> None:
        for path in self.paths:
            for directory in {os.path.dirname(os.path.abspath(path)), os.path.dirname(os.path.realpath(path))}:
                if os.path.isdir(directory):
                    inotify.watch(directory)
