"""The open-files limit: raised for the supervisor, kept as it was for its children.

The supervisor holds an fd for every listener, instance (its notify socket), control connection and probe; at
a low soft RLIMIT_NOFILE (`ulimit -n 64`, or the 1024 many systems still default to) an upgrade could run out
in the middle. The soft limit may be raised to the hard one without privileges, so it is at start; every
child still gets the limits the supervisor was started with (a server tuned for them must see them).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass


@dataclass(frozen=True)
class FdLimit:
    """RLIMIT_NOFILE as the supervisor was started with: what its children get."""

    soft: int
    hard: int

    @property
    def pair(self) -> tuple[int, int]:
        return self.soft, self.hard


def raise_fd_limit() -> FdLimit | None:
    """Raise the soft open-files limit to the hard one; the limits before, or None if they stay as they were."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or (hard == resource.RLIM_INFINITY and soft >= _max_open()):
        return None
    target = min(hard, _max_open()) if hard == resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return None  # not allowed here (a sandbox): we keep what we were given, as do the children
    return FdLimit(soft, hard)


def _max_open() -> int:
    """The kernel's ceiling for any process's fd limit (fs.nr_open)."""
    try:
        with open("/proc/sys/fs/nr_open") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 1024 * 1024
