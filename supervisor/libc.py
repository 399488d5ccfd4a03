"""libc calls Python does not expose: child subreaper, parent-death signal, giving freed heap back.

All degrade to no-ops where the call does not exist, so the supervisor still runs (with weaker guarantees)
on other Unixes.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _load(name: str, argtypes: list[type]) -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


# Bound once at import: the forked child calls prctl between fork and exec and must not look anything up there.
_PRCTL = _load("prctl", [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong])
_MALLOC_TRIM = _load("malloc_trim", [ctypes.c_size_t])


def set_child_subreaper() -> bool:
    """Become the reaper of orphaned descendants, so a generation's grandchildren stay ours to reap and kill."""
    return _PRCTL is not None and _PRCTL(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def set_parent_death_signal(signum: int) -> bool:
    """Ask the kernel to send `signum` to this process when its parent dies (used in the forked child)."""
    return _PRCTL is not None and _PRCTL(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0


def release_free_memory() -> None:
    """Return heap pages freed after start-up (imports, parsing) to the system; lowers a long-lived RSS."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
