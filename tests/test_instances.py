"""Many instances per generation (--processes N): rolling and surge upgrades, rollback of replaced batches,
replacement of one dead instance, `ctl scale` — all under real load on 127.0.0.1.

"Never below N ready" is checked by sampling GET /status over the control socket in a thread throughout the
upgrade, as an operator's monitoring would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import (PYTHON, STUB, Supervise, assert_lossless, free_port, http_get, pid_gone, start_load,
                     supervise_command, write_release)

QUICK = ["--watch", "300ms", "--health-interval", "100ms", "--drain-timeout", "5s"]


def api(control: Path, method: str, target: str, timeout: float = 5.0) -> Any:
    """One request to the control API over its unix socket; the decoded JSON body."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(control))
        sock.sendall(f"{method} {target} HTTP/1.0\r\nHost: supervise\r\n\r\n".encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0], head
    return json.loads(body)


def ctl(control: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*supervise_command(), "ctl", "--control", str(control), *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@dataclass
class Sampler:
    """Samples, every few milliseconds, how many instances are ready and how many processes exist."""

    control: Path
    ready: list[int] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        assert self.thread is not None
        self.thread.join(10)

    def _run(self) -> None:
        while not self.stopped.is_set():
            status = api(self.control, "GET", "/status")
            self.ready.append(status["supervisor"]["ready_instances"])
            self.processes.append(sum(len(generation["pids"]) for generation in status["generations"]))
            time.sleep(0.005)


@dataclass
class Service:
    """A supervisor of `root/current/run`; deploying writes `root/releases/NAME/run` and flips `current` to it."""

    supervise: Supervise
    control: Path
    port: int
    root: Path

    def deploy(self, name: str, *flags: str, only: dict[int, list[str]] | None = None) -> Path:
        directory = self.root / "releases" / name
        write_release(directory, *flags, only=only)
        flipped = self.root / "current.new"
        flipped.symlink_to(directory)
        os.replace(flipped, self.root / "current")
        return directory

    def status(self) -> dict[str, Any]:
        return api(self.control, "GET", "/status")

    def serving(self) -> dict[str, Any]:
        return next(generation for generation in self.status()["generations"] if generation["serving"])

    def upgrade(self) -> dict[str, Any]:
        """SIGHUP; the verdict, once the generation that lost is gone."""
        verdict = self.supervise.upgrade(timeout=60)
        loser = verdict["old_gen"] if verdict["event"] == "promoted" else verdict["gen"]
        self.supervise.wait_for("retired", where=lambda event: event["gen"] == loser)
        return verdict


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Any]:
    started: list[Supervise] = []

    def start(*options: str, flags: tuple[str, ...] = ("--tag", "v1"), script: str | None = None) -> Service:
        control, port = tmp_path / "control.sock", free_port()
        service = Service(None, control, port, tmp_path)  # type: ignore[arg-type]
        directory = service.deploy("v1", *flags)
        if script is not None:
            (directory / "run").write_text(script)
        service.supervise = Supervise(["-l", f"127.0.0.1:{port}", "--control", str(control), *options, "--",
                                       str(tmp_path / "current" / "run")]).start()
        started.append(service.supervise)
        service.supervise.wait_for("serving")
        return service

    yield start
    for sup in started:
        sup.stop()


def instances_of(generation: dict[str, Any]) -> dict[int, int]:
    """index → pid of a generation's instances as status shows them."""
    return {instance["index"]: instance["pid"] for instance in generation["instances"]}


