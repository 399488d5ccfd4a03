"""The upgrade engine, end to end: real supervisor, real stub releases, real load on 127.0.0.1.

A "release" is a script in a temporary directory that execs the stub with some flags; deploying is rewriting
that script (or flipping a symlink) and sending SIGHUP, exactly as an operator would.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from supervisor.testing.release import Release

from harness import Supervise, assert_lossless, free_port, http_get, pid_gone, start_load


@pytest.fixture
def release(tmp_path: Path) -> Release:
    return Release(tmp_path / "app")


@pytest.fixture
def port() -> int:
    return free_port()


def supervise(release: Release, port: int, *options: str) -> Supervise:
    return Supervise(["-l", f"127.0.0.1:{port}", "--drain-timeout", "5s", *options, "--", str(release.script)]).start()


def promote(sup: Supervise) -> None:
    """Upgrade, expect promotion, and wait until the old generation is gone (so only the new one answers)."""
    verdict = sup.upgrade()
    assert verdict["event"] == "promoted", verdict
    sup.wait_for("retired", where=lambda event: event["gen"] == verdict["old_gen"])


def tag_of(port: int) -> str:
    status, body = http_get(port, "/")
    assert status == 200, body
    return body.split()[1]


@pytest.mark.timeout(90)
def test_repeated_upgrades_under_load_fail_no_request(release: Release, port: int, running: list[Supervise]) -> None:
    release.deploy("--tag", "v0")
    sup = supervise(release, port, "--watch", "300ms", "--health-interval", "100ms")
    running.append(sup)
    sup.wait_for("serving")
    load = start_load(port)
    try:
        for number in range(1, 6):
            release.deploy("--tag", f"v{number}")
            verdict = sup.upgrade()
            assert verdict["event"] == "promoted", verdict
            sup.wait_for("retired", where=lambda event, old=verdict["old_gen"]: event["gen"] == old)
            assert tag_of(port) == f"v{number}"
    finally:
        stats = load.stop()
    assert_lossless(stats)
    assert [event["gen"] for event in sup.of_kind("promoted")] == [2, 3, 4, 5, 6]
    timings = sup.of_kind("promoted")[-1]["timings"]
    assert timings["spawned"] <= timings["ready"] <= timings["promoted"]


@pytest.mark.timeout(30)
def test_long_request_on_old_generation_completes_across_upgrade(release: Release, port: int, running: list[Supervise]) -> None:
    release.deploy("--tag", "old")
    sup = supervise(release, port, "--watch", "0")
    running.append(sup)
    sup.wait_for("serving")
    result: dict[str, object] = {}

    def slow_request() -> None:
        result["answer"] = http_get(port, "/slow?t=2", timeout=10)

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.3)  # the slow request is now in flight on the old generation
    release.deploy("--tag", "new")
    assert sup.upgrade()["event"] == "promoted"
    thread.join(10)
    status, body = result["answer"]  # type: ignore[misc]
    assert status == 200 and body.startswith("slept 2"), body
    sup.wait_for("retired", where=lambda event: event["gen"] == 1)


ROLLBACKS = {
    "exits at start": (["--exit-at-start", "3"], "exited with status 3 during readiness"),
    "cannot be executed": (None, "exec failed: cannot execute"),
    "never ready": (["--never-ready"], "not ready after 1.5s: last probe HTTP 503"),
    "sick in watch window": (["--sick-after", "0.5"], "unhealthy in watch window: 3 consecutive failures"),
    "crashes in watch window": (["--crash-after", "0.5"], "exited with status 3 in watch window"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(ROLLBACKS))
def test_failed_release_rolls_back_without_losing_requests(case: str, release: Release, port: int, running: list[Supervise]) -> None:
    flags, reason = ROLLBACKS[case]
    release.deploy("--tag", "good")
    sup = supervise(release, port, "--ready", "http/readyz", "--ready-timeout", "1.5s", "--watch", "3s",
                    "--health-interval", "200ms")
    running.append(sup)
    sup.wait_for("serving")
    load = start_load(port)
    try:
        time.sleep(0.3)
        if flags is None:
            release.script.chmod(0o644)
        else:
            release.deploy("--tag", "bad", *flags)
        verdict = sup.upgrade()
        time.sleep(0.3)
    finally:
        stats = load.stop()
    assert verdict["event"] == "rolled-back", verdict
    assert reason in verdict["reason"], verdict["reason"]
    assert tag_of(port) == "good"
    serving = [event["gen"] for event in sup.of_kind("serving")]
    assert serving == [1], "a failed upgrade must never change what is serving"
    if case == "crashes in watch window":
        # A release that dies mid-request loses what it had accepted: that is the crash, not the rollback.
        assert stats.failures <= 8, stats.summary()
    else:
        assert_lossless(stats)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("cutover", ["steered", "shared"])
@pytest.mark.parametrize("ready", [None, "http/readyz"])
def test_readiness_is_not_fooled_by_the_old_generation(ready: str | None, cutover: str, release: Release, port: int,
                                                        running: list[Supervise]) -> None:
    """The new generation never accepts; only the old one answers /readyz (200) on the address. Shared: the probe's
    connections are taken by the old generation, and told apart; steered: they never reach it."""
    release.deploy("--tag", "old")
    options = ["--ready-timeout", "1.5s", "--cutover", cutover] + (["--ready", ready] if ready else [])
    sup = supervise(release, port, *options)
    running.append(sup)
    sup.wait_for("serving")
    release.deploy("--tag", "new", "--start-delay", "60")
    verdict = sup.upgrade()
    assert verdict["event"] == "rolled-back", verdict
    assert "not ready after 1.5s" in verdict["reason"], verdict["reason"]
    assert ("another generation" in verdict["reason"]) == (cutover == "shared"), verdict["reason"]
    assert tag_of(port) == "old"


@pytest.mark.timeout(30)
def test_stubborn_old_generation_and_its_grandchildren_are_killed_after_drain_timeout(
        release: Release, port: int, running: list[Supervise]) -> None:
    release.deploy("--tag", "stubborn", "--ignore-term", "--grandchildren", "2")
    sup = supervise(release, port, "--watch", "0", "--drain-timeout", "1s")
    running.append(sup)
    sup.wait_for("serving")
    _, body = http_get(port, "/env")
    old = json.loads(body)
    family = [old["pid"], *old["grandchildren"]]
    assert len(family) == 3
    release.deploy("--tag", "next")
    began = time.monotonic()
    assert sup.upgrade()["event"] == "promoted"
    timeout = sup.wait_for("drain-timeout", where=lambda event: event["gen"] == 1)
    assert old["pid"] in timeout["pids"], timeout  # its grandchildren may have obeyed the group's SIGTERM
    for pid in family:
        assert pid_gone(pid, 3), f"pid {pid} of the old generation survived"
    assert time.monotonic() - began < 5
    assert tag_of(port) == "next"


@pytest.mark.timeout(60)
def test_a_storm_of_sighups_runs_at_most_two_upgrades(release: Release, port: int, running: list[Supervise]) -> None:
    release.deploy("--tag", "v1")
    sup = supervise(release, port, "--watch", "2s")  # each upgrade outlasts the one-second storm
    running.append(sup)
    sup.wait_for("serving")
    load = start_load(port)
    try:
        mark = sup.mark()
        for _ in range(40):
            sup.signal(signal.SIGHUP)
            time.sleep(0.025)
        sup.wait_for("promoted", after=mark)
        time.sleep(3)  # room for the one coalesced upgrade, and any (wrong) third one
    finally:
        stats = load.stop()
    assert_lossless(stats)
    assert 1 <= len(sup.of_kind("promoted")) <= 2
    assert len(sup.of_kind("spawned")) <= 3


@pytest.mark.timeout(30)
def test_notify_readiness(release: Release, port: int, running: list[Supervise]) -> None:
    release.deploy("--tag", "n1", "--notify", "--notify-delay", "0.3")
    sup = supervise(release, port, "--ready", "notify", "--watch", "0", "--ready-timeout", "2s")
    running.append(sup)
    ready = sup.wait_for("ready")
    assert ready["probe"] == "READY=1" and ready["elapsed"] >= 0.3
    release.deploy("--tag", "silent")  # serves, but never says READY=1
    verdict = sup.upgrade()
    assert verdict["event"] == "rolled-back" and "no READY=1 received" in verdict["reason"], verdict
    release.deploy("--tag", "n2", "--notify")
    promote(sup)
    assert tag_of(port) == "n2"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("ready", ["tcp", "delay:300ms", 'exec:kill -0 "$SUPERVISE_PID" && test "$SUPERVISE_GENERATION" -ge 1'])
def test_other_probe_kinds(ready: str, release: Release, port: int, running: list[Supervise]) -> None:
    release.deploy("--tag", "a")
    sup = supervise(release, port, "--ready", ready, "--watch", "0")
    running.append(sup)
    sup.wait_for("serving")
    release.deploy("--tag", "b")
    promote(sup)
    assert tag_of(port) == "b"


@pytest.mark.timeout(30)
def test_default_probe_accepts_a_server_without_readyz_and_says_so(release: Release, port: int, running: list[Supervise]) -> None:
    release.deploy("--tag", "plain", "--no-readyz")
    sup = supervise(release, port, "--watch", "0")
    running.append(sup)
    sup.wait_for("serving")
    release.deploy("--tag", "plain2", "--no-readyz")
    assert sup.upgrade()["event"] == "promoted"
    assert len(sup.of_kind("probe-lenient")) == 1


@pytest.mark.timeout(30)
def test_explicit_probe_is_strict_about_404(release: Release, port: int, running: list[Supervise]) -> None:
    release.deploy("--tag", "x")
    sup = supervise(release, port, "--ready", "http/readyz", "--ready-timeout", "3s", "--watch", "0")
    running.append(sup)
    sup.wait_for("serving")
    release.deploy("--tag", "y", "--no-readyz")
    verdict = sup.upgrade()
    assert verdict["event"] == "rolled-back" and "HTTP 404" in verdict["reason"], verdict


@pytest.mark.timeout(30)
def test_hooks(release: Release, port: int, running: list[Supervise], tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    gate = tmp_path / "allow"
    record = f'echo "$SUPERVISE_HOOK old=$SUPERVISE_OLD_GENERATION new=$SUPERVISE_NEW_GENERATION reason=$SUPERVISE_REASON" >> {log}'
    release.deploy("--tag", "h1")
    sup = supervise(release, port, "--watch", "0", "--ready-timeout", "3s", "--ready", "http/readyz",
                    "--pre-upgrade", f"test -e {gate}", "--post-upgrade", record, "--on-rollback", record)
    running.append(sup)
    sup.wait_for("serving")
    refused = sup.upgrade()
    assert refused["event"] == "upgrade-refused" and "exited with status 1" in refused["msg"], refused
    assert not [event for event in sup.of_kind("spawned") if event["gen"] != 1], "a refused upgrade must spawn nothing"
    gate.touch()
    release.deploy("--tag", "h2")
    assert sup.upgrade()["event"] == "promoted"
    release.deploy("--tag", "h3", "--never-ready")
    assert sup.upgrade()["event"] == "rolled-back"
    sup.wait_for("hook", where=lambda event: event["hook"] == "on-rollback")
    lines = log.read_text().splitlines()
    assert lines[0] == "post-upgrade old=1 new=2 reason="
    assert lines[1].startswith("on-rollback old=2 new=3 reason=not ready after 3s")


@pytest.mark.timeout(30)
def test_symlink_flip_deploys_the_new_release(tmp_path: Path, port: int, running: list[Supervise]) -> None:
    """deploy = unpack a new release beside the old one, flip `current`, SIGHUP."""
    for name in ("v1", "v2"):
        Release(tmp_path / "releases" / name).deploy("--tag", name)
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "releases" / "v1")
    sup = Supervise(["-l", f"127.0.0.1:{port}", "--watch", "0", "--chdir", str(current), "--", "./run"]).start()
    running.append(sup)
    assert sup.wait_for("spawned")["cwd"].endswith("releases/v1")
    sup.wait_for("serving")
    flipped = tmp_path / "current.new"
    flipped.symlink_to(tmp_path / "releases" / "v2")
    os.replace(flipped, current)
    mark = sup.mark()
    promote(sup)
    assert sup.wait_for("spawned", after=mark)["cwd"].endswith("releases/v2")
    assert tag_of(port) == "v2"


@pytest.mark.timeout(30)
def test_sigterm_during_an_upgrade_aborts_it_and_stops_everything(release: Release, port: int, running: list[Supervise]) -> None:
    release.deploy("--tag", "old")
    sup = supervise(release, port, "--ready-timeout", "30s")
    running.append(sup)
    sup.wait_for("serving")
    release.deploy("--tag", "slow", "--start-delay", "60")
    mark = sup.mark()
    sup.signal(signal.SIGHUP)
    spawned = sup.wait_for("spawned", after=mark)
    time.sleep(0.3)
    family = [proc.pid for proc in sup.descendants()]
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(10) == 0
    assert spawned["pids"][0] in family
    for pid in family:
        assert pid_gone(pid, 2)


@pytest.mark.timeout(60)
def test_open_fds_are_stable_across_upgrades(release: Release, port: int, running: list[Supervise]) -> None:
    release.deploy("--tag", "fd")
    sup = supervise(release, port, "--watch", "0", "--ready", "tcp")
    running.append(sup)
    sup.wait_for("serving")
    assert sup.upgrade()["event"] == "promoted"  # warm-up: lazily created fds exist from here on
    sup.wait_for("retired", where=lambda event: event["gen"] == 1)
    before = settled_fds(sup.pid)
    for number in range(2, 12):
        assert sup.upgrade()["event"] == "promoted"
        sup.wait_for("retired", where=lambda event, n=number: event["gen"] == n)
    # Not "==": under load a probe connection or a pidfd may still be open through the whole first reading
    # (seen: 17 before, 16 after); a leak adds at least one fd per upgrade, ten here.
    assert settled_fds(sup.pid) <= before


def settled_fds(pid: int) -> int:
    """The supervisor's open fds with nothing in flight: the fewest seen over half a second. A probe connection
    or a dead instance's pidfd may be open for a moment at any single reading; a leak stays in every one."""
    process, fewest = psutil.Process(pid), None
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        count = process.num_fds()
        fewest = count if fewest is None else min(fewest, count)
        time.sleep(0.02)
    assert fewest is not None
    return fewest
