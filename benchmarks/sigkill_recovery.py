#!/usr/bin/env python3
"""Time to a serving port after SIGKILL of a supervisor running a prefork server, and cgroup teardown time.

    python benchmarks/sigkill_recovery.py [--rounds 5] [--workers 4] [--cgroup-processes 100]

Each round: a supervisor runs examples/servers/prefork.py (master + N workers) on 127.0.0.1; an upgrade is
started and held in its watch window, so two generations (2 masters + 2N workers) serve; the supervisor gets
SIGKILL; a new supervisor of the same --name starts at once. Measured: SIGKILL → the new one logs `serving`,
and its removal of the leftovers (`leftovers-removed`: SIGTERM, wait, SIGKILL). Then, where cgroup v2 is
writable here: `cgroup.kill` of a cgroup holding P sleeping processes → empty → removed. Only processes
started here are stopped (by pid). Exit 1 if a round did not serve or left a process of the old tree; 2 when
a supervisor could not start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import psutil

from supervisor import cgroups
from supervisor.testing.checkout import ROOT
from supervisor.testing.net import free_port
from supervisor.testing.proclog import ProcessLog

PREFORK = str(ROOT / "examples" / "servers" / "prefork.py")


class Supervisor:
    """One `supervise` process whose JSON log events are collected."""

    def __init__(self, name: str, port: int, workers: int, directory: str, *extra: str) -> None:
        argv = [sys.executable, "-m", "supervisor", "--log-format", "json", "--name", name, "--control",
                os.path.join(directory, f"{name}-{time.monotonic_ns()}.sock"), "-l", f"127.0.0.1:{port}", *extra,
                "--", sys.executable, PREFORK, "--workers", str(workers)]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, start_new_session=True)
        self.log = ProcessLog()
        threading.Thread(target=self.log.follow, args=(self.process.stderr,), daemon=True).start()

    def wait_for(self, kind: str, timeout: float = 30.0, gen: int | None = None) -> dict[str, Any]:
        """The first event of `kind` (of generation `gen`); exit status 2 when it does not come."""
        index = self.log.first("events", lambda event: event["event"] == kind and (gen is None or event.get("gen") == gen),
                               timeout=timeout)
        if index is None:
            raise SystemExit(2)
        return self.log.events[index]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def one_round(workers: int, directory: str) -> tuple[float, float, int]:
    """(SIGKILL → serving seconds, leftover removal seconds, survivors)."""
    port, name = free_port(), f"sigkill-bench-{os.getpid()}"
    first = Supervisor(name, port, workers, directory, "--watch", "60s")
    old: list[psutil.Process] = []
    second: Supervisor | None = None
    try:
        first.wait_for("serving")
        first.process.send_signal(signal.SIGHUP)
        first.wait_for("ready", gen=2)
        old = psutil.Process(first.process.pid).children(recursive=True)
        killed_at = time.monotonic()
        first.process.kill()
        first.process.wait(10)
        second = Supervisor(name, port, workers, directory)
        second.wait_for("serving")
        serving = time.monotonic() - killed_at
        removal = second.wait_for("leftovers-removed")["elapsed"]
        survivors = sum(1 for process in old if process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
        return serving, removal, survivors
    finally:
        for supervisor in (first, second):
            if supervisor is not None:
                supervisor.stop()
        for process in old:
            try:
                process.kill()
            except psutil.Error:
                pass


def cgroup_teardown(count: int) -> float | None:
    """Seconds from cgroup.kill of a cgroup of `count` sleeping processes to the cgroup removed; None if unusable."""
    base = cgroups.own_cgroup()
    if base is None or not cgroups.usable(base):
        return None
    path = base / f"supervise-bench.{os.getpid()}"
    path.mkdir()
    procs = os.open(path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    sleepers = [subprocess.Popen(["sleep", "600"], preexec_fn=lambda: os.write(procs, b"0")) for _ in range(count)]
    os.close(procs)
    began = time.monotonic()
    cgroups.kill_tree(path, 10.0)
    elapsed = time.monotonic() - began
    for sleeper in sleepers:
        sleeper.kill()
        sleeper.wait(5)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, choices=range(1, 101), metavar="1..100")
    parser.add_argument("--workers", type=int, default=4, choices=range(1, 65), metavar="1..64")
    parser.add_argument("--cgroup-processes", type=int, default=100, choices=range(1, 1001), metavar="1..1000")
    options = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="sigkill-bench-")
    results = [one_round(options.workers, directory) for _ in range(options.rounds)]
    serving = [item[0] for item in results]
    removal = [item[1] for item in results]
    survivors = sum(item[2] for item in results)
    print(f"SIGKILL → restarted supervisor serving ({options.rounds} rounds, 2 generations × 1+{options.workers} "
          f"processes): median {statistics.median(serving):.3f}s, max {max(serving):.3f}s")
    print(f"  of which leftover removal: median {statistics.median(removal) * 1000:.0f}ms, "
          f"max {max(removal) * 1000:.0f}ms; processes of the old tree surviving: {survivors}")
    teardown = cgroup_teardown(options.cgroup_processes)
    if teardown is None:
        print("cgroup teardown: cgroup v2 is not writable here")
    else:
        print(f"cgroup teardown (cgroup.kill → empty → rmdir) of {options.cgroup_processes} processes: "
              f"{teardown * 1000:.1f}ms")
    shutil.rmtree(directory, ignore_errors=True)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
