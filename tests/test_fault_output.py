"""Faults in what the supervisor writes and whom it writes to (issue 11, items 6 and 12), with real processes.

- A log reader that stalls (stderr a full pipe nobody reads) never freezes the supervisor: status answers,
  upgrades complete, requests are served; what did not fit is dropped, counted and said once reading resumes.
- `ctl rollback` that did not bring the previous release back exits 1.
- An event stream ends properly when the supervisor stops, and a streaming client that went away mid-stream
  leaves no traceback in the supervisor's log.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness import PYTHON, STUB, Supervise, assert_lossless, free_port, http_get, start_load, supervise_command, write_release
from supervisor.logsink import LogSink

O_NONBLOCK = os.O_NONBLOCK
# Each `spawned` log line carries the command line twice: with three 100 kB arguments, one upgrade logs ~600 kB
# and two upgrades more than the 1 MiB the supervisor keeps for a stalled reader (logsink.BUFFER_LIMIT).
PADDING = ["x" * 100_000] * 3


@dataclass
class StalledReader(Supervise):
    """A supervisor whose stderr pipe the test stops reading (and fills) and later reads again."""

    reading: threading.Event = field(default_factory=threading.Event)
    parked: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.reading.set()

    def _read(self) -> None:
        assert self.process.stderr is not None
        fd, pending = self.process.stderr.fileno(), b""
        while True:
            if not self.reading.is_set():
                self.parked.set()
                self.reading.wait()
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                self.log.take(line)
        self.log.end()

    def stall(self) -> int:
        """Stop reading and fill the pipe to the brim; returns the bytes written into it."""
        assert self.process.stderr is not None
        # A write end of our own, non-blocking, opened on the pipe (the supervisor's description is left alone).
        filler = os.open(f"/proc/self/fd/{self.process.stderr.fileno()}", os.O_WRONLY | O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.parked.clear()
            self.reading.clear()
            os.write(filler, b"\n")  # wakes the reader if it waits in read(): it parks before reading again
            assert self.parked.wait(10), "the reader did not stop"
            return _fill(filler, b"filler: nobody reads this pipe now\n") + _fill(filler, b"\n")
        finally:
            os.close(filler)

    def resume(self) -> None:
        self.reading.set()


def _fill(fd: int, piece: bytes) -> int:
    written = 0
    try:
        while True:
            written += os.write(fd, piece * max(1, 4096 // len(piece)))
    except BlockingIOError:
        return written


def release_without_stderr(directory: Path, *flags: str) -> Path:
    """A release script whose server writes its own messages to /dev/null: a child that writes to a full stderr
    pipe blocks, which is its own business; this test is about the supervisor's."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "run"
    script.write_text(f"#!/bin/sh\nexec {PYTHON} {STUB} {' '.join(flags)} 2>/dev/null\n")
    script.chmod(0o755)
    return script


def metric(sup: Supervise, name: str) -> float:
    result = sup.ctl("metrics", timeout=30)
    assert result.returncode == 0, result.stderr
    found = re.search(rf"^{name} (\S+)$", result.stdout, re.MULTILINE)
    assert found, f"no {name} in the metrics"
    return float(found.group(1))


def status_round_trip(control: str) -> float:
    """Seconds for one raw `GET /status` on the control socket, from connect to the end of the answer."""
    began = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(control)
        client.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    return time.monotonic() - began


def flags_of(pid: int, fd: int) -> int:
    """The file status flags of `fd` in process `pid` (from /proc/PID/fdinfo, octal)."""
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return int(line.split()[1], 8)
    raise AssertionError(f"no flags in /proc/{pid}/fdinfo/{fd}")


# -- item 6: the event loop never blocks on its own output ----------------------------------------------------------


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A real pipe (read end, write end), shrunk to one page so that it fills fast."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    yield read_end, write_end
    for fd in (read_end, write_end):
        os.close(fd)


