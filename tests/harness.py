"""Running a real `supervise` in tests: JSON log events, waiting for them, and cleaning up after.

Every process a test starts is stopped by pid (or its own process group) in teardown, never by name.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from supervisor.testing import release as testing_release
from supervisor.testing.checkout import APP, PYTHON, ROOT, STUB
from supervisor.testing.loadgen import LoadGenerator, LoadStats
from supervisor.testing.net import free_port, http_get
from supervisor.testing.proclog import ProcessLog

__all__ = ["APP", "PYTHON", "ROOT", "STUB", "Supervise", "assert_lossless", "free_port", "http_get", "pid_gone",
           "start_load", "started", "supervise_command", "wait_port_free", "write_release"]
VERDICTS = ("promoted", "rolled-back", "upgrade-refused")
# On loopback a handshake in flight when a generation stops getting new connections lands within microseconds:
# the tests' old generations need not wait the 1 s default (meant for real networks) before they are signalled.
DRAIN_DELAY = "100ms"
# A lowered start-up gets only CPU nobody else wants, and on a CI machine running two test files at once there is
# little: each upgrade would wait up to its 5 s bound. The tests of the rollout start new generations at normal
# priority unless they pass --start-priority themselves; test_start_priority.py tests the lowering.
START_PRIORITY = "normal"


def write_release(directory: Path, *flags: str, only: dict[int, list[str]] | None = None) -> Path:
    """A release of the stub server in `directory` (supervisor.testing.release)."""
    return testing_release.write_release(directory, Path(STUB), *flags, only=only)


def start_load(port: int, concurrency: int = 4) -> LoadGenerator:
    """Closed-loop load on 127.0.0.1:port (new connection per request) until stopped."""
    load = LoadGenerator("127.0.0.1", port, "/", concurrency=concurrency, max_seconds=60.0, timeout=10.0)
    load.start()
    return load


def assert_lossless(stats: LoadStats) -> None:
    assert stats.requests > 50, stats.summary()
    assert stats.failures == 0, stats.summary()


def supervise_command() -> list[str]:
    """The supervise entry point of the environment running the tests."""
    return [PYTHON, "-m", "supervisor"]


@dataclass
class Supervise:
    """A running supervisor whose JSON log lines are collected as events."""

    args: list[str]
    env: dict[str, str] | None = None
    cwd: str | None = None
    wrapper: list[str] = field(default_factory=list)  # argv prefix, e.g. a shell that sets up inherited fds
    pass_fds: tuple[int, ...] = ()
    private_dir: str | None = None
    own_control: bool = True  # False: the control socket and state are left to --name in $XDG_RUNTIME_DIR/supervise
    process: subprocess.Popen[bytes] = field(init=False)
    log: ProcessLog = field(default_factory=ProcessLog)
    _reader: threading.Thread = field(init=False)

    def start(self) -> Supervise:
        options = list(self.args)
        if "--control" not in options and self.own_control:  # a private control socket and state: tests never meet
            self.private_dir = tempfile.mkdtemp(prefix="supervise-test-")
            options[:0] = ["--control", os.path.join(self.private_dir, "control.sock")]
        if not any(option.startswith("--drain-delay") for option in options):
            options[:0] = ["--drain-delay", DRAIN_DELAY]
        if not any(option.startswith("--start-priority") for option in options):
            options[:0] = ["--start-priority", START_PRIORITY]
        argv = [*self.wrapper, *supervise_command(), "--log-format", "json", "--log-level", "debug", *options]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        env=self.env, cwd=self.cwd, start_new_session=True, pass_fds=self.pass_fds)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        """The reader thread: the supervisor's stderr into the log."""
        assert self.process.stderr is not None
        self.log.follow(self.process.stderr)

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.log.events

    @property
    def lines(self) -> list[str]:
        return self.log.lines

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for(self, kind: str, timeout: float = 20.0, where: Callable[[dict[str, Any]], bool] | None = None,
                 after: int = 0) -> dict[str, Any]:
        """The first event of `kind` (optionally matching `where`) at index >= `after`; fails the test on timeout."""
        index = self.log.first("events", lambda event: event["event"] == kind and (where is None or where(event)),
                               after, timeout)
        if index is None:
            raise AssertionError(f"no {kind!r} event within {timeout}s; log:\n" + self.log.tail())
        return self.log.events[index]

    def wait_line(self, match: Callable[[str], bool], timeout: float = 20.0, after: int = 0) -> str:
        """The first stderr line at index >= `after` that `match`es; fails the test on timeout."""
        index = self.log.first("lines", match, after, timeout)
        if index is None:
            raise AssertionError(f"no such line within {timeout}s; log:\n" + self.log.tail())
        return self.log.lines[index]

    def mark(self) -> int:
        """Index to pass as `after=` so a wait only sees events from now on."""
        return self.log.marks()[1]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        with self.log.changed:
            return [event for event in self.log.events if event["event"] == kind]

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def upgrade(self, timeout: float = 30.0) -> dict[str, Any]:
        """SIGHUP and wait for the verdict: the `promoted`, `rolled-back` or `upgrade-refused` event."""
        mark = self.mark()
        self.signal(signal.SIGHUP)
        index = self.log.first("events", lambda event: event["event"] in VERDICTS, mark, timeout)
        if index is None:
            raise AssertionError("upgrade gave no verdict; log:\n" + self.log.tail())
        return self.log.events[index]

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """`supervise ctl ARGS` against this supervisor's control socket."""
        options = list(self.args)
        control = options[options.index("--control") + 1] if "--control" in options else None
        if control is None:
            assert self.private_dir is not None
            control = os.path.join(self.private_dir, "control.sock")
        return subprocess.run([*supervise_command(), "ctl", "--control", control, *args], capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def wait_exit(self, timeout: float = 20.0) -> int:
        return self.process.wait(timeout)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self) -> None:
        """Stop the supervisor and everything it started (by pid and process group), however it is doing."""
        family = self.descendants()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(5)
        for process in family:
            try:
                process.kill()
            except psutil.Error:
                pass
        self._reader.join(5)
        if self.private_dir:
            shutil.rmtree(self.private_dir, ignore_errors=True)


def started(args: list[str], **kwargs: Any) -> Iterator[Supervise]:
    """Context-style helper for fixtures: start, yield, always stop."""
    supervise = Supervise(args, **kwargs).start()
    try:
        yield supervise
    finally:
        supervise.stop()


def wait_port_free(port: int, timeout: float = 10.0) -> bool:
    """Whether nothing listens on 127.0.0.1:port anymore (within `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                return True
        time.sleep(0.05)
    return False


def pid_gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether `pid` has exited (or is a zombie) within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False