# -- a generation of N ------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_each_instance_has_its_index_its_notify_socket_and_shows_in_status_and_metrics(service: Any) -> None:
    svc = service("-n", "3", "--ready", "notify", *QUICK, flags=("--notify",))
    generation = svc.serving()
    assert generation["ready_instances"] == 3 and sorted(instances_of(generation)) == [0, 1, 2]
    reports = {}
    for _ in range(200):  # the shared socket spreads connections over the instances: ask until each answered
        _, body = http_get(svc.port, "/env")
        report = json.loads(body)
        reports[report["environ"]["SUPERVISE_INSTANCE"]] = report
        if len(reports) == 3:
            break
    assert sorted(reports) == ["0", "1", "2"]
    assert len({report["notify_socket"] for report in reports.values()}) == 3, "each instance has its own NOTIFY_SOCKET"
    assert {report["pid"] for report in reports.values()} == set(instances_of(generation).values())
    assert all(report["generation"] == 1 and report["listen_fds"] == 1 for report in reports.values())
    metrics = ctl(svc.control, "metrics")
    assert metrics.returncode == 0, metrics.stderr
    families = {family.name: family for family in text_string_to_metric_families(metrics.stdout)}
    assert {sample.labels["instance"] for sample in families["supervise_child_rss_bytes"].samples} == {"0", "1", "2"}
    assert [sample.value for sample in families["supervise_instances_ready"].samples] == [3]
    table = ctl(svc.control, "status")
    assert "3 ready of 3 wanted" in table.stdout and table.stdout.count(" serving ") >= 3, table.stdout


@pytest.mark.timeout(40)
def test_one_killed_instance_is_replaced_alone_while_the_others_serve(service: Any) -> None:
    svc = service("-n", "4", *QUICK)
    before = instances_of(svc.serving())
    load = start_load(svc.port)
    try:
        time.sleep(0.3)
        # An instance that exits by itself (like a worker after its max requests) finishes what it accepted.
        mark = svc.supervise.mark()
        os.kill(before[2], signal.SIGTERM)
        replaced = svc.supervise.wait_for("ready", where=lambda event: event.get("instance") == 2, after=mark)
        assert svc.supervise.wait_for("restarting", after=mark)["delay"] == pytest.approx(0.1)
        time.sleep(0.3)
    finally:
        stats = load.stop()
    assert_lossless(stats)
    after = instances_of(svc.serving())
    assert after[2] == replaced["pids"][0] != before[2]
    assert {index: pid for index, pid in after.items() if index != 2} == {i: p for i, p in before.items() if i != 2}
    assert svc.serving()["number"] == 1, "a replaced instance stays in its generation"
    # SIGKILL: what the dead process had accepted is lost with it, and nothing else.
    load = start_load(svc.port)
    try:
        time.sleep(0.3)
        mark = svc.supervise.mark()
        os.kill(after[1], signal.SIGKILL)
        svc.supervise.wait_for("ready", where=lambda event: event.get("instance") == 1, after=mark)
        time.sleep(0.3)
    finally:
        stats = load.stop()
    assert stats.failures <= 4, stats.summary()  # at most one request per client was inside the killed process
    final = instances_of(svc.serving())
    assert {final[0], final[2], final[3]} == {after[0], after[2], after[3]} and final[1] != after[1]
    assert pid_gone(after[1], 2)


@pytest.mark.timeout(40)
def test_instances_that_die_together_each_restart_as_a_single_child_would(service: Any) -> None:
    svc = service("-n", "3", "--max-restarts", "2", *QUICK)
    before = instances_of(svc.serving())
    mark = svc.supervise.mark()
    for pid in before.values():  # all at once, as when something they all depend on went away
        os.kill(pid, signal.SIGKILL)
    for index in before:
        svc.supervise.wait_for("ready", where=lambda event, index=index: event.get("instance") == index, after=mark)
    restarts = [event for event in svc.supervise.events[mark:] if event["event"] == "restarting"]
    # Each instance has its own --max-restarts budget and backoff: three failures are one each, not three of two.
    assert sorted(event["delay"] for event in restarts) == [0.1, 0.1, 0.1], restarts
    assert all("failure 1 of at most 2" in event["msg"] for event in restarts), restarts
    assert svc.supervise.process.poll() is None and not svc.supervise.of_kind("fatal")
    after = svc.serving()
    assert after["number"] == 1 and after["ready_instances"] == 3
    assert not set(instances_of(after).values()) & set(before.values())


