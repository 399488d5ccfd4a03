"""`supervise ctl reexec`: the supervisor becomes the supervise installed now, in the same pid, and everything it
ran and held carries over. Real supervisors, real children and load on 127.0.0.1, a real broken install."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from supervisor.control.client import Endpoint
from supervisor.testing.checkout import ROOT

from harness import PYTHON, Supervise, assert_lossless, free_port, start_load, write_release

QUICK = ["--drain-timeout", "5s", "--health-interval", "200ms", "--watch", "1s"]


def start(running: list[Supervise], *args: str, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> Supervise:
    sup = Supervise([*QUICK, *args], env=env, cwd=str(cwd) if cwd else None).start()
    running.append(sup)
    sup.wait_for("serving")
    return sup


def reexec(sup: Supervise) -> subprocess.CompletedProcess[str]:
    """`supervise ctl reexec`, as an operator runs it."""
    mark = sup.mark()
    done = sup.ctl("reexec")
    if done.returncode == 0:
        sup.wait_for("reexecuted", after=mark)
    return done


def reexec_quickly(sup: Supervise) -> None:
    """The same request from this process (no client to start each time): for the long series."""
    mark = sup.mark()
    endpoint = Endpoint(Path(str(sup.private_dir)) / "control.sock")
    response = endpoint.request("POST", "/reexec", stream=True)
    assert response.status == 200, endpoint.read(response)
    sup.wait_for("reexecuted", after=mark, timeout=30)


def status(sup: Supervise) -> dict[str, Any]:
    done = sup.ctl("status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def lasting(data: dict[str, Any]) -> dict[str, Any]:
    """What must not change over a re-exec: everything but the supervisor's own fields and what is measured."""
    measured = ("age", "rss", "cpu", "uptime", "elapsed", "reexecs", "rss_mib", "cpu_percent")

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items() if key not in measured}
        if isinstance(value, list):
            return [strip(item) for item in value]
        return value

    kept = {key: value for key, value in data.items() if key != "workers"}
    return strip(kept)


def open_fds(pid: int) -> list[str]:
    """What `pid` has open, by kind: the event loop's own pipes and sockets are new in every image, so those
    count by kind; what is carried over is checked by identity (held_sockets)."""
    kinds = (os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))
    return sorted(kind.split(":[")[0] for kind in kinds)


