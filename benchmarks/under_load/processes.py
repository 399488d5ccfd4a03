"""The processes and loads the benchmark starts, each tracked so that everything is stopped at the end, also on
Ctrl-C or SIGTERM: by pid and process group, never by name."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, ClassVar

import psutil

from supervisor.testing.loadgen import LoadGenerator, LoadStats
from supervisor.testing.proclog import ProcessLog, Stream

HOST = "127.0.0.1"  # the only address this benchmark ever targets
REQUEST_TIMEOUT = 5.0  # per request, seconds
STRIPPED_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "LISTEN_PIDFDID", "NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC")


class BenchError(Exception):
    """Something the benchmark needs did not happen (a server did not start, an event never came)."""


def child_env() -> dict[str, str]:
    """Our environment minus anything that would make a child think it is socket-activated or notified."""
    return {key: value for key, value in os.environ.items() if key not in STRIPPED_ENV}


class Proc:
    """A process started in its own session; its stderr lines (and JSON events) stamped with time.monotonic()."""

    running: ClassVar[list[Proc]] = []  # everything not yet stopped, for the final cleanup

    def __init__(self, name: str, argv: list[str], *, stdout: Path | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log = ProcessLog()
        out = open(stdout, "wb") if stdout else None  # noqa: SIM115 - closed right after Popen
        try:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out or subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, env=child_env(), cwd=cwd, start_new_session=True)
        finally:
            if out:
                out.close()
        self.started = time.monotonic()
        Proc.running.append(self)
        self._reader = threading.Thread(target=self.log.follow, args=(self.process.stderr,), name=f"stderr-{name}",
                                        daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def interleaved(self) -> list[str]:
        """Supervisor JSON lines found glued after a child's unterminated output."""
        return self.log.interleaved

    def marks(self) -> tuple[int, int]:
        """(lines, events) seen so far: pass as `after` to wait only for what comes next."""
        return self.log.marks()

    def _wait(self, stream: Stream, match: Callable[[Any], bool], after: int, timeout: float, what: str) -> Any:
        index = self.log.first(stream, match, after, timeout)
        if index is not None:
            return self._stamped(stream, index)
        if self.log.ended:
            raise BenchError(f"{self.name} ended (status {self.process.poll()}) before {what}:\n{self.tail()}")
        raise BenchError(f"{self.name}: no {what} within {timeout:g}s:\n{self.tail()}")

    def _stamped(self, stream: Stream, index: int) -> tuple[float, Any]:
        with self.log.changed:
            if stream == "lines":
                return self.log.line_times[index], self.log.lines[index]
            return self.log.event_times[index], self.log.events[index]

    def wait_line(self, match: Callable[[str], bool], after: int = 0, timeout: float = 30.0,
                  what: str = "line") -> tuple[float, str]:
        return self._wait("lines", match, after, timeout, what)  # type: ignore[no-any-return]

    def wait_event(self, match: Callable[[dict[str, Any]], bool], after: int = 0, timeout: float = 30.0,
                   what: str = "event") -> tuple[float, dict[str, Any]]:
        return self._wait("events", match, after, timeout, what)  # type: ignore[no-any-return]

    def wait_change(self, timeout: float) -> None:
        """Block until a new line arrives (or `timeout`)."""
        with self.log.changed:
            self.log.changed.wait(timeout)

    def find_events(self, match: Callable[[dict[str, Any]], bool], after: int = 0) -> list[tuple[float, dict[str, Any]]]:
        with self.log.changed:
            return [(stamp, event) for stamp, event in zip(self.log.event_times[after:], self.log.events[after:])
                    if match(event)]

    def find_lines(self, match: Callable[[str], bool], after: int = 0) -> list[tuple[float, str]]:
        with self.log.changed:
            return [(stamp, line) for stamp, line in zip(self.log.line_times[after:], self.log.lines[after:])
                    if match(line)]

    def tail(self, count: int = 25) -> str:
        return self.log.tail(count)

    def family(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self, grace: float = 15.0, sig: int = signal.SIGTERM) -> int | None:
        """Ask it to stop (sig), wait up to `grace`, then SIGKILL its process group and every descendant seen."""
        family = self.family()
        try:
            if self.process.poll() is None:
                self.process.send_signal(sig)
                try:
                    self.process.wait(grace)
                except subprocess.TimeoutExpired:
                    self.kill()
        finally:
            self.kill(family)
            self._reader.join(2)
            if self in Proc.running:
                Proc.running.remove(self)
        return self.process.returncode

    def kill(self, family: Iterable[psutil.Process] = ()) -> None:
        """SIGKILL now: the process, what is left of its own process group, and `family` (psutil checks identity)."""
        family = list(family) or self.family()
        if self.process.poll() is None:
            self.process.kill()
        try:
            os.killpg(self.pid, signal.SIGKILL)  # members of its session's group still alive (leader may be gone)
        except (ProcessLookupError, PermissionError):
            pass
        for member in family:
            try:
                member.kill()
            except psutil.Error:
                pass
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass


class Load:
    """A load generator run in a process of its own, tracked so that it is stopped at the end whatever happens.

    Its own process, not a thread of ours: the benchmark parses every event the supervisor logs, and in a thread
    that parsing held the GIL the clients needed, so the busiest moments of an upgrade's log made the clients'
    latency look worse than the server's. time.monotonic() is the system's CLOCK_MONOTONIC, so the samples'
    times compare with ours."""

    active: ClassVar[list[Load]] = []

    def __init__(self, port: int, concurrency: int, keepalive: bool) -> None:
        self.args = (port, concurrency, keepalive)
        self.context = multiprocessing.get_context("spawn")  # we have threads: no fork
        self.pipe, self.child_end = self.context.Pipe()
        self.process = self.context.Process(target=_load_process, args=(self.child_end, *self.args), daemon=True)
        self.stats: LoadStats | None = None

    def start(self) -> Load:
        self.process.start()
        Load.active.append(self)
        if not self.pipe.poll(60) or self.pipe.recv() != "started":
            self.process.kill()
            raise BenchError("the load generator did not start within 60 s")
        return self

    def stop(self) -> LoadStats:
        if self.stats is None:
            Load.active.remove(self)
            try:
                self.pipe.send("stop")
                if not self.pipe.poll(REQUEST_TIMEOUT * 4 + 60):
                    raise BenchError("the load generator did not report its figures")
                self.stats = self.pipe.recv()
            finally:
                self.process.join(10)
                if self.process.is_alive():
                    self.process.kill()
                    self.process.join()
        return self.stats


def _load_process(pipe: Connection, port: int, concurrency: int, keepalive: bool) -> None:
    """The load process: start the clients, say so, run until told to stop, send the figures back."""
    generator = LoadGenerator(HOST, port, "/", concurrency=concurrency, keepalive=keepalive, max_seconds=1800.0,
                              timeout=REQUEST_TIMEOUT)
    generator.start()
    pipe.send("started")
    pipe.recv()
    pipe.send(generator.stop())


def stop_everything() -> None:
    """Stop every load and process still running; a second Ctrl-C only makes it skip the polite part."""
    hurry = False
    for load in list(Load.active):
        try:
            load.stop()
        except KeyboardInterrupt:
            hurry = True
        except Exception:  # noqa: BLE001 - cleanup goes on whatever happened
            pass
    for proc in reversed(list(Proc.running)):
        try:
            if hurry:
                proc.kill()
                Proc.running.remove(proc)
            else:
                proc.stop(grace=10.0)
        except KeyboardInterrupt:
            hurry = True
            proc.kill()
        except Exception:  # noqa: BLE001
            proc.kill()
