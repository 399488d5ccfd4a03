"""The children's output through supervise (--child-output prefix): a failed release's last words in every
verdict, `ctl logs`, a 100 MB burst that never makes the supervisor deaf, zero failed requests with every
request logged, and the pipes carried across a re-exec. Real supervisors, real children, real sockets."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from harness import (
    PYTHON,
    STUB,
    Supervise,
    assert_lossless,
    free_port,
    http_get,
    start_load,
    write_release,
)

from supervisor.control.client import Endpoint

QUICK = ["--drain-timeout", "5s", "--health-interval", "200ms", "--watch", "500ms"]
BURST_MB = 100
STATUS_BOUND = 0.1  # what the burst may cost a status request, measured quiet (benchmarks/child_output.py)
STATUS_MARGIN = 5  # a busy 2-core CI machine, another test file beside this one


def start(running: list[Supervise], *args: str, env: dict[str, str] | None = None) -> Supervise:
    sup = Supervise([*QUICK, *args], env=env).start()
    running.append(sup)
    sup.wait_for("serving")
    return sup


def output_of(sup: Supervise, where: str) -> list[dict[str, Any]]:
    """The children's lines the supervisor logged (JSON `output` objects) that contain `where`."""
    return [event for event in sup.events if event["event"] == "output" and where in event["msg"]]


