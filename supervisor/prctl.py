"""Linux process controls Python does not expose: child subreaper and parent-death signal.

Both degrade to no-ops where prctl(2) does not exist, so the supervisor still runs (with weaker guarantees)
on other Unixes.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.prctl
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    function.restype = ctypes.c_int
    return function


# Bound once at import: the forked child calls it between fork and exec and must not look anything up there.
_PRCTL = _load_prctl()


def set_child_subreaper() -> bool:
    """Become the reaper of orphaned descendants, so a generation's grandchildren stay ours to reap and kill."""
    return _PRCTL is not None and _PRCTL(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send `signum` to this process when its parent dies (used in the forked child)."""
    return _PRCTL is not None and _PRCTL(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0
