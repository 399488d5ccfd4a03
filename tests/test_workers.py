"""Background workers: liveness replaces a sick serving generation without downtime; the reaper sweeps."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from harness import PYTHON, STUB, Supervise, free_port

from supervisor.testing.loadgen import LoadGenerator


@pytest.mark.timeout(40)
def test_liveness_replaces_a_sick_generation_through_the_upgrade_path() -> None:
    port = free_port()
    sup = Supervise(["-l", f"127.0.0.1:{port}", "--ready", "http/readyz", "--watch", "0",
                     "--health-interval", "200ms", "--liveness-interval", "200ms",
                     "--", PYTHON, STUB, "--sick-after", "1.5"]).start()
    try:
        sup.wait_for("serving")
        load = LoadGenerator("127.0.0.1", port, "/", concurrency=4, max_seconds=30)
        load.start()
        try:
            unhealthy = sup.wait_for("unhealthy", timeout=10)
            promoted = sup.wait_for("promoted", timeout=10)
            sup.wait_for("retired", where=lambda event: event["gen"] == 1)
        finally:
            stats = load.stop()
        assert unhealthy["gen"] == 1 and promoted["gen"] == 2 and promoted["old_gen"] == 1
        requested = sup.of_kind("upgrade-requested")[0]
        assert requested["trigger"].startswith("liveness: HTTP 503")
        assert not sup.of_kind("restarting"), "a sick generation is replaced beside itself, never killed first"
        assert stats.requests > 50 and stats.failures == 0, stats.summary()
    finally:
        sup.stop()


@pytest.mark.timeout(20)
def test_reaper_removes_stale_notify_sockets(tmp_path: Path) -> None:
    port = free_port()
    sup = Supervise(["-l", f"127.0.0.1:{port}", "--watch", "0", "--", PYTHON, STUB]).start()
    try:
        sup.wait_for("serving")
        spawned = sup.wait_for("spawned")
        runtime = next(Path(p).parent for p in _notify_paths(spawned["pids"][0]))
        stale = runtime / "gen99.notify"
        stale.touch()
        deadline = time.monotonic() + 5
        while stale.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not stale.exists()
        assert (runtime / "gen1.1.notify").exists(), "a live instance's socket must stay"
    finally:
        sup.stop()


def _notify_paths(pid: int) -> list[str]:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return [item.split(b"=", 1)[1].decode() for item in environ if item.startswith(b"NOTIFY_SOCKET=")]
