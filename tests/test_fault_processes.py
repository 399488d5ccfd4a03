"""Issue 11 item 2: SIGKILL of the supervisor leaves nothing holding the port, grandchildren included.

A prefork server's workers (grandchildren, without PR_SET_PDEATHSIG) outlive a SIGKILLed supervisor. The next
supervisor of the same name must remove them before it binds — and touch nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from harness import PYTHON, ROOT, Supervise, free_port, http_get

from supervisor import cgroups, leftovers
from supervisor.events import Events
from supervisor.listeners import parse_listen

PREFORK = str(ROOT / "examples" / "servers" / "prefork.py")
WORKERS = 4


def _prefork(name: str, port: int, *extra: str) -> Supervise:
    return Supervise(["--name", name, "-l", f"127.0.0.1:{port}", *extra, "--", PYTHON, PREFORK, "--workers", str(WORKERS)])


def _homes(name: str) -> list[Path]:
    base = cgroups.own_cgroup()
    if not cgroups.usable(base) or base is None:
        return []
    return [entry for entry in base.iterdir() if entry.name.startswith(cgroups.home_prefix(name))]


@pytest.mark.timeout(120)
def test_sigkill_of_the_supervisor_leaves_no_worker_of_any_generation_on_the_port() -> None:
    port, name = free_port(), f"prefork-{os.getpid()}-{free_port()}"
    first = _prefork(name, port, "--watch", "60s").start()
    second: Supervise | None = None
    old: list[psutil.Process] = []
    try:
        first.wait_for("serving")
        mark = first.mark()
        first.signal(signal.SIGHUP)  # generation 2 starts; both serve through the long watch window
        first.wait_for("ready", after=mark, where=lambda event: event.get("gen") == 2)
        old = first.descendants()
        assert len(old) >= 2 * (WORKERS + 1), f"two generations of master + {WORKERS} workers: {old}"
        workers = {process.pid for process in old if process.ppid() != first.pid}  # grandchildren: no pdeathsig
        assert len(workers) >= 2 * WORKERS
        killed_at = time.monotonic()
        first.signal(signal.SIGKILL)
        first.wait_exit(10)
        second = _prefork(name, port).start()
        second.wait_for("serving", timeout=30)
        free_after = time.monotonic() - killed_at
        summary = second.wait_for("leftovers-removed")
        print(f"\nSIGKILL of the supervisor to the restarted one serving: {free_after:.3f}s; leftovers removed in "
              f"{summary['elapsed'] * 1000:.0f}ms ({summary['count']} processes, {summary['cgroups']} cgroups)")
        survivors = [process.pid for process in old if process.is_running() and process.status() != psutil.STATUS_ZOMBIE]
        assert not survivors, f"processes of the killed supervisor's tree survived: {survivors}"
        removed = {pid for event in second.of_kind("leftover-removed") for pid in event["pids"]}
        assert workers <= removed, f"each worker left behind is named when removed: {sorted(workers - removed)}"
        assert all(event["command"] for event in second.of_kind("leftover-removed"))
        status, body = http_get(port)
        assert status == 200 and "generation 1 " in body
        assert int(body.split()[-1]) in {process.pid for process in second.descendants()}
        mark = second.mark()
        assert second.upgrade()["event"] == "promoted"
        if _homes(name):
            removed_cgroup = second.wait_for("cgroup-removed", after=mark, where=lambda event: event.get("gen") == 1)
            print(f"generation cgroup teardown: {removed_cgroup['elapsed'] * 1000:.1f}ms")
        second.signal(signal.SIGTERM)
        assert second.wait_exit(30) == 0
        assert not _homes(name), "a cleanly stopped supervisor leaves no cgroup behind"
    finally:
        for supervise in (first, second):
            if supervise is not None:
                supervise.stop()
        for process in old:  # on the old code they survive: never leave them to the machine
            try:
                process.kill()
            except psutil.Error:
                pass


def _holder(port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A process that holds a listening socket on 127.0.0.1:port (SO_REUSEPORT, so several can) with `env`."""
    code = ("import socket, sys, time\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
            f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); time.sleep(120)\n")
    process = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env}, stdout=subprocess.PIPE,
                               start_new_session=True)
    assert process.stdout is not None and process.stdout.readline() == b"up\n"
    return process


@pytest.mark.timeout(60)
def test_leftover_removal_touches_only_processes_of_a_dead_supervisor_of_that_name_on_our_address() -> None:
    port, other_port, name = free_port(), free_port(), f"leftover-{os.getpid()}"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_token = f"{dead.stdout.strip()}:1"  # a pid that has exited (its start time cannot match either)
    live_token = leftovers.marker(name)[leftovers.SUPERVISOR_VARIABLE]  # this test process: a live "supervisor"
    ours = {"SUPERVISE_NAME": name, "SUPERVISE_SUPERVISOR": dead_token}
    holders = {
        "leftover": _holder(port, ours),
        "other name": _holder(port, {**ours, "SUPERVISE_NAME": name + "-other"}),
        "live supervisor": _holder(port, {**ours, "SUPERVISE_SUPERVISOR": live_token}),
        "other address": _holder(other_port, ours),
        "unmarked": _holder(port, {}),
    }
    try:
        lines: list[str] = []
        events = Events("json", "info")
        events.subscribe(lambda event: lines.append(event.message))
        count = leftovers.remove(name, [parse_listen(f"127.0.0.1:{port}", 0)], {os.getuid()}, events)
        assert count >= 1
        assert holders["leftover"].wait(5) == -signal.SIGTERM
        assert any(f"pid {holders['leftover'].pid} " in line for line in lines), lines
        for why, process in holders.items():
            if why != "leftover":
                assert process.poll() is None, f"{why}: must not be touched"
    finally:
        for process in holders.values():
            process.kill()
            process.wait(5)
