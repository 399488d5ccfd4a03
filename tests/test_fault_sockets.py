"""Faults of the shared sockets and of the supervisor's own fds (issue 11, items 1, 7 and 8), end to end.

Real supervisor, real stub releases, real load on 127.0.0.1: a child that shuts the listening socket down or
shrinks its backlog, a generation that accepts nothing yet looks healthy, a supervisor short of fds.
"""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import subprocess
import time
from collections.abc import Iterator
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
    """Collects started supervisors and stops every one of them after the test."""
    started: list[Supervise] = []
    yield started
    for item in started:
        item.stop()


def supervise(running: list[Supervise], release: Path, port: int, *options: str, **kwargs: object) -> Supervise:
    sup = Supervise(["-l", f"127.0.0.1:{port}", *WATCH, *options, "--", str(release / "run")], **kwargs).start()  # type: ignore[arg-type]
    running.append(sup)
    return sup


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
    print(f"\nshutdown() of the listener under load: {stats.failures} of {stats.requests} requests failed "
          f"{stats.errors}; failures spanned {max(failed) - min(failed) if failed else 0.0:.3f}s")
    assert "no longer listened" in revived["reason"], revived
    assert revived["generations"] == [1], revived
    assert stats.failures <= 20, stats.summary()  # only those caught in the instant between shutdown and revival
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