def _read_until(fd: int, end: bytes, into: bytearray, timeout: float = 10.0) -> None:
    """Read the pipe into `into` until `end` has arrived (a reader that came back)."""
    deadline = time.monotonic() + timeout
    while not into.endswith(end) and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            into.extend(os.read(fd, 1 << 16))


def _wait_drained(fd: int, received: bytearray, timeout: float = 10.0) -> None:
    """Wait until the reader has emptied the pipe (so that the next write has room)."""
    unread = array.array("i", [0])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fcntl.ioctl(fd, termios.FIONREAD, unread)
        if received and unread[0] == 0:
            return
        time.sleep(0.01)
    raise AssertionError("the reader did not empty the pipe")


def test_the_sink_buffers_then_drops_and_says_so_in_place(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    sink = LogSink.open(write_end, lambda count: f"-- {count} dropped --")
    assert sink is not None
    sink.limit = 8192
    assert not fcntl.fcntl(write_end, fcntl.F_GETFL) & O_NONBLOCK, "the shared description must stay blocking"
    assert fcntl.fcntl(sink.output.fd, fcntl.F_GETFL) & O_NONBLOCK
    lines = [f"line {number:04d} " + "." * 90 for number in range(200)]  # 20 kB: a 4 kB pipe + 8 kB of buffer
    began = time.monotonic()
    for line in lines:
        sink.write_line(line)
    assert time.monotonic() - began < 1.0, "a full pipe made a write wait"
    assert 0 < sink.dropped_total < 200
    received = bytearray()
    reader = threading.Thread(target=_read_until, args=(read_end, b"after\n", received), daemon=True)
    reader.start()
    _wait_drained(read_end, received)
    sink.write_line("after")  # the reader is back: what was buffered goes out, then the notice, then this line
    sink.close(timeout=5)
    reader.join(10)
    out = received.decode().splitlines()
    assert out[-2:] == [f"-- {sink.dropped_total} dropped --", "after"], out[-3:]
    kept = out[:-2]
    assert kept == lines[:len(kept)], "lines are written whole and in order, the dropped ones are the newest"
    assert len(kept) + sink.dropped_total == len(lines)


def test_the_event_loop_writes_the_buffer_out_when_the_reader_comes_back(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    sink = LogSink.open(write_end, lambda count: f"-- {count} dropped --")
    assert sink is not None
    received = bytearray()

    async def main() -> None:
        for number in range(100):  # 10 kB into a 4 kB pipe: the rest waits for the loop to see room
            sink.write_line(f"line {number:04d} " + "." * 90)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while received.count(b"\n") < 100 and loop.time() < deadline:
            received.extend(await loop.run_in_executor(None, os.read, read_end, 1 << 16))  # a slow, late reader

    asyncio.run(main())
    assert received.count(b"\n") == 100 and sink.dropped_total == 0, (received[-200:], sink.dropped_total)
    sink.close(timeout=1)


def test_closing_with_a_stalled_reader_takes_bounded_time(pipe: tuple[int, int]) -> None:
    _, write_end = pipe
    sink = LogSink.open(write_end, lambda count: f"-- {count} dropped --")
    assert sink is not None
    for number in range(100):
        sink.write_line(f"line {number:04d} " + "." * 90)
    began = time.monotonic()
    sink.close(timeout=0.5)
    assert 0.4 < time.monotonic() - began < 3.0
    assert sink.dropped_total > 50  # what never went out is counted


@pytest.mark.timeout(180)
def test_a_stalled_log_reader_never_freezes_the_supervisor(tmp_path: Path, running: list[Supervise]) -> None:
    port = free_port()
    script = release_without_stderr(tmp_path / "app", "--tag", "v1")
    sup = StalledReader(["-l", f"127.0.0.1:{port}", "--watch", "1s", "--drain-timeout", "5s", "--", str(script),
                         *PADDING])
    running.append(sup)
    sup.start()
    sup.wait_for("serving")
    assert not flags_of(sup.pid, 2) & O_NONBLOCK, "stderr is shared with the children: its flags are not ours to change"

    filled = sup.stall()
    load = start_load(port)
    verdicts = []
    for _ in range(2):
        upgrade = sup.ctl("upgrade", timeout=60)  # blocked on its first log line, the old supervisor never answered
        assert upgrade.returncode == 0, (upgrade.stdout[-2000:], upgrade.stderr)
        verdicts.append(upgrade.stdout.splitlines()[-1])
    began = time.monotonic()
    status = sup.ctl("status", "--json", timeout=30)
    took = time.monotonic() - began
    assert sup.private_dir is not None
    round_trip = status_round_trip(os.path.join(sup.private_dir, "control.sock"))
    stats = load.stop()
    dropped = metric(sup, "supervise_log_dropped_total")
    print(f"\nstderr pipe full ({filled} bytes) and unread: 2 upgrades {verdicts}; `ctl status` took {took:.3f}s "
          f"(GET /status {round_trip * 1000:.1f} ms); {stats.failures} of {stats.requests} requests failed; "
          f"{dropped:.0f} log lines dropped")
    assert status.returncode == 0 and took < 5.0, (took, status.stderr)
    assert round_trip < 2.0, round_trip
    assert '"number": 3' in status.stdout and '"number": 1' not in status.stdout, "old generations not drained"
    assert_lossless(stats)
    assert dropped >= 1
    assert not flags_of(sup.pid, 2) & O_NONBLOCK

    sup.resume()
    said = sup.wait_for("log-dropped", timeout=30)
    assert said["level"] == "warning" and said["dropped"] >= 1, said
    assert said["msg"].startswith(f"dropped {said['dropped']} log line"), said
    sup.wait_for("promoted", where=lambda event: event["gen"] == 3)  # what was buffered came out, in order
    assert sum(event["dropped"] for event in sup.of_kind("log-dropped")) == metric(sup, "supervise_log_dropped_total")
    assert sup.ctl("status").returncode == 0


# -- item 12: ctl rollback's exit code, event streams at stop -------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_rollback_that_fails_exits_non_zero(tmp_path: Path, running: list[Supervise]) -> None:
    releases, current = tmp_path / "releases", tmp_path / "current"
    write_release(releases / "v1", "--tag", "v1")
    write_release(releases / "v2", "--tag", "v2")
    current.symlink_to(releases / "v1")
    port = free_port()
    sup = Supervise(["-l", f"127.0.0.1:{port}", "--chdir", str(current), "--watch", "0", "--drain-timeout", "5s",
                     "--", "./run"]).start()
    running.append(sup)
    sup.wait_for("serving")
    current.unlink()
    current.symlink_to(releases / "v2")
    assert sup.ctl("upgrade").returncode == 0
    sup.wait_for("retired", where=lambda event: event["gen"] == 1)

    shutil.rmtree(releases / "v1")  # the previous release is gone: re-deploying it cannot work
    result = sup.ctl("rollback")
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "rolled back: exec failed" in result.stdout, result.stdout
    assert result.stdout.splitlines()[-1] == "rollback failed: the previous release is not serving", result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert http_get(port)[1].split()[1] == "v2"


def _ctl_events(control: str) -> subprocess.Popen[str]:
    """A `supervise ctl events` process following the event stream."""
    return subprocess.Popen([*supervise_command(), "ctl", "--control", control, "events"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def _events_client(control: str) -> socket.socket:
    """A raw `GET /events` whose answer head has arrived: the stream is open."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    client.connect(control)
    client.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += client.recv(4096) or b"<closed>"
        assert not head.endswith(b"<closed>"), head
    assert head.startswith(b"HTTP/1.1 200"), head
    return client


def _read_line(stream: object, timeout: float) -> str:
    """The next line of a subprocess's stdout, within `timeout`."""
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(stream.readline()), daemon=True)  # type: ignore[attr-defined]
    reader.start()
    reader.join(timeout)
    assert found, f"no line within {timeout}s"
    return found[0]


def _signal_until_every_stream_shows_it(sup: Supervise, followers: list[subprocess.Popen[str]],
                                        raw: socket.socket, limit: float = 30.0) -> None:
    """Forward SIGWINCH (an event every stream receives) until each stream has shown it. A `ctl events` process
    subscribes only once it has started — over a second on a loaded machine — so one signal may come too early."""
    waiting, raw_seen = list(followers), False
    raw.settimeout(0.2)
    deadline = time.monotonic() + limit
    while waiting or not raw_seen:
        assert time.monotonic() < deadline, f"{len(waiting)} ctl events stream(s) never showed a forwarded signal"
        assert sup.ctl("signal", "WINCH").returncode == 0
        readable, _, _ = select.select([follower.stdout for follower in waiting], [], [], 0.5)
        waiting = [follower for follower in waiting
                   if follower.stdout not in readable or "forwarded SIGWINCH" not in follower.stdout.readline()]
        if not raw_seen:
            try:
                raw_seen = b"signal-forwarded" in raw.recv(65536)
            except TimeoutError:
                pass


@pytest.mark.timeout(60)
def test_event_streams_end_quietly_when_the_supervisor_stops(tmp_path: Path, running: list[Supervise]) -> None:
    script = write_release(tmp_path / "app", "--tag", "v1")
    sup = Supervise(["-l", f"127.0.0.1:{free_port()}", "--drain-timeout", "5s", "--", str(script)]).start()
    running.append(sup)
    sup.wait_for("serving")
    assert sup.private_dir is not None
    control = os.path.join(sup.private_dir, "control.sock")
    follower, killed = _ctl_events(control), _ctl_events(control)
    try:
        gone = _events_client(control)
        _signal_until_every_stream_shows_it(sup, [follower, killed], gone)  # all streams are open
        killed.kill()  # clients that go away mid-stream: a killed `ctl events`, a script that closes its socket
        killed.wait(5)
        gone.close()

        sup.signal(signal.SIGTERM)
        assert sup.wait_exit(20) == 0
        out, err = follower.communicate(timeout=10)
    finally:
        for process in (follower, killed):
            if process.poll() is None:
                process.kill()
                process.wait(5)
    sup.stop()
    assert follower.returncode == 0 and err == "", (follower.returncode, err)
    assert out.splitlines()[-1].endswith(" stopped"), out
    assert not [line for line in sup.lines if "Traceback" in line or "Error handling request" in line], sup.lines[-30:]


@pytest.mark.timeout(60)
def test_an_upgrade_client_that_leaves_mid_stream_leaves_no_traceback(tmp_path: Path,
                                                                      running: list[Supervise]) -> None:
    script = write_release(tmp_path / "app", "--tag", "v1")
    port = free_port()
    sup = Supervise(["-l", f"127.0.0.1:{port}", "--watch", "1s", "--drain-timeout", "5s", "--", str(script)]).start()
    running.append(sup)
    sup.wait_for("serving")
    write_release(tmp_path / "app", "--tag", "v2", "--start-delay", "1")
    assert sup.private_dir is not None
    mark = sup.mark()
    client = subprocess.Popen([*supervise_command(), "ctl", "--control", os.path.join(sup.private_dir, "control.sock"),
                               "upgrade"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              stdin=subprocess.DEVNULL)
    try:
        assert "upgrade requested" in _read_line(client.stdout, 20)  # the stream is open, the upgrade under way
    finally:
        client.kill()
        client.wait(5)
    promoted = sup.wait_for("promoted", after=mark, timeout=30)  # what it asked for goes on without it
    sup.wait_for("retired", after=mark, where=lambda event: event["gen"] == 1)
    assert promoted["gen"] == 2 and http_get(port)[1].split()[1] == "v2"
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(20) == 0
    sup.stop()
    assert not [line for line in sup.lines if "Traceback" in line or "Error handling request" in line], sup.lines[-30:]