def bad_release(directory: Path) -> None:
    """A release that says something, then raises at import, as a deploy missing a dependency does."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "run"
    script.write_text(f"#!/bin/sh\necho 'starting release 2'\nexec {PYTHON} -c 'import foo'\n")
    script.chmod(0o755)


@pytest.mark.timeout(60)
def test_a_release_that_raises_at_import_says_why_everywhere(tmp_path: Path, running: list[Supervise]) -> None:
    releases, current = tmp_path / "releases", tmp_path / "current"
    write_release(releases / "v1", "--tag", "v1")
    bad_release(releases / "v2")
    current.symlink_to(releases / "v1")
    hook_env = tmp_path / "hook.json"
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "notify"))
    systemd.settimeout(10)
    port = free_port()
    sup = start(running, "-l", f"127.0.0.1:{port}", "--chdir", str(current),
                "--on-rollback", f"{PYTHON} -c 'import json, os; print(json.dumps(dict(os.environ)))' > {hook_env}",
                "--", "./run", env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")})
    current.unlink()
    current.symlink_to(releases / "v2")
    last = "ModuleNotFoundError: No module named 'foo'"

    done = sup.ctl("upgrade")
    assert done.returncode == 1, (done.stdout, done.stderr)
    verdict = done.stdout.strip().splitlines()[-1]
    assert verdict.startswith("rolled back:") and verdict.endswith(f"last output: {last}"), done.stdout
    assert "  starting release 2" in done.stdout and "  Traceback (most recent call last):" in done.stdout

    rolled = sup.wait_for("rolled-back")
    assert rolled["reason"].endswith(f"; last output: {last}") and rolled["output"][-1] == last, rolled
    exited = sup.wait_for("exited", where=lambda event: event.get("gen") == 2)
    lines = [event for event in sup.events if event["event"] == "output" and event["gen"] == 2]
    assert lines[-1]["msg"] == last and sup.events.index(lines[-1]) < sup.events.index(exited), \
        "what it wrote comes out before its exit is reported"
    assert {line["stream"] for line in lines} == {"stdout", "stderr"} and lines[0]["msg"] == "starting release 2"

    sup.wait_for("hook", where=lambda event: event.get("hook") == "on-rollback")
    env = json.loads(hook_env.read_text())
    assert env["SUPERVISE_OUTPUT"].splitlines()[-1] == last and env["SUPERVISE_REASON"].endswith(last)
    record = json.loads(sup.ctl("status", "--json").stdout)["history"][-1]
    assert record["output"][-1] == last and record["reason"].endswith(last), record
    statuses = []
    while not any(last in status for status in statuses):
        message = systemd.recv(4096).decode()
        statuses += [line for line in message.splitlines() if line.startswith("STATUS=")]
    assert any(status.startswith("STATUS=upgrade to generation 2 rolled back: ") and last in status
               for status in statuses), statuses
    systemd.close()
    assert http_get(port)[1].split()[1] == "v1"
    kept = sup.ctl("logs", "--gen", "2").stdout.splitlines()  # the failed release is gone; its last lines are kept
    assert kept and kept[-1].endswith(f"] {last}") and "starting release 2" in kept[0], kept
    assert sup.ctl("reexec").returncode == 0
    assert sup.ctl("logs", "--gen", "2").stdout.splitlines() == kept, "kept across a re-exec of the supervisor"


DYING = """
import sys, time
time.sleep(0.3)
print("fatal: the database went away", flush=True)
sys.exit(4)
"""


@pytest.mark.timeout(60)
def test_a_restart_says_what_the_instance_said_last(running: list[Supervise]) -> None:
    sup = start(running, "--ready", "delay:100ms", "--", PYTHON, "-c", DYING)
    restarting = sup.wait_for("restarting")
    assert restarting["reason"].endswith("exited with status 4; last output: fatal: the database went away"), \
        restarting


@pytest.mark.timeout(60)
def test_ctl_logs_shows_the_lines_of_each_instance(tmp_path: Path, running: list[Supervise]) -> None:
    port = free_port()
    sup = start(running, "-l", f"127.0.0.1:{port}", "-n", "2", "--", PYTHON, STUB, "--log-requests")
    pids = {instance["index"]: instance["pid"]
            for instance in json.loads(sup.ctl("status", "--json").stdout)["generations"][0]["instances"]}
    for _ in range(4):
        assert http_get(port)[0] == 200

    done = sup.ctl("logs", "--gen", "1", "--instance", "1", "-n", "100", "--json")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines and {(line["gen"], line["instance"], line["pid"]) for line in lines} == {(1, 1, pids[1])}
    assert any("listening on fd 3" in line["msg"] for line in lines)
    assert [line["seq"] for line in lines] == sorted(line["seq"] for line in lines)

    both = sup.ctl("logs", "-n", "1000").stdout.splitlines()
    assert any(f"[gen 1 #0 pid {pids[0]}] stub: pid {pids[0]}" in line for line in both), both
    assert any(f"[gen 1 #1 pid {pids[1]}] stub: pid {pids[1]}" in line for line in both), both
    assert len(sup.ctl("logs", "-n", "3").stdout.splitlines()) == 3
    assert sup.ctl("logs", "--gen", "7").stdout == ""

    follower = subprocess.Popen([PYTHON, "-m", "supervisor", "ctl", "--control", str(Path(str(sup.private_dir)) /
                                 "control.sock"), "logs", "-n", "0", "-f"], stdout=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # its first answer (none of the old lines) is in
        http_get(port, "/followed")
        assert follower.stdout is not None
        followed = iter(follower.stdout.readline, "")
        assert any('"GET /followed" 404' in line for line in followed)  # after liveness probes' lines, maybe
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(5)


@pytest.mark.timeout(60)
def test_inherit_passes_the_output_through_untouched(tmp_path: Path, running: list[Supervise]) -> None:
    sup = start(running, "--child-output", "inherit", "-l", f"127.0.0.1:{free_port()}", "--", PYTHON, STUB)
    sup.wait_line(lambda line: line.startswith("stub: pid ") and "listening on fd 3" in line)
    assert not output_of(sup, "stub:")
    done = sup.ctl("logs")
    assert done.returncode == 1 and "--child-output inherit" in done.stderr, done


def _status_times(endpoint: Endpoint, port: int) -> tuple[list[float], str]:
    """Ask for the status again and again while the child writes BURST_MB MiB: each answer's time, and the
    child's last line once the burst is over."""
    assert http_get(port, f"/burst?mb={BURST_MB}")[0] == 200
    times: list[float] = []
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        began = time.monotonic()
        endpoint.json(endpoint.request("GET", "/status"))
        times.append(time.monotonic() - began)
        last = endpoint.json(endpoint.request("GET", "/logs?lines=1"))["lines"]
        if last and "burst done" in last[-1]["msg"]:
            return times, last[-1]["msg"]
        time.sleep(0.005)
    raise AssertionError(f"the burst did not end within 40s ({len(times)} status requests)")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("reader", ["fast", "stalled"])
