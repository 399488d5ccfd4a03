"""Faults of the shared sockets and of the supervisor's own fds (issue 11, items 1, 7 and 8), end to end.

Real supervisor, real stub releases, real load on 127.0.0.1: a child that shuts the listening socket down or
shrinks its backlog, a generation that accepts nothing yet looks healthy, a supervisor short of fds.
"""

from __future__ import annotations

import os
import resource
import select
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import Supervise, free_port, http_get, supervise_command, start_load, write_release

WATCH = ("--watch", "1s", "--health-interval", "100ms", "--ready-timeout", "5s", "--drain-timeout", "5s")


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def running() -> Iterator[list[Supervise]]:
    """Collects started supervisors and stops every one of them after the test, then removes their runtime
    directory (a private one: these tests never touch the machine's /run/supervise)."""
    started: list[Supervise] = []
    yield started
    for item in started:
        item.stop()
        if item.env is not None:
            shutil.rmtree(item.env["XDG_RUNTIME_DIR"], ignore_errors=True)


def supervise(running: list[Supervise], release: Path, port: int, *options: str, wrapper: list[str] | None = None) -> Supervise:
    """Start a supervisor of `release` on 127.0.0.1:port (in a private runtime directory)."""
    env = {**os.environ, "XDG_RUNTIME_DIR": tempfile.mkdtemp(prefix="svf-")}  # short: notify socket paths are limited
    sup = Supervise(["-l", f"127.0.0.1:{port}", *WATCH, *options, "--", str(release / "run")], env=env,
                    wrapper=wrapper or [])
    running.append(sup)
    return sup.start()