def fds_settle_to(pid: int, expected: list[str], timeout: float = 5.0) -> list[str]:
    """The open fds once they equal `expected`, or as they are after `timeout`: a control connection the test
    just closed is closed on the supervisor's side a moment later."""
    deadline = time.monotonic() + timeout
    while (found := open_fds(pid)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def settled_fds(pid: int) -> list[str]:
    """The open fds once they stay the same for 0.2 s (a client's connection that just ended is gone)."""
    found, deadline = open_fds(pid), time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if (again := open_fds(pid)) == found:
            break
        found = again
    return found


def held_sockets(sup: Supervise) -> set[str]:
    """The listening sockets the children got (their fd 3): the supervisor holds the very same ones."""
    inherited = {os.readlink(f"/proc/{child.pid}/fd/3") for child in psutil.Process(sup.pid).children()}
    held = {os.readlink(f"/proc/{sup.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{sup.pid}/fd")}
    assert inherited and inherited <= held
    return inherited


@pytest.mark.timeout(180)
def test_twenty_reexecs_under_load_lose_nothing_and_change_nothing(tmp_path: Path, running: list[Supervise]) -> None:
    releases, current = tmp_path / "releases", tmp_path / "current"
    write_release(releases / "v1", "--tag", "v1")
    write_release(releases / "v2", "--tag", "v2")
    current.symlink_to(releases / "v1")
    port = free_port()
    sup = start(running, "-l", f"127.0.0.1:{port}", "-n", "2", "--chdir", str(current), "--", "./run")
    before, children, fds = status(sup), sorted(p.pid for p in sup.descendants()), settled_fds(sup.pid)
    sockets = held_sockets(sup)
    load = start_load(port)
    began = time.monotonic()
    try:
        done = reexec(sup)
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert "re-executed: supervise" in done.stdout, done.stdout
        for _ in range(19):
            reexec_quickly(sup)
    finally:
        stats = load.stop()
    print(f"20 re-execs in {time.monotonic() - began:.1f}s under load: {stats.summary()}")
    assert_lossless(stats)
    after = status(sup)
    assert after["supervisor"]["pid"] == sup.pid and len(after["supervisor"]["reexecs"]) == 20
    assert lasting(after) == lasting(before)
    assert sorted(p.pid for p in sup.descendants()) == children, "every child kept running, the same processes"
    assert fds_settle_to(sup.pid, fds) == fds and held_sockets(sup) == sockets

    current.unlink()
    current.symlink_to(releases / "v2")
    upgraded = sup.ctl("upgrade")
    assert upgraded.returncode == 0 and "promoted generation 2" in upgraded.stdout, (upgraded.stdout, upgraded.stderr)
    rolled = sup.ctl("rollback")
    assert rolled.returncode == 0 and "promoted generation 3" in rolled.stdout, (rolled.stdout, rolled.stderr)
    scaled = sup.ctl("scale", "3")
    assert scaled.returncode == 0 and "3 of 3 instances ready" in scaled.stdout, (scaled.stdout, scaled.stderr)
    assert status(sup)["supervisor"]["release"]["cwd"] == str(releases / "v1")


@pytest.mark.timeout(90)
def test_a_broken_install_is_refused_and_the_old_supervisor_goes_on(tmp_path: Path, running: list[Supervise]) -> None:
    """The supervisor runs from a copy of the package; an import error planted in the copy is what the check
    finds, with the exception's own words; once the install is mended, the same re-exec goes through."""
    install = tmp_path / "install"
    shutil.copytree(ROOT / "supervisor", install / "supervisor", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(install)}
    script = write_release(tmp_path / "app", "--tag", "v1")
    port = free_port()
    sup = start(running, "-l", f"127.0.0.1:{port}", "--", str(script), env=env, cwd=tmp_path)  # `-m`: not ./supervisor
    assert Path(psutil.Process(sup.pid).cwd()) == tmp_path
    children = sorted(p.pid for p in sup.descendants())
    fleet = install / "supervisor" / "fleet.py"
    good = fleet.read_text()
    fleet.write_text(good + "\nimport no_such_module_planted_by_the_test\n")

    refused = reexec(sup)
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    assert "No module named 'no_such_module_planted_by_the_test'" in refused.stderr, refused.stderr
    assert sup.wait_for("reexec-refused")["reason"].startswith("the new supervise failed its check")
    assert sup.process.poll() is None and sorted(p.pid for p in sup.descendants()) == children
    assert status(sup)["supervisor"]["reexecs"] == []
    upgraded = sup.ctl("upgrade")
    assert upgraded.returncode == 0, (upgraded.stdout, upgraded.stderr)

    fleet.write_text(good)
    mended = reexec(sup)
    assert mended.returncode == 0, (mended.stdout, mended.stderr)
    assert len(status(sup)["supervisor"]["reexecs"]) == 1


@pytest.mark.timeout(60)
def test_a_reexec_during_an_upgrade_is_refused_with_the_reason(tmp_path: Path, running: list[Supervise]) -> None:
    script = write_release(tmp_path / "app", "--tag", "v1")
    sup = start(running, "-l", f"127.0.0.1:{free_port()}", "--ready", "http/readyz", "--", str(script))
    write_release(tmp_path / "app", "--tag", "v2", "--warm-up", "3")
    sup.signal(signal.SIGHUP)
    sup.wait_for("spawned", where=lambda event: event["gen"] == 2)
    refused = reexec(sup)
    assert refused.returncode == 1 and "an operation is in progress (upgrade)" in refused.stderr, refused.stderr
    assert sup.wait_for("promoted", timeout=30)["gen"] == 2
    assert reexec(sup).returncode == 0


@pytest.mark.timeout(90)
def test_a_child_killed_during_the_reexec_is_noticed_and_replaced(tmp_path: Path, running: list[Supervise]) -> None:
    script = write_release(tmp_path / "app", "--tag", "v1")
    port = free_port()
    sup = start(running, "-l", f"127.0.0.1:{port}", "-n", "2", "--", str(script))
    victim = sup.wait_for("spawned", where=lambda event: event["instance"] == 1)["pids"][0]
    mark = sup.mark()
    client = subprocess.Popen([PYTHON, "-m", "supervisor", "ctl", "--control",
                               os.path.join(str(sup.private_dir), "control.sock"), "reexec"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sup.wait_for("reexecuting", after=mark)
    os.kill(victim, signal.SIGKILL)  # while the new image starts: a zombie it finds, or an exit it sees
    assert client.wait(60) == 0, client.communicate()
    exited = sup.wait_for("exited", after=mark, where=lambda event: event["pids"] == [victim])
    assert not exited["expected"]
    replaced = sup.wait_for("ready", after=mark, where=lambda event: event["instance"] == 1)
    assert replaced["pids"][0] != victim
    assert sup.process.poll() is None
    instances = status(sup)["generations"][0]["instances"]
    assert sorted(instance["index"] for instance in instances) == [0, 1]


@pytest.mark.timeout(150)
def test_fifty_reexecs_leave_the_same_fds_and_no_growth(tmp_path: Path, running: list[Supervise]) -> None:
    script = write_release(tmp_path / "app", "--tag", "v1")
    sup = start(running, "-l", f"127.0.0.1:{free_port()}", "--", str(script))
    status(sup)  # the control server starts on first use (and opens what it needs): measure it running
    fds = settled_fds(sup.pid)
    rss: list[int] = []
    endpoint = Endpoint(Path(str(sup.private_dir)) / "control.sock")
    for _ in range(50):
        reexec_quickly(sup)
        endpoint.json(endpoint.request("GET", "/status"))
        rss.append(psutil.Process(sup.pid).memory_info().rss)
    assert fds_settle_to(sup.pid, fds) == fds
    assert max(rss[-10:]) <= max(rss[:10]) + 4 * 2**20, [r // 1024 for r in rss]


@pytest.mark.timeout(60)
def test_the_metrics_endpoint_carries_over(tmp_path: Path, running: list[Supervise]) -> None:
    """The --metrics-listen socket is held across a re-exec like the listeners: same port, never refused."""
    script = write_release(tmp_path / "app", "--tag", "v1")
    metrics_port = free_port()
    sup = start(running, "-l", f"127.0.0.1:{free_port()}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
                "--", str(script))
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=5) as before:
        before.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert b"supervise_" in before.makefile("rb").read()
    assert reexec(sup).returncode == 0
    with socket.create_connection(("127.0.0.1", metrics_port), timeout=5) as after:
        after.sendall(b"GET /status HTTP/1.0\r\n\r\n")
        assert b'"reexecs"' in after.makefile("rb").read()