# -- upgrades -----------------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("strategy", ["rolling", "surge"])
def test_upgrade_of_four_never_has_fewer_than_four_ready(service: Any, strategy: str) -> None:
    options = ["--strategy", "rolling", "--batch", "1"] if strategy == "rolling" else []
    svc = service("-n", "4", *options, *QUICK)
    old = instances_of(svc.serving())
    svc.deploy("v2", "--tag", "v2")
    load = start_load(svc.port)
    try:
        with Sampler(svc.control) as sampler:
            time.sleep(0.2)
            verdict = svc.upgrade()
            time.sleep(0.2)
    finally:
        stats = load.stop()
    assert verdict["event"] == "promoted", verdict
    assert_lossless(stats)
    assert len(sampler.ready) > 50, "the sampler must have watched the whole upgrade"
    assert min(sampler.ready) >= 4, sampler.ready
    generation = svc.serving()
    assert generation["number"] == 2 and sorted(instances_of(generation)) == [0, 1, 2, 3]
    assert not set(instances_of(generation).values()) & set(old.values())
    ready_events = [event for event in svc.supervise.of_kind("ready") if event["gen"] == 2]
    # Each proof is credited to the instance whose process answered it (probed together, told apart by pid).
    assert {event["instance"]: event["pids"][0] for event in ready_events} == instances_of(generation)
    if strategy == "rolling":
        assert max(sampler.processes) <= 5, "batch 1: never more than N + 1 processes"
        assert verdict["batches"] == [1, 1, 1, 1]
        assert len(svc.supervise.of_kind("batch")) == 3  # the fourth batch is followed by the promotion
    else:
        assert max(sampler.ready) == 8, "surge: all four new instances were ready beside the four old ones"
        assert verdict["batches"] == [4]


@pytest.mark.timeout(60)
def test_a_failing_batch_rolls_back_every_replaced_batch_without_dropping_below_n(service: Any) -> None:
    svc = service("-n", "4", "--strategy", "rolling", "--batch", "1", "--ready-timeout", "3s", *QUICK)
    old = instances_of(svc.serving())
    # A release directory per version (a `current` link flipped): restored old instances run the old release.
    svc.deploy("v2", "--tag", "v2", only={2: ["--tag", "v2", "--never-ready"]})
    load = start_load(svc.port)
    try:
        with Sampler(svc.control) as sampler:
            verdict = svc.supervise.upgrade(timeout=60)
            svc.supervise.wait_for("retired", where=lambda event: event["gen"] == 2)
            time.sleep(0.2)
    finally:
        stats = load.stop()
    assert verdict["event"] == "rolled-back", verdict
    assert "instance 2" in verdict["reason"] and "not ready after 3s" in verdict["reason"], verdict
    assert verdict["restored"] == 2, "two batches had replaced old instances 0 and 1"
    assert_lossless(stats)
    assert min(sampler.ready) >= 4, sampler.ready
    generation = svc.serving()
    assert generation["number"] == 1 and generation["ready_instances"] == 4
    assert sorted(instances_of(generation)) == [0, 1, 2, 3]
    assert {index: pid for index, pid in instances_of(generation).items() if index >= 2} == {2: old[2], 3: old[3]}
    assert [generation["number"] for generation in svc.status()["generations"]] == [1]
    for _ in range(20):
        assert http_get(svc.port, "/")[1].split()[1] == "v1"