def ctl(sup: Supervise, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    assert sup.private_dir is not None
    control = os.path.join(sup.private_dir, "control.sock")
    return subprocess.run([*supervise_command(), "ctl", "--control", control, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def metric(sup: Supervise, name: str, **labels: str) -> float | None:
    """One sample of `ctl metrics`, or None if it is not there."""
    result = ctl(sup, "metrics")
    assert result.returncode == 0, result.stderr
    for family in text_string_to_metric_families(result.stdout):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                return float(sample.value)
    return None


def tag_of(port: int) -> str:
    status, body = http_get(port, "/")
    assert status == 200, body
    return body.split()[1]


def connect_burst(port: int, count: int) -> float:
    """Seconds until `count` connections opened at once are all established. The kernel completes them into the
    accept queue, so this measures the backlog, not the server: past a full queue it drops SYNs, and the
    client sends them again only after a second."""
    socks = [socket.socket() for _ in range(count)]
    began = time.monotonic()
    try:
        for sock in socks:
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
        pending = set(socks)
        while pending and time.monotonic() - began < 10.0:
            _, writable, _ = select.select([], list(pending), [], 0.5)
            pending.difference_update(writable)
        return time.monotonic() - began
    finally:
        for sock in socks:
            sock.close()


# -- item 1: a listening socket that stops listening is revived, and never blamed on a release ---------------------


@pytest.mark.timeout(90)
def test_a_listener_shut_down_by_a_child_is_revived_at_once_under_load(tmp_path: Path, port: int,
                                                                       running: list[Supervise]) -> None:
    release = tmp_path / "app"
    write_release(release, "--tag", "v1", "--shutdown-listener-after", "1")
    sup = supervise(running, release, port)
    sup.wait_for("serving")
    load = start_load(port)
    revived = sup.wait_for("listener-revived", timeout=20)
    time.sleep(1.0)  # the service must go on serving after the revival
    stats = load.stop()
    failed = [start for start, _, ok in stats.samples if not ok]
    after = [ok for start, _, ok in stats.samples if failed and start > max(failed)]
    shut_at = float(next(event["msg"] for event in sup.events  # the stub's line, relayed (--child-output prefix)
                         if event["event"] == "output" and "shut down the listening socket at" in event["msg"]
                         ).split()[-1])
    recovery = datetime.fromisoformat(revived["ts"].replace("Z", "+00:00")).timestamp() - shut_at
    print(f"\nshutdown() of the listener under load: revived {max(recovery, 0.0) * 1000:.0f} ms after it (log times, "
          f"to the ms); {stats.failures} of {stats.requests} requests failed {stats.errors}")
    assert "no longer listened" in revived["reason"], revived
    assert recovery < 0.5, recovery  # woken by the socket's hangup, not by the next once-a-second look
    assert revived["generations"] == [1], revived
    # Only requests in the instant between shutdown and revival fail (a refused connect fails in microseconds,
    # so their number says more about the client's speed than about the gap).
    assert not failed or max(failed) - min(failed) < 0.5, stats.summary()
    assert stats.requests - stats.failures > 50, stats.summary()
    assert not failed or len(after) > 20, stats.summary()  # and everything after it served
    assert metric(sup, "supervise_listener_revivals_total", listener="listen0") == 1

    write_release(release, "--tag", "v2")  # a good release: it must not pay for what v1 did
    verdict = sup.upgrade()
    assert verdict["event"] == "promoted", verdict
    sup.wait_for("retired", where=lambda event: event["gen"] == verdict["old_gen"])
    assert tag_of(port) == "v2"


@pytest.mark.timeout(60)
def test_a_backlog_shrunk_by_a_child_is_restored(tmp_path: Path, port: int, running: list[Supervise]) -> None:
    release = tmp_path / "app"
    write_release(release, "--tag", "v1", "--listen-backlog", "1")
    sup = supervise(running, release, port, "--backlog", "512")
    sup.wait_for("serving")
    revived = sup.wait_for("listener-revived", timeout=10)
    assert "backlog was 1 instead of 512" in revived["reason"], revived
    assert metric(sup, "supervise_listener_backlog", listener="listen0") == 512
    burst = connect_burst(port, 60)
    print(f"\n60-connection burst after the backlog was restored: {burst:.3f}s")
    assert burst < 1.0  # with a backlog of 1 the kernel drops SYNs and clients retry after 1 s
    assert tag_of(port) == "v1"


# -- item 8: a generation that accepts nothing is not promoted ----------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("ready", ["http/readyz", "notify"])
def test_a_generation_that_closed_its_socket_is_not_promoted(ready: str, tmp_path: Path, port: int,
                                                             running: list[Supervise]) -> None:
    release = tmp_path / "app"
    notify = ["--notify"] if ready == "notify" else []  # READY=1 at once, or ready once /readyz answered 200
    write_release(release, "--tag", "v1", *notify)
    sup = supervise(running, release, port, "--ready", ready)
    sup.wait_for("serving")
    load = start_load(port)
    write_release(release, "--tag", "v2", *notify, "--close-listener-after", "0")
    verdict = sup.upgrade()
    stats = load.stop()
    assert verdict["event"] == "rolled-back", verdict
    assert "watch window" in verdict["reason"], verdict
    assert tag_of(port) == "v1"
    assert stats.failures == 0, stats.summary()
    assert ctl(sup, "status").returncode == 0


@pytest.mark.timeout(90)
def test_one_instance_that_accepts_nothing_is_not_promoted(tmp_path: Path, port: int, running: list[Supervise]) -> None:
    release = tmp_path / "app"
    write_release(release, "--tag", "v1")
    sup = supervise(running, release, port, "-n", "2", "--ready", "http/readyz")
    sup.wait_for("serving")
    write_release(release, "--tag", "v2", only={1: ["--tag", "v2", "--close-listener-after", "0"]})
    verdict = sup.upgrade()
    assert verdict["event"] == "rolled-back", verdict
    assert "instance 1" in verdict["reason"] and "accepted no connection" in verdict["reason"], verdict


@pytest.mark.timeout(60)
def test_a_healthy_generation_is_still_promoted_with_a_short_watch_window(tmp_path: Path, port: int,
                                                                          running: list[Supervise]) -> None:
    release = tmp_path / "app"
    write_release(release, "--tag", "v1", "--notify")
    sup = supervise(running, release, port, "-n", "3", "--ready", "notify", "--watch", "100ms")
    sup.wait_for("serving")
    write_release(release, "--tag", "v2", "--notify")
    load = start_load(port)
    verdict = sup.upgrade()
    stats = load.stop()
    assert verdict["event"] == "promoted", verdict
    assert stats.failures == 0, stats.summary()


# -- item 7: running out of fds is contained -----------------------------------------------------------------------


def limits_of(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of a process, from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-files line in /proc/{pid}/limits")


def idle_control_connections(sup: Supervise, count: int) -> list[socket.socket]:
    """`count` connections to the control socket that never send a byte."""
    assert sup.private_dir is not None
    path = os.path.join(sup.private_dir, "control.sock")
    connections = []
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        connections.append(sock)
    return connections


@pytest.mark.timeout(30)
def test_the_fd_limit_is_raised_for_the_supervisor_and_not_for_its_children(tmp_path: Path, port: int,
                                                                             running: list[Supervise]) -> None:
    release = tmp_path / "app"
    write_release(release, "--tag", "v1")
    hard = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 4096)
    sup = supervise(running, release, port, wrapper=["prlimit", f"--nofile=64:{hard}", "--"])
    serving = sup.wait_for("serving")
    assert limits_of(sup.pid) == (hard, hard)
    assert limits_of(serving["pids"][0]) == (64, hard)


@pytest.mark.timeout(90)
def test_running_out_of_fds_during_an_upgrade_is_contained(tmp_path: Path, port: int,
                                                           running: list[Supervise]) -> None:
    release = tmp_path / "app"
    write_release(release, "--tag", "v1")
    sup = supervise(running, release, port, wrapper=["prlimit", "--nofile=64:64", "--"])
    sup.wait_for("serving")
    assert ctl(sup, "status").returncode == 0  # the control server is up and taking connections
    load = start_load(port)
    idle = idle_control_connections(sup, 80)
    try:
        write_release(release, "--tag", "v2")
        verdict = sup.upgrade()
        status = ctl(sup, "status")
        stats = load.stop()
    finally:
        for sock in idle:
            sock.close()
    print(f"\nupgrade with 80 idle control connections under ulimit -n 64: {verdict['event']} "
          f"({verdict.get('reason', '')}); {stats.failures} of {stats.requests} requests failed")
    assert sup.process.poll() is None, "the supervisor exited"
    assert status.returncode == 0, status.stderr
    assert stats.failures == 0, stats.summary()
    assert verdict["event"] == "promoted", verdict  # idle connections made way: the upgrade had the fds it needed
    assert sup.of_kind("control-shed"), "no idle control connection was closed"
    sup.wait_for("retired", where=lambda event: event["gen"] == verdict["old_gen"])
    assert tag_of(port) == "v2"


@pytest.mark.timeout(90)
def test_an_upgrade_that_runs_out_of_fds_rolls_back_without_blaming_the_release(tmp_path: Path, port: int,
                                                                                running: list[Supervise]) -> None:
    # Each instance costs the supervisor four fds (its notify socket, pidfd and the two pipes of its output): 6 fit
    # in 60, 12 do not.
    release = tmp_path / "app"
    write_release(release, "--tag", "v1")
    sup = supervise(running, release, port, "-n", "6", wrapper=["prlimit", "--nofile=60:60", "--"])
    sup.wait_for("serving")
    load = start_load(port)
    write_release(release, "--tag", "v2")
    verdict = sup.upgrade()
    again = sup.upgrade()  # not refused as a known bad release: it was not its fault
    stats = load.stop()
    print(f"\nupgrade of 6 instances under ulimit -n 60: {verdict['event']} ({verdict['reason']}); "
          f"{stats.failures} of {stats.requests} requests failed")
    assert verdict["event"] == "rolled-back" and verdict["category"] == "resources", verdict
    assert "out of file descriptors" in verdict["reason"], verdict
    assert again["event"] != "upgrade-refused", again
    assert stats.failures == 0, stats.summary()
    assert sup.process.poll() is None, "the supervisor exited"
    assert ctl(sup, "status").returncode == 0
    assert tag_of(port) == "v1"
