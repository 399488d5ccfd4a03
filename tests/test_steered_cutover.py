"""Steered cutover, end to end: each generation's own socket, and who gets new connections when.

Real supervisors, real stub releases, real load on 127.0.0.1 / ::1. The releases are chosen so that the shared
socket (`--cutover shared`, the behaviour before steering) gets it wrong where steering gets it right: a release
that answers 503 while it warms up, a release found sick after it took traffic.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest

from supervisor import steering
from supervisor.testing.loadgen import LoadGenerator
from supervisor.testing.release import Release

from harness import Supervise, free_port, http_get

pytestmark = pytest.mark.skipif(not steering.supported(), reason="this kernel cannot attach a reuseport program")
QUICK = ["--health-interval", "100ms", "--drain-timeout", "5s", "--ready", "http/readyz"]


@pytest.fixture
def release(tmp_path: Path) -> Release:
    return Release(tmp_path / "app")


def start(running: list[Supervise], release: Release, listen: str, *options: str) -> Supervise:
    sup = Supervise(["-l", listen, *QUICK, *options, "--", str(release.script)]).start()
    running.append(sup)
    sup.wait_for("serving")
    return sup


def load_on(host: str, port: int) -> LoadGenerator:
    load = LoadGenerator(host, port, "/", concurrency=4, max_seconds=60.0, timeout=10.0)
    load.start()
    return load


def generation_of(body: str) -> int:
    found = re.search(r"gen=(\d+)", body)
    assert found, body
    return int(found.group(1))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("cutover", ["steered", "shared"])
def test_no_answer_of_a_warming_release_reaches_a_client(cutover: str, release: Release,
                                                         running: list[Supervise]) -> None:
    """v2 accepts at once but answers 503 to everything for 1.5 s. Steered, no client sees one of those (it gets
    no connection until its /readyz says 200); shared, the load client does, which proves the test can fail."""
    port = free_port()
    release.deploy("--tag", "v1")
    sup = start(running, release, f"127.0.0.1:{port}", "--watch", "300ms", "--cutover", cutover)
    load = load_on("127.0.0.1", port)
    try:
        time.sleep(0.3)
        release.deploy("--tag", "v2", "--warm-up", "1.5")
        verdict = sup.upgrade()
        assert verdict["event"] == "promoted", verdict
        sup.wait_for("retired", where=lambda event: event["gen"] == 1)
    finally:
        stats = load.stop()
    assert stats.requests > 200, stats.summary()
    if cutover == "steered":
        assert stats.failures == 0, stats.summary()
    else:
        assert stats.errors.get("http-503", 0) > 0 or stats.failures > 0, stats.summary()
    assert generation_of(http_get(port)[1]) == 2


@pytest.mark.timeout(60)
def test_a_failure_in_the_watch_window_undrains_the_old_generation(release: Release, running: list[Supervise]) -> None:
    """v2 is ready, takes all new connections, then turns sick: the old generation — the same processes, never
    signalled — gets the new connections back at once, and no request fails."""
    port = free_port()
    release.deploy("--tag", "v1")
    sup = start(running, release, f"127.0.0.1:{port}", "--watch", "3s", "--health-threshold", "2")
    old = psutil.Process(sup.wait_for("spawned", where=lambda event: event["gen"] == 1)["pids"][0])
    load = load_on("127.0.0.1", port)
    try:
        time.sleep(0.3)
        release.deploy("--tag", "v2", "--sick-after", "0.5")
        mark = sup.mark()
        sup.signal(1)  # SIGHUP
        sup.wait_for("traffic", where=lambda event: event["gen"] == 2 and event["state"] == "active", after=mark)
        sup.wait_for("traffic", where=lambda event: event["gen"] == 1 and event["state"] == "active", after=mark)
        after = [generation_of(http_get(port)[1]) for _ in range(20)]  # generation 2 is still alive, draining
        verdict = sup.wait_for("rolled-back", after=mark)
    finally:
        stats = load.stop()
    assert "watch window" in verdict["reason"], verdict
    assert after == [1] * 20, after
    assert old.is_running() and old.pid == sup.of_kind("spawned")[0]["pids"][0]
    assert not [event for event in sup.events if event["event"] == "draining" and event.get("gen") == 1]
    assert stats.failures == 0, stats.summary()


@pytest.mark.timeout(60)
def test_a_release_that_is_never_ready_is_removed_at_once(release: Release, running: list[Supervise]) -> None:
    """A passive generation got only probe connections: it is killed after a short grace, not --drain-timeout."""
    port = free_port()
    release.deploy("--tag", "v1")
    sup = start(running, release, f"127.0.0.1:{port}", "--watch", "0", "--ready-timeout", "1s",
                "--drain-timeout", "30s")
    load = load_on("127.0.0.1", port)
    try:
        release.deploy("--tag", "v2", "--warm-up", "600", "--ignore-term")
        began = time.monotonic()
        verdict = sup.upgrade()
        gone = sup.wait_for("retired", where=lambda event: event["gen"] == 2)
        took = time.monotonic() - began
    finally:
        stats = load.stop()
    assert verdict["event"] == "rolled-back", verdict
    assert took < 10, (took, gone)
    assert stats.failures == 0, stats.summary()


@pytest.mark.timeout(90)
def test_probe_connections_reach_only_the_generation_under_test(release: Release, running: list[Supervise]) -> None:
    """Under load, readiness and health probes are steered by their source port: not one is accepted by another
    generation (the metric counts those the attribution catches)."""
    port = free_port()
    release.deploy("--tag", "v1")
    sup = start(running, release, f"127.0.0.1:{port}", "--watch", "500ms")
    load = load_on("127.0.0.1", port)
    try:
        for number in range(2, 6):
            release.deploy("--tag", f"v{number}")
            verdict = sup.upgrade()
            assert verdict["event"] == "promoted", verdict
    finally:
        stats = load.stop()
    metrics = sup.ctl("metrics")
    assert metrics.returncode == 0, metrics.stderr
    elsewhere = [line for line in metrics.stdout.splitlines() if line.startswith("supervise_probe_answered_elsewhere")]
    assert elsewhere and all(line.split()[-1] in ("0", "0.0") for line in elsewhere), elsewhere
    assert 'supervise_generation_traffic_share{gen="5",state="active"} 1.0' in metrics.stdout, metrics.stdout
    assert 'supervise_generation_accept_queue{gen="5",listener="listen0"}' in metrics.stdout, metrics.stdout
    probes = [line for line in metrics.stdout.splitlines() if line.startswith('supervise_probe_seconds_count')]
    assert probes and float(probes[0].split()[-1]) >= 4, probes
    assert stats.failures == 0, stats.summary()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("listen,clients", [("[::1]:{port}", ["::1"]), (":{port}", ["127.0.0.1", "::1"])],
                         ids=["ipv6", "dual-stack"])
def test_ipv6_and_dual_stack_listeners_are_steered(listen: str, clients: list[str], release: Release,
                                                    running: list[Supervise]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    port = free_port()
    release.deploy("--tag", "v1")
    sup = start(running, release, listen.format(port=port), "--watch", "300ms")
    loads = [load_on(host, port) for host in clients]
    try:
        release.deploy("--tag", "v2", "--warm-up", "1")
        verdict = sup.upgrade()
        assert verdict["event"] == "promoted", verdict
        sup.wait_for("retired", where=lambda event: event["gen"] == 1)
    finally:
        results = [load.stop() for load in loads]
    for stats in results:
        assert stats.requests > 50 and stats.failures == 0, stats.summary()
    assert not sup.of_kind("steering-fallback")


@pytest.mark.timeout(60)
def test_each_fallback_is_said_and_upgrades_as_before(release: Release, running: list[Supervise],
                                                      tmp_path: Path) -> None:
    """A unix listener and --cutover shared keep one socket for every generation, each said once with its reason;
    upgrades stay lossless."""
    port, path = free_port(), f"/tmp/sv-steer-{os.getpid()}-{time.monotonic_ns()}.sock"
    release.deploy("--tag", "v1")
    sup = start(running, release, f"127.0.0.1:{port}", "-l", f"unix:{path}", "--watch", "300ms")
    shared = start(running, release, f"127.0.0.1:{free_port()}", "--watch", "300ms", "--cutover", "shared")
    load = load_on("127.0.0.1", port)
    try:
        for supervisor in (sup, shared):
            release.deploy("--tag", "v2")
            assert supervisor.upgrade()["event"] == "promoted"
    finally:
        stats = load.stop()
    reasons = {event["name"]: event["reason"] for event in sup.of_kind("steering-fallback")}
    assert list(reasons) == ["listen1"] and "unix" in reasons["listen1"], reasons
    assert {event["name"] for event in shared.of_kind("steering-fallback")} == {"listen0"}
    assert "--cutover shared" in shared.of_kind("steering-fallback")[0]["reason"]
    assert stats.failures == 0, stats.summary()
    status = sup.ctl("status")
    assert "shared by every generation: unix" in status.stdout and "active 100%" in status.stdout, status.stdout
    dry = sup.ctl("upgrade", "--dry-run")
    assert "cutover steered" in dry.stdout and "listener listen1 is shared" in dry.stdout, dry.stdout
    assert "cutover shared" in shared.ctl("upgrade", "--dry-run").stdout


@pytest.mark.timeout(60)
def test_a_foreign_member_of_the_group_stops_steering(release: Release, running: list[Supervise]) -> None:
    """Another socket of our user joins the address with SO_REUSEPORT: the program is taken off (it would count
    the intruder as one of ours) and said; the supervisor goes on serving and upgrading."""
    port = free_port()
    release.deploy("--tag", "v1")
    sup = start(running, release, f"127.0.0.1:{port}", "--watch", "0")
    with socket.socket() as intruder:
        intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        intruder.bind(("127.0.0.1", port))
        intruder.listen(8)
        warning = sup.wait_for("steering-fallback", timeout=10)
        assert warning["reason"] == "foreign member", warning
        release.deploy("--tag", "v2")
        intruder.close()
        assert sup.upgrade()["event"] == "promoted"
    sup.wait_for("retired", where=lambda event: event["gen"] == 1)
    assert generation_of(http_get(port)[1]) == 2


@pytest.mark.timeout(30)
def test_port_in_use_is_still_refused(release: Release, tmp_path: Path) -> None:
    """SO_REUSEPORT is set only after the first bind: another server on the port (even one with SO_REUSEPORT)
    makes supervise refuse to start rather than share the port with it."""
    release.deploy("--tag", "v1")
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen(8)
        sup = Supervise(["-l", f"127.0.0.1:{other.getsockname()[1]}", "--", str(release.script)]).start()
        try:
            assert sup.wait_exit(20) != 0
        finally:
            sup.stop()
    assert any("address already in use" in line for line in sup.lines), sup.lines


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "ReusePort=yes"])
def test_a_socket_passed_in_by_systemd_is_steered_only_with_reuseport(reuse_port: bool, release: Release,
                                                                      running: list[Supervise]) -> None:
    """Socket activation: a socket systemd made with ReusePort=yes is steered like one supervise bound (a warming
    release costs nothing); a plain one is every generation's, as before steering, and said."""
    web = socket.create_server(("127.0.0.1", 0), reuse_port=reuse_port)
    port = web.getsockname()[1]
    # Like systemd: the socket at fd 3 and nowhere else (a second copy would keep it in the group once retired).
    activate = (f"import os, sys; os.dup2({web.fileno()}, 3); os.close({web.fileno()}); "
                "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='web'); "
                "os.execv(sys.argv[1], sys.argv[1:])")
    release.deploy("--tag", "v1")
    sup = Supervise(["-l", f"web=127.0.0.1:{port}", *QUICK, "--watch", "300ms", "--", str(release.script)],
                    wrapper=[sys.executable, "-c", activate], pass_fds=(web.fileno(),)).start()
    running.append(sup)
    web.close()
    sup.wait_for("serving")
    load = load_on("127.0.0.1", port)
    try:
        release.deploy("--tag", "v2", *(["--warm-up", "1"] if reuse_port else []))
        assert sup.upgrade()["event"] == "promoted"
        sup.wait_for("retired", where=lambda event: event["gen"] == 1)
    finally:
        stats = load.stop()
    said = sup.of_kind("steering-fallback")
    if reuse_port:
        assert said == [] and sup.of_kind("traffic"), said
    else:
        assert len(said) == 1 and said[0]["name"] == "web" and "ReusePort=yes" in said[0]["reason"], said
    assert stats.failures == 0, stats.summary()
    assert generation_of(http_get(port)[1]) == 2