@pytest.mark.timeout(60)
def test_success_percent_lets_a_batch_go_on_with_part_of_it_ready(service: Any) -> None:
    svc = service("-n", "4", "--strategy", "rolling", "--batch", "2", "--success-percent", "50",
                  "--ready-timeout", "3s", *QUICK)
    # Instance 1's first start fails (half of batch 1 is ready: enough); a later batch starts index 1 again.
    directory = svc.deploy("v2", "--tag", "v2")
    once = directory / "failed-once"
    (directory / "run").write_text(f"""#!/bin/sh
if [ "$SUPERVISE_INSTANCE" = 1 ] && [ ! -e {once} ]; then touch {once}; exec {PYTHON} {STUB} --exit-at-start 3; fi
exec {PYTHON} {STUB} --tag v2
""")
    verdict = svc.upgrade()
    assert verdict["event"] == "promoted" and verdict["batches"] == [2, 2, 1], verdict
    assert once.exists()
    assert svc.serving()["ready_instances"] == 4
    assert sorted(instances_of(svc.serving())) == [0, 1, 2, 3]


@pytest.mark.timeout(30)
def test_hooks_are_told_every_instance_pid(service: Any, tmp_path: Path) -> None:
    told = tmp_path / "told"
    svc = service("-n", "3", *QUICK, "--post-upgrade",
                  f'echo "$SUPERVISE_OLD_PID|$SUPERVISE_OLD_PIDS|$SUPERVISE_NEW_PID|$SUPERVISE_NEW_PIDS" > {told}')
    old = instances_of(svc.serving())
    svc.deploy("v2", "--tag", "v2")
    assert svc.upgrade()["event"] == "promoted"
    svc.supervise.wait_for("hook")
    new = instances_of(svc.serving())
    by_index = [" ".join(str(pids[index]) for index in sorted(pids)) for pids in (old, new)]
    assert told.read_text().strip() == f"{old[0]}|{by_index[0]}|{new[0]}|{by_index[1]}"


@pytest.mark.timeout(30)
def test_dry_run_shows_the_batches(service: Any) -> None:
    svc = service("-n", "5", "--strategy", "rolling", "--batch", "40%", *QUICK)
    answer = api(svc.control, "POST", "/upgrade?dry_run=1")["plan"]
    assert [batch["start"] for batch in answer["batches"]] == [[0, 1], [2, 3], [4]]
    assert [batch["drain"] for batch in answer["batches"]] == [[0, 1], [2, 3], [4]]
    shown = ctl(svc.control, "upgrade", "--dry-run")
    assert shown.returncode == 0, shown.stderr
    assert "batch 1 of 3: start instances 0,1" in shown.stdout and "batch 3 of 3" in shown.stdout, shown.stdout
    assert [generation["number"] for generation in svc.status()["generations"]] == [1], "a dry run starts nothing"


# -- scaling ------------------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_ctl_scale_up_and_down_under_load(service: Any) -> None:
    svc = service("-n", "2", *QUICK)
    first = instances_of(svc.serving())
    load = start_load(svc.port)
    try:
        up = ctl(svc.control, "scale", "5")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "5 of 5 instances ready" in up.stdout, up.stdout
        grown = instances_of(svc.serving())
        assert sorted(grown) == [0, 1, 2, 3, 4] and {grown[0], grown[1]} == set(first.values())
        down = ctl(svc.control, "scale", "1")
        assert down.returncode == 0, down.stdout + down.stderr
        time.sleep(0.2)
    finally:
        stats = load.stop()
    assert_lossless(stats)
    assert instances_of(svc.serving()) == {0: first[0]}, "scaling down drains the highest indexes"
    for index in range(1, 5):
        assert pid_gone(grown[index], 5)
    assert svc.supervise.of_kind("restarting") == []
    # The new number holds for the next upgrade too.
    svc.deploy("v2", "--tag", "v2")
    assert ctl(svc.control, "scale", "3").returncode == 0
    verdict = svc.upgrade()
    assert verdict["event"] == "promoted" and svc.serving()["ready_instances"] == 3


def test_bad_scale_requests_are_refused(service: Any) -> None:
    svc = service(*QUICK)
    bad = ctl(svc.control, "scale", "0")
    assert bad.returncode == 2 and "0" in bad.stderr, bad.stderr
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(svc.control))
        sock.sendall(b"POST /scale/99999 HTTP/1.0\r\n\r\n")
        answer = sock.recv(4096)
    assert b" 400 " in answer.split(b"\r\n")[0] and b"from 1 to 1024" in answer, answer


