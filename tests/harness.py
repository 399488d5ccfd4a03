"""Running a real `supervise` in tests: JSON log events, waiting for them, and cleaning up after.

Every process a test starts is stopped by pid (or its own process group) in teardown, never by name.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from supervisor.testing import release as testing_release
from supervisor.testing.loadgen import LoadGenerator, LoadStats
from supervisor.testing.ports import free_port  # noqa: F401 - the tests take it from here

ROOT = Path(__file__).resolve().parent.parent
STUB = str(ROOT / "tests" / "servers" / "stub.py")
APP = str(ROOT / "examples" / "app.py")
PYTHON = sys.executable


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


def http_get(port: int, path: str = "/", timeout: float = 5.0, host: str = "127.0.0.1") -> tuple[int, str]:
    """GET on a fresh connection; (status, body). HTTP errors are returned, not raised."""
    url = f"http://{host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


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
    events: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _reader: threading.Thread = field(init=False)

    def start(self) -> Supervise:
        options = list(self.args)
        if "--control" not in options and self.own_control:  # a private control socket and state: tests never meet
            self.private_dir = tempfile.mkdtemp(prefix="supervise-test-")
            options[:0] = ["--control", os.path.join(self.private_dir, "control.sock")]
        argv = [*self.wrapper, *supervise_command(), "--log-format", "json", "--log-level", "debug", *options]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        env=self.env, cwd=self.cwd, start_new_session=True, pass_fds=self.pass_fds)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            self._take(raw)
        with self._changed:
            self._changed.notify_all()

    def _take(self, raw: bytes) -> None:
        """One line of the supervisor's stderr: kept, and parsed if it is one of our JSON events."""
        line = raw.decode(errors="replace").rstrip("\n")
        with self._changed:
            self.lines.append(line)
            try:  # a child's own output may precede our JSON on the same line (shared stderr)
                event = json.loads(line[line.index('{"ts"'):]) if '{"ts"' in line else None
            except ValueError:
                event = None
            if isinstance(event, dict) and "event" in event:
                self.events.append(event)
            self._changed.notify_all()

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for(self, kind: str, timeout: float = 20.0, where: Callable[[dict[str, Any]], bool] | None = None,
                 after: int = 0) -> dict[str, Any]:
        """The first event of `kind` (optionally matching `where`) at index >= `after`; fails the test on timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for event in self.events[after:]:
                    if event["event"] == kind and (where is None or where(event)):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no {kind!r} event within {timeout}s; log:\n" + "\n".join(self.lines[-40:]))
                self._changed.wait(min(remaining, 0.2))

    def mark(self) -> int:
        """Index to pass as `after=` so a wait only sees events from now on."""
        with self._changed:
            return len(self.events)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        with self._changed:
            return [event for event in self.events if event["event"] == kind]

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def upgrade(self, timeout: float = 30.0) -> dict[str, Any]:
        """SIGHUP and wait for the verdict: the `promoted` or `rolled-back` event."""
        mark = self.mark()
        self.signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events[mark:]:
                if event["event"] in ("promoted", "rolled-back", "upgrade-refused"):
                    return event
            if time.monotonic() > deadline:
                raise AssertionError("upgrade gave no verdict; log:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.02)

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
