"""What `ctl signal` tells after sending: whether the processes it was sent to ended (a TERM or KILL to the serving
generation kills it, and the supervisor then replaces it) or are still running (USR1, WINCH, a signal they handle).

Read by the client from /proc, on the same host as the supervisor: a pid is gone when /proc has no such process or
it is a zombie waiting to be reaped. It waits briefly only, for whatever the signal does at once."""

from __future__ import annotations

import time
from collections.abc import Sequence

WAIT = 0.5  # seconds: long enough for a default disposition to take effect, short for a reload signal
_POLL = 0.02


def outcome(pids: Sequence[int], wait: float = WAIT) -> str:
    """`killed pids 12, 13 (…)`, `still running: pids 12, 13`, or both, after waiting at most `wait` for them all
    to end."""
    from ..proctree import still_running  # here, not at the top: proctree brings psutil, which `ctl` needs nowhere else

    deadline = time.monotonic() + wait
    alive = [pid for pid in pids if still_running(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(_POLL)
        alive = [pid for pid in alive if still_running(pid)]
    gone = [pid for pid in pids if pid not in alive]
    parts = []
    if gone:
        parts.append(f"killed pids {', '.join(map(str, gone))} (the supervisor replaces a serving instance that ends)")
    if alive:
        parts.append(f"still running after {wait:g}s: pids {', '.join(map(str, alive))}")
    return "; ".join(parts) or "no process to wait for"