@pytest.mark.parametrize("options, message", [
    (["--batch", "2"], "--batch and --max-surge apply to --strategy rolling"),
    (["--strategy", "rolling", "--max-surge", "0"], "invalid --max-surge '0'"),
    (["--strategy", "rolling", "--batch", "150%"], "a percentage from 1% to 100%"),
    (["--strategy", "rolling", "--batch", "two"], "expected a count like 2 or a percentage like 25%"),
    (["--success-percent", "0"], "--success-percent"),
    (["--processes", "0"], "--processes"),
])
def test_bad_strategy_options_are_one_clear_error(options: list[str], message: str) -> None:
    result = subprocess.run([*supervise_command(), *options, "--", "true"], capture_output=True, text=True, timeout=20,
                            check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_processes_from_the_config_file_apply_at_the_next_upgrade(service: Any, tmp_path: Path) -> None:
    config = tmp_path / "supervise.toml"
    config.write_text("processes = 2\nwatch = \"300ms\"\nhealth_interval = \"100ms\"\n")
    svc = service("--config", str(config))
    assert svc.serving()["ready_instances"] == 2
    config.write_text("processes = 3\nstrategy = \"rolling\"\nbatch = 2\nwatch = \"300ms\"\nhealth_interval = \"100ms\"\n")
    verdict = svc.upgrade()
    assert verdict["event"] == "promoted" and verdict["batches"] == [2, 1], verdict
    assert svc.serving()["ready_instances"] == 3
    leftover = [process for process in psutil.Process(svc.supervise.pid).children(recursive=True)
                if process.status() != psutil.STATUS_ZOMBIE]
    assert len(leftover) == 3, leftover


@pytest.mark.timeout(60)
def test_operator_rollback_in_the_middle_of_a_rolling_upgrade_restores_the_old_instances(service: Any) -> None:
    svc = service("-n", "3", "--strategy", "rolling", "--watch", "2s", "--health-interval", "100ms",
                  "--drain-timeout", "5s")
    old = instances_of(svc.serving())
    svc.deploy("v2", "--tag", "v2")
    load = start_load(svc.port)
    try:
        mark = svc.supervise.mark()
        svc.supervise.signal(signal.SIGHUP)
        svc.supervise.wait_for("batch", after=mark, timeout=30)  # batch 1 replaced old instance 0
        svc.supervise.wait_for("watching", after=svc.supervise.mark(), timeout=30)  # batch 2 in its watch window
        result = ctl(svc.control, "rollback")
        time.sleep(0.2)
    finally:
        stats = load.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    verdict = svc.supervise.wait_for("rolled-back", after=mark)
    # A `ctl` process can take over a second to start on a loaded machine: the rollback may land in batch 2's
    # window or just after it. Either way, what the batches drained is exactly what is put back.
    drained = [index for event in svc.supervise.events[mark:] if event["event"] == "batch" for index in event["draining"]]
    assert verdict["reason"] == "rolled back by operator" and verdict["restored"] == len(drained) >= 1, verdict
    assert_lossless(stats)
    generation = svc.serving()
    assert generation["number"] == 1 and generation["ready_instances"] == 3
    kept = {index: pid for index, pid in instances_of(generation).items() if index not in drained}
    assert kept == {index: pid for index, pid in old.items() if index not in drained} and len(kept) == 3 - len(drained)
    assert all(http_get(svc.port, "/")[1].split()[1] == "v1" for _ in range(10))


@pytest.mark.timeout(30)
def test_max_surge_caps_the_batch(service: Any) -> None:
    svc = service("-n", "4", "--strategy", "rolling", "--batch", "50%", "--max-surge", "1", *QUICK)
    plan = api(svc.control, "POST", "/upgrade?dry_run=1")["plan"]
    assert [batch["start"] for batch in plan["batches"]] == [[0], [1], [2], [3]]
    assert "at most 5 processes" in plan["strategy"]


@pytest.mark.timeout(60)
def test_a_crash_looping_instance_never_takes_down_the_ones_that_serve_and_scale_undoes_it(service: Any) -> None:
    svc = service("-n", "2", "--max-restarts", "1", *QUICK)
    before = instances_of(svc.serving())
    # The serving release itself (edited in place) cannot run a third instance, as if a resource ran out.
    write_release(svc.root / "releases" / "v1", "--tag", "v1", only={2: ["--exit-at-start", "3"]})
    mark = svc.supervise.mark()
    assert ctl(svc.control, "scale", "3", "--no-wait").returncode == 0
    looping = svc.supervise.wait_for("restarting", where=lambda event: event.get("crash_loop") is True, after=mark)
    assert looping["delay"] == 30 and "2 instances keep serving" in looping["msg"], looping
    assert svc.supervise.process.poll() is None and not svc.supervise.of_kind("fatal")
    load = start_load(svc.port)
    try:
        began = time.monotonic()
        undo = ctl(svc.control, "scale", "2")
        assert undo.returncode == 0 and time.monotonic() - began < 10, undo.stdout + undo.stderr
    finally:
        stats = load.stop()
    assert stats.failures == 0, stats.summary()
    assert instances_of(svc.serving()) == before


@pytest.mark.timeout(60)
@pytest.mark.parametrize("strategy", ["surge", "rolling"])
def test_an_upgrade_ends_a_crash_loop_at_once_and_fills_the_missing_instance_first(service: Any, tmp_path: Path,
                                                                                   strategy: str) -> None:
    broken = tmp_path / "broken"  # while it exists, instance 2 of v1 cannot start, as if something it needs were gone
    options = ["--strategy", "rolling", "--batch", "1"] if strategy == "rolling" else []
    svc = service("-n", "3", "--max-restarts", "1", *options, *QUICK, script=f"""#!/bin/sh
if [ "$SUPERVISE_INSTANCE" = 2 ] && [ -e {broken} ]; then exit 3; fi
exec {PYTHON} {STUB} --tag v1
""")
    before = instances_of(svc.serving())
    broken.touch()
    mark = svc.supervise.mark()
    os.kill(before[2], signal.SIGKILL)
    svc.supervise.wait_for("restarting", where=lambda event: event.get("crash_loop") is True, after=mark, timeout=30)
    svc.deploy("v2", "--tag", "v2")  # the fix: the next upgrade must not wait out the 30 s crash-loop backoff
    if strategy == "rolling":  # the dead instance is gone already: batch 1 fills its index, costing no capacity
        plan = api(svc.control, "POST", "/upgrade?dry_run=1")["plan"]
        assert [batch["drain"] for batch in plan["batches"]] == [[], [0], [1]], plan["batches"]
    restarts = len(svc.supervise.of_kind("restarting"))
    load = start_load(svc.port)
    try:
        with Sampler(svc.control) as sampler:
            time.sleep(0.2)
            began = time.monotonic()
            verdict = svc.upgrade()
            took = time.monotonic() - began
            time.sleep(0.3)
    finally:
        stats = load.stop()
    assert verdict["event"] == "promoted" and took < 10, (verdict, took)
    assert_lossless(stats)
    assert svc.supervise.of_kind("repair-deferred"), "the crash loop's retry gave way to the upgrade"
    assert min(sampler.ready) >= 2, "the two instances that served kept serving until replaced"
    generation = svc.serving()
    assert generation["number"] == 2 and generation["ready_instances"] == 3
    assert len(svc.supervise.of_kind("restarting")) == restarts, "the crash loop is over, not retried again"
    if strategy == "rolling":
        first = svc.supervise.of_kind("batch")[0]
        assert first["draining"] == [], "the first new instance filled the missing one instead of replacing one"
        assert max(sampler.processes) <= 4, "batch 1: never more than N + 1 processes"


@pytest.mark.timeout(60)
def test_one_sick_instance_among_healthy_ones_fails_the_watch_window(service: Any) -> None:
    svc = service("-n", "3", "--ready", "http/readyz", "--watch", "6s", "--health-interval", "50ms",
                  "--drain-timeout", "5s")
    # Instance 1 of the new release turns sick after it was ready; its healthy siblings answer most checks. (A long
    # window: only about a third of the checks reach instance 1, fewer on a loaded machine; a failure ends it early.)
    svc.deploy("v2", "--tag", "v2", only={1: ["--tag", "v2", "--sick-after", "0.3"]})
    verdict = svc.upgrade()
    assert verdict["event"] == "rolled-back", verdict
    assert verdict["reason"].startswith("unhealthy in watch window: instance 1: 3 consecutive failures"), verdict
    assert svc.serving()["number"] == 1 and svc.serving()["ready_instances"] == 3


@pytest.mark.timeout(60)
def test_liveness_replaces_one_sick_instance_beside_its_siblings(service: Any, tmp_path: Path) -> None:
    once = tmp_path / "sick-once"  # instance 1 turns sick the first time only: its replacement stays healthy
    svc = service("-n", "3", "--ready", "http/readyz", "--watch", "0", "--health-interval", "100ms",
                  "--liveness-interval", "100ms", "--drain-timeout", "5s", script=f"""#!/bin/sh
if [ "$SUPERVISE_INSTANCE" = 1 ] && [ ! -e {once} ]; then touch {once}; exec {PYTHON} {STUB} --sick-after 1; fi
exec {PYTHON} {STUB} --tag v1
""")
    before = instances_of(svc.serving())
    load = start_load(svc.port)
    try:
        unhealthy = svc.supervise.wait_for("unhealthy", timeout=30)
        replaced = svc.supervise.wait_for("ready", where=lambda event: event.get("instance") == 1
                                          and event["pids"][0] != before[1], timeout=30)
        svc.supervise.wait_for("instance-retired", where=lambda event: event.get("instance") == 1, timeout=30)
        time.sleep(0.3)
    finally:
        stats = load.stop()
    assert unhealthy["instance"] == 1 and "3 consecutive failures" in unhealthy["msg"], unhealthy
    assert_lossless(stats)
    after = instances_of(svc.serving())
    assert svc.serving()["number"] == 1 and not svc.supervise.of_kind("promoted")
    assert after == {0: before[0], 1: replaced["pids"][0], 2: before[2]}
    assert pid_gone(before[1], 5)


@pytest.mark.timeout(60)
def test_a_release_rewritten_in_place_is_upgraded_all_at_once_so_it_can_be_rolled_back(service: Any) -> None:
    svc = service("-n", "3", "--strategy", "rolling", "--ready-timeout", "3s", *QUICK)
    old = instances_of(svc.serving())
    # The serving release's own script is overwritten (no new release directory): old instances could not be
    # started again from it, so batches could not be undone.
    write_release(svc.root / "releases" / "v1", "--tag", "v2", only={2: ["--tag", "v2", "--never-ready"]})
    plan = api(svc.control, "POST", "/upgrade?dry_run=1")["plan"]
    assert [batch["start"] for batch in plan["batches"]] == [[0, 1, 2]], plan
    assert any("changed in place" in step for step in plan["steps"]), plan["steps"]
    load = start_load(svc.port)
    try:
        verdict = svc.upgrade()
    finally:
        stats = load.stop()
    fallback = svc.supervise.of_kind("strategy-fallback")
    assert len(fallback) == 1 and "changed in place" in fallback[0]["msg"], fallback
    assert verdict["event"] == "rolled-back" and verdict["restored"] == 0, verdict
    assert_lossless(stats)
    assert instances_of(svc.serving()) == old, "the old instances never stopped"
