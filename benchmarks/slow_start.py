#!/usr/bin/env python3
"""Make a server's start-up take as long as a real release's, then exec it: the cutover rows of
benchmarks/upgrade_under_load.py need a new generation that is slow to become ready, either waiting (I/O-bound:
loading a model from disk, warming a cache over the network) or computing (CPU-bound: imports, compilation).

    python benchmarks/slow_start.py io:1 -- python examples/app.py
    python benchmarks/slow_start.py cpu:1 -- python -m uvicorn ...

The same process execs the server, so its pid (LISTEN_PID), its inherited sockets and NOTIFY_SOCKET stay valid.
benchmarks/wsgi_app.py calls start_up() at import when SLOW_START is set (gunicorn's re-exec on USR2 would skip
a wrapper).
"""

from __future__ import annotations

import os
import sys
import time

KINDS = ("io", "cpu")


def start_up(spec: str) -> None:
    """Spend a start-up as `spec` says: 'io:SECONDS' sleeps, 'cpu:SECONDS' burns that much CPU time of this
    process (CPU time, not wall time: on a busy machine it takes longer, as a real CPU-bound start-up would)."""
    kind, _, seconds_text = spec.partition(":")
    seconds = float(seconds_text)
    if kind not in KINDS or seconds < 0:
        raise SystemExit(f"slow_start: {spec!r} is not io:SECONDS or cpu:SECONDS")
    if kind == "io":
        time.sleep(seconds)
        return
    until = time.process_time() + seconds
    while time.process_time() < until:
        sum(i * i for i in range(10_000))


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: slow_start.py io|cpu:SECONDS -- COMMAND [ARG...]")
    start_up(argv[0])
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
