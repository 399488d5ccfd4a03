"""A starting generation runs at low CPU priority while it is passive and normal again once it is active (or past
its bound): real supervisors, real releases, the priority read back from the kernel (/proc/PID/autogroup, or the
scheduling policy of every thread), never mocked."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor import priority, steering
from supervisor.testing.release import Release

from harness import Supervise, free_port

pytestmark = pytest.mark.skipif(not steering.supported(), reason="only a steered generation is passive")


def start(running: list[Supervise], release: Release, *options: str, wrapper: list[str] | None = None) -> Supervise:
    chosen = [] if any(option == "--start-priority" for option in options) else ["--start-priority", "low"]
    sup = Supervise(["-l", f"127.0.0.1:{free_port()}", "--ready", "http/readyz", "--health-interval", "100ms",
                     *chosen, *options, "--", str(release.script)], wrapper=wrapper or [])
    running.append(sup.start())
    sup.wait_for("serving")
    return sup


def tree(pid: int) -> list[int]:
    """`pid` and its descendants that exist now."""
    try:
        process = psutil.Process(pid)
        return [pid, *(child.pid for child in process.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def lowered(pid: int, method: str) -> list[bool]:
    """For each process of `pid`'s tree (each thread, with SCHED_IDLE): whether it runs at low priority."""
    if method == priority.AUTOGROUP:
        return [priority.autogroup_nice(member) == 19 for member in tree(pid)]
    return [bool(priority.idle(int(tid))) for member in tree(pid) for tid in os.listdir(f"/proc/{member}/task")]


def seconds(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"]).timestamp()


def leader(sup: Supervise, gen: int) -> int:
    return int(sup.wait_for("spawned", where=lambda event: event["gen"] == gen)["pids"][0])


def with_grandchild(pid: int, timeout: float = 10.0) -> None:
    """Wait until the release has forked its helper (the tree is what must be lowered and restored)."""
    deadline = time.monotonic() + timeout
    while len(tree(pid)) < 2:
        assert time.monotonic() < deadline, f"{pid} never forked its helper"
        time.sleep(0.02)


def check_lowered_until_active(sup: Supervise, release: Release) -> str:
    """Upgrade to a release that warms up for 2 s: lowered while passive, all of it; normal once active. The
    serving generation is never touched. Returns the method used."""
    old = leader(sup, 1)
    release.deploy("--warm-up", "2", "--grandchildren", "1")
    mark = sup.mark()
    sup.signal(signal.SIGHUP)
    event = sup.wait_for("priority", where=lambda event: event.get("lowered") is True, after=mark)
    method = event["method"]
    new = leader(sup, 2)
    assert lowered(new, method)[0], "lowered as it was spawned, before the spawn was logged"
    with_grandchild(new)
    read_at, states = time.time(), lowered(new, method)
    time.sleep(0.3)  # a restore before the read (at the bound, on a very busy machine) is logged by now
    if not [event for event in sup.of_kind("priority") if event.get("lowered") is False and seconds(event) < read_at]:
        assert all(states) and len(states) >= 2, (method, states)
    assert not any(lowered(old, method))
    restored = sup.wait_for("priority", where=lambda event: event.get("lowered") is False, after=mark)
    assert restored["gen"] == 2 and restored["refused"] == 0, restored
    assert not any(lowered(new, method)), lowered(new, method)
    ready = sup.wait_for("ready", where=lambda event: event["gen"] == 2, after=mark)
    # Restored at activation; or, where the machine is so busy that the lowered start-up could not get ready
    # within its 5 s bound, at the bound (when exactly is test_start_priorities.py's, on virtual time).
    if restored["cause"] == "active":
        assert ready["ts"] <= restored["ts"], "restored only once the generation is ready and given connections"
    else:
        assert restored["cause"] == "bound" and restored["ts"] <= ready["ts"], restored
    sup.wait_for("promoted", after=mark, timeout=30)
    return method


@pytest.mark.timeout(60)
def test_a_passive_generation_runs_lowered_until_it_is_active(tmp_path: Path, running: list[Supervise]) -> None:
    release = Release(tmp_path / "app")
    release.deploy()
    sup = start(running, release)
    method = check_lowered_until_active(sup, release)
    assert method == priority.StartPriority.choose().method


@pytest.mark.timeout(60)
def test_normal_leaves_a_starting_generation_alone(tmp_path: Path, running: list[Supervise]) -> None:
    release = Release(tmp_path / "app")
    release.deploy()
    sup = start(running, release, "--start-priority", "normal")
    release.deploy("--warm-up", "1", "--grandchildren", "1")
    sup.signal(signal.SIGHUP)
    new = leader(sup, 2)
    with_grandchild(new)
    assert not any(lowered(new, priority.AUTOGROUP)) and not any(lowered(new, priority.SCHED_IDLE))
    sup.wait_for("promoted", timeout=30)
    assert sup.of_kind("priority") == []


@pytest.mark.timeout(60)
def test_a_start_up_that_takes_long_gets_normal_priority_at_its_bound(
        tmp_path: Path, running: list[Supervise]) -> None:
    """A release that never becomes ready, --ready-timeout 12s: back to normal after 5 s (the bound: 5 s or half
    the readiness timeout, whichever is shorter), while still passive; it keeps its remaining time to prove ready."""
    release = Release(tmp_path / "app")
    release.deploy()
    sup = start(running, release, "--ready-timeout", "12s")
    release.deploy("--never-ready")
    mark = sup.mark()
    sup.signal(signal.SIGHUP)
    lowered_at = sup.wait_for("priority", where=lambda event: event.get("lowered") is True, after=mark)
    assert lowered_at["bound"] == 5.0
    new = leader(sup, 2)
    restored = sup.wait_for("priority", where=lambda event: event.get("lowered") is False, after=mark)
    assert restored["cause"] == "bound", restored
    assert 5.0 <= seconds(restored) - seconds(lowered_at) < 7.0
    assert not any(lowered(new, lowered_at["method"]))
    assert not sup.of_kind("rolled-back"), "the release still has the rest of its readiness timeout"


@pytest.fixture
def cpu_cgroup() -> Iterator[Path]:
    """A cgroup of the cpu controller of our own (root only): the layout of a container or of a systemd service
    with CPUAccounting, where the generations share one CPU group and SCHED_IDLE is the method."""
    parent = Path("/sys/fs/cgroup/cpu")
    if os.geteuid() != 0 or not (parent / "cgroup.procs").exists():
        pytest.skip("needs root and a cgroup v1 cpu hierarchy to put a supervisor in a CPU group of its own")
    group = parent / f"supervise-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        yield group
    finally:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)  # its processes are being stopped by the running fixture


@pytest.mark.timeout(60)
def test_in_one_cpu_group_every_thread_runs_sched_idle_until_active(tmp_path: Path, cpu_cgroup: Path,
                                                                    running: list[Supervise]) -> None:
    release = Release(tmp_path / "app")
    release.deploy()
    enter = ["sh", "-c", f'echo $$ > {cpu_cgroup}/cgroup.procs && exec "$@"', "sh"]
    sup = start(running, release, wrapper=enter)
    assert check_lowered_until_active(sup, release) == priority.SCHED_IDLE