def test_a_100_mb_burst_leaves_the_supervisor_answering(tmp_path: Path, reader: str) -> None:
    """A fast reader (/dev/null) makes the supervisor relay every line; a stalled one (a pipe nobody reads) makes
    it drop and count them. Either way a status request is answered at once, and nothing blocks the child."""
    port, control = free_port(), tmp_path / "control.sock"
    read_end, write_end = os.pipe()
    process = subprocess.Popen([PYTHON, "-m", "supervisor", "--control", str(control), "-l", f"127.0.0.1:{port}",
                                "--watch", "0", "--", PYTHON, STUB], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, start_new_session=True,
                               stderr=write_end if reader == "stalled" else subprocess.DEVNULL)
    os.close(write_end)
    try:
        endpoint = Endpoint(control)
        deadline = time.monotonic() + 20
        while not endpoint_serving(endpoint):
            assert time.monotonic() < deadline, "the supervisor did not start serving"
            time.sleep(0.05)
        times, last = _status_times(endpoint, port)
        worst = max(times)
        print(f"\n{reader} reader: {BURST_MB} MiB burst; status answered {len(times)} times, slowest "
              f"{worst * 1000:.1f} ms; {last}")
        assert worst < STATUS_BOUND * STATUS_MARGIN, f"a status request took {worst * 1000:.0f} ms during the burst"
        metrics = endpoint.read(endpoint.request("GET", "/metrics")).decode()
        dropped = next(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("supervise_child_output_dropped_total"))
        assert (dropped > 0) if reader == "stalled" else (dropped == 0), dropped
        assert http_get(port)[0] == 200
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
        os.close(read_end)


def endpoint_serving(endpoint: Endpoint) -> bool:
    try:
        status = endpoint.json(endpoint.request("GET", "/status"))
    except Exception:  # noqa: BLE001 - not up yet: whatever the client raises, ask again
        return False
    return any(generation.get("serving") for generation in status.get("generations", []))


@pytest.mark.timeout(120)
def test_every_request_logged_costs_no_failed_request_across_upgrades(tmp_path: Path,
                                                                      running: list[Supervise]) -> None:
    port = free_port()
    script = write_release(tmp_path / "app", "--tag", "v1", "--log-requests")
    sup = start(running, "-l", f"127.0.0.1:{port}", "-n", "2", "--", str(script))
    load = start_load(port)
    try:
        for tag in ("v2", "v3"):
            write_release(tmp_path / "app", "--tag", tag, "--log-requests")
            assert sup.upgrade()["event"] == "promoted"
    finally:
        stats = load.stop()
    print(f"\n2 upgrades under load, every request logged through supervise: {stats.summary()}")
    assert_lossless(stats)
    assert len(output_of(sup, '"GET /" 200')) >= stats.requests * 0.9, "the access log went through supervise"


LAST_TICK = 150  # 3 s of ticks: the lines of a re-exec fit in what a ring keeps (200) on a busy machine too
TICKER = """
import os, sys, time
number = 0
while True:
    number += 1
    os.write(1, b"tick %d\\n" % number)
    time.sleep(0.02)
"""


@pytest.mark.timeout(90)
def test_output_survives_a_reexec(tmp_path: Path, running: list[Supervise]) -> None:
    sup = start(running, "--ready", "delay:200ms", "--", PYTHON, "-c", TICKER)
    pid = next(iter(sup.descendants())).pid
    sup.wait_for("output", where=lambda event: event["msg"] == "tick 50")
    follower = subprocess.Popen([PYTHON, "-m", "supervisor", "ctl", "--control", str(Path(str(sup.private_dir)) /
                                 "control.sock"), "logs", "-n", "0", "-f", "--json"], stdout=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
    try:
        assert follower.stdout is not None
        first = int(json.loads(follower.stdout.readline())["msg"].split()[1])  # it follows
        mark = sup.mark()
        done = sup.ctl("reexec")
        assert done.returncode == 0, (done.stdout, done.stderr)
        sup.wait_for("reexecuted", after=mark)
        sup.wait_for("output", after=mark, where=lambda event: event["msg"] == f"tick {LAST_TICK}", timeout=30)
        followed = [int(json.loads(follower.stdout.readline())["msg"].split()[1]) for _ in range(LAST_TICK - first)]
        assert followed == list(range(first + 1, LAST_TICK + 1)), "the follower went on across the exec"
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(5)
    ticks = [int(event["msg"].split()[1]) for event in sup.events if event["event"] == "output"]
    assert ticks[:LAST_TICK] == list(range(1, LAST_TICK + 1)), "every line, in order, none lost or repeated"
    assert {event["pid"] for event in sup.events if event["event"] == "output"} == {pid}
    kept = sup.ctl("logs", "-n", "200", "--json").stdout.splitlines()
    numbers = [int(json.loads(line)["msg"].split()[1]) for line in kept]
    assert numbers[0] <= first and numbers == list(range(numbers[0], numbers[0] + len(numbers))), \
        "the lines kept before the exec are kept after it"
    assert psutil.Process(pid).ppid() == sup.pid
