#!/usr/bin/env python3
"""Upgrades under load: what an upgrade through `supervise` costs the clients, next to what people use today.

    python benchmarks/upgrade_under_load.py [--upgrades K] [--seconds S] [--concurrency C] [--json out.json] [--quick]

One run measures, on 127.0.0.1 only, with the same app (examples/app.py) and the same load:

1. supervise + examples/app.py, K upgrades (SIGHUP, wait for the verdict and for the old generation's
   `retired` event, next one) under a closed-loop load of C clients, once with a new connection per request and
   once with keep-alive; `--ready notify --watch 0` (the app sends READY=1) and, again with new connections,
   `--ready http/readyz --watch 0`. Reported: requests, failed requests by kind (keep-alive resets apart),
   p50/p99/max latency in a steady window before the first upgrade vs inside the upgrade windows (SIGHUP →
   old generation retired), each upgrade's phases and the supervisor's own share (ready signal → promotion).
2. Rollbacks under load with tests/servers/stub.py releases (a `run` script rewritten before each SIGHUP):
   crash at start, exec failure, hang (never ready / never accepting), sick in the watch window.
3. The supervisor's open fds before and after 100 quick upgrades (stub, `--ready tcp --watch 0`).
4. Baselines under the same load: a naive restart of examples/app.py binding the port itself (SIGTERM, wait,
   start again) and gunicorn's `kill -HUP` reload of benchmarks/wsgi_app.py (sync workers, gunicorn binds).
5. When `wrk` is installed (and not --quick, unless --wrk on): an aggregate cross-check of 1 and 4 with wrk.

Per-request figures come from supervisor/testing/loadgen.py, which records every request's start, latency and error
kind: that is what lets samples be split into steady and upgrade windows and keep-alive resets be told apart.
wrk reports only aggregates per run, so its section compares a steady run with a run spanning all K upgrades.
Every process started here runs in its own session and is stopped by pid / process group in `finally`, also
on Ctrl-C or SIGTERM. `--src git:HEAD` measures the committed code (a `git archive` snapshot) instead of the
working tree. Exit status: 0 when every target is met, 1 when one is not, 2 on a setup failure, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from supervisor.testing.loadgen import KEEPALIVE_RESET, LoadGenerator, LoadStats  # noqa: E402
from supervisor.testing.ports import free_port  # noqa: E402
from supervisor.testing.release import write_release  # noqa: E402

HOST = "127.0.0.1"  # the only address this benchmark ever targets
PYTHON = sys.executable
SRC = ROOT  # where supervisor/, examples/app.py and tests/servers/stub.py are taken from (--src)
APP = SRC / "examples" / "app.py"
STUB = SRC / "tests" / "servers" / "stub.py"
BENCH_DIR = ROOT / "benchmarks"
VERDICTS = ("promoted", "rolled-back", "upgrade-refused")
REQUEST_TIMEOUT = 5.0  # per request, seconds
STRIPPED_ENV = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "LISTEN_PIDFDID", "NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC")


class BenchError(Exception):
    """Something the benchmark needs did not happen (a server did not start, an event never came)."""


def child_env() -> dict[str, str]:
    """Our environment minus anything that would make a child think it is socket-activated or notified."""
    return {key: value for key, value in os.environ.items() if key not in STRIPPED_ENV}


def http_get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, str]:
    """One GET on a fresh connection (no proxies, no library): (status, body)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


# -- processes we start ---------------------------------------------------------------------------------------


class Proc:
    """A process started in its own session; its stderr lines (and JSON events) stamped with time.monotonic()."""

    running: list[Proc] = []  # everything not yet stopped, for the final cleanup

    def __init__(self, name: str, argv: list[str], *, stdout: Path | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.lines: list[tuple[float, str]] = []
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.interleaved: list[str] = []  # supervisor JSON lines found glued after a child's unterminated output
        self._changed = threading.Condition()
        out = open(stdout, "wb") if stdout else None  # noqa: SIM115 - closed right after Popen
        try:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out or subprocess.DEVNULL,
                                            stderr=subprocess.PIPE, env=child_env(), cwd=cwd, start_new_session=True)
        finally:
            if out:
                out.close()
        self.started = time.monotonic()
        Proc.running.append(self)
        self._reader = threading.Thread(target=self._read, name=f"stderr-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            stamp = time.monotonic()
            line = raw.decode(errors="replace").rstrip("\n")
            event = None
            start = line.find('{"ts"')
            if start >= 0:
                try:
                    event = json.loads(line[start:])
                except ValueError:
                    event = None
                if start > 0 and event is not None:
                    # A child's stderr line was written in two parts (text, then "\n") around this JSON line.
                    self.interleaved.append(line)
            with self._changed:
                self.lines.append((stamp, line))
                if isinstance(event, dict) and "event" in event:
                    self.events.append((stamp, event))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def marks(self) -> tuple[int, int]:
        """(lines, events) seen so far: pass as `after` to wait only for what comes next."""
        with self._changed:
            return len(self.lines), len(self.events)

    def _wait(self, items: list[Any], match: Callable[[Any], bool], after: int, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for item in items[after:]:
                    if match(item[1]):
                        return item
                if not self._reader.is_alive():
                    raise BenchError(f"{self.name} ended (status {self.process.poll()}) before {what}:\n{self.tail()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchError(f"{self.name}: no {what} within {timeout:g}s:\n{self.tail()}")
                self._changed.wait(min(remaining, 0.5))

    def wait_line(self, match: Callable[[str], bool], after: int = 0, timeout: float = 30.0, what: str = "line") -> tuple[float, str]:
        return self._wait(self.lines, match, after, timeout, what)  # type: ignore[no-any-return]

    def wait_event(self, match: Callable[[dict[str, Any]], bool], after: int = 0, timeout: float = 30.0,
                   what: str = "event") -> tuple[float, dict[str, Any]]:
        return self._wait(self.events, match, after, timeout, what)  # type: ignore[no-any-return]

    def find_events(self, match: Callable[[dict[str, Any]], bool], after: int = 0) -> list[tuple[float, dict[str, Any]]]:
        with self._changed:
            return [item for item in self.events[after:] if match(item[1])]

    def find_lines(self, match: Callable[[str], bool], after: int = 0) -> list[tuple[float, str]]:
        with self._changed:
            return [item for item in self.lines[after:] if match(item[1])]

    def tail(self, count: int = 25) -> str:
        with self._changed:
            return "\n".join(line for _, line in self.lines[-count:])

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
    """supervisor/testing/loadgen.py, keeping every request's error kind so failures can be counted per time window."""

    active: list[Load] = []

    def __init__(self, port: int, concurrency: int, keepalive: bool) -> None:
        self.generator = LoadGenerator(HOST, port, "/", concurrency=concurrency, keepalive=keepalive,
                                       max_seconds=1800.0, timeout=REQUEST_TIMEOUT)
        self.generator._stats = KindStats()  # same counters, plus the error kind of each sample
        self.stats: KindStats | None = None

    def start(self) -> Load:
        self.generator.start()
        Load.active.append(self)
        return self

    def stop(self) -> KindStats:
        if self.stats is None:
            stats = self.generator.stop()
            assert isinstance(stats, KindStats)
            self.stats = stats
            Load.active.remove(self)
        return self.stats


@dataclass
class KindStats(LoadStats):
    kinds: list[str | None] = field(default_factory=list)  # parallel to `samples`

    def record(self, start: float, latency: float, error: str | None) -> None:
        super().record(start, latency, error)
        self.kinds.append(error)


def stop_everything() -> None:
    """Stop every load and process still running; a second Ctrl-C only makes it skip the polite part."""
    hurry = False
    for load in list(Load.active):
        try:
            load.generator._stopping.set()
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


# -- samples and windows --------------------------------------------------------------------------------------


def percentile_ms(ordered: list[float], percent: float) -> float | None:
    """Nearest-rank percentile of sorted seconds, in ms (as loadgen does)."""
    if not ordered:
        return None
    rank = max(1, min(len(ordered), int(-(-len(ordered) * percent // 100))))
    return round(ordered[rank - 1] * 1000, 3)


class Samples:
    """A load run's requests sorted by start time, to select the ones started inside time windows."""

    def __init__(self, stats: KindStats) -> None:
        order = sorted(range(len(stats.samples)), key=lambda i: stats.samples[i][0])
        self.starts = [stats.samples[i][0] for i in order]
        self.latencies = [stats.samples[i][1] for i in order]
        self.kinds = [stats.kinds[i] for i in order]
        self.done_ok = sorted(s + lat for s, lat, ok in stats.samples if ok)
        self.stats = stats

    def indexes(self, windows: list[tuple[float, float]]) -> list[int]:
        found: list[int] = []
        for begin, end in windows:
            found.extend(range(bisect.bisect_left(self.starts, begin), bisect.bisect_left(self.starts, end)))
        return found

    def longest_gap(self, windows: list[tuple[float, float]]) -> float:
        """Longest time inside the windows during which no request completed successfully (seconds)."""
        longest = 0.0
        for begin, end in windows:
            inside = self.done_ok[bisect.bisect_left(self.done_ok, begin): bisect.bisect_right(self.done_ok, end)]
            points = [begin, *inside, end]
            longest = max(longest, max(b - a for a, b in zip(points, points[1:])))
        return longest

    def summary(self, windows: list[tuple[float, float]]) -> dict[str, Any]:
        picked = self.indexes(windows)
        seconds = sum(end - begin for begin, end in windows)
        latencies = sorted(self.latencies[i] for i in picked if self.kinds[i] is None)
        errors = Counter(self.kinds[i] for i in picked if self.kinds[i] is not None)
        resets = errors.pop(KEEPALIVE_RESET, 0)
        return {
            "requests": len(picked),
            "ok": len(latencies),
            "failed": sum(errors.values()),
            "errors": dict(sorted(errors.items())),
            "keepalive_resets": resets,
            "seconds": round(seconds, 3),
            "rps": round(len(picked) / seconds, 1) if seconds > 0 else None,
            "p50_ms": percentile_ms(latencies, 50),
            "p90_ms": percentile_ms(latencies, 90),
            "p99_ms": percentile_ms(latencies, 99),
            "max_ms": percentile_ms(latencies, 100),
            "longest_gap_ms": round(self.longest_gap(windows) * 1000, 3) if windows else None,
        }


# -- the systems under test -----------------------------------------------------------------------------------


class System:
    """Something serving examples/app.py (or its twin) on `port` that can be upgraded under load."""

    label = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()

    def start(self) -> None: ...
    def upgrade(self) -> dict[str, Any]: ...
    def stop(self) -> dict[str, Any]: ...

    def cpu(self) -> float | None:
        """CPU seconds (user + system) used so far by the managing process (supervisor, gunicorn master)."""
        return None


def parse_ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


class Supervised(System):
    """supervise -l 127.0.0.1:PORT --ready notify|http/readyz --watch 0 -- python examples/app.py"""

    def __init__(self, workdir: Path, probe: str, http_interval: float) -> None:
        super().__init__(workdir)
        self.probe = probe
        self.http_interval = http_interval
        self.label = f"supervise ({probe})"
        self.proc: Proc | None = None

    def argv(self) -> list[str]:
        ready = ["--ready", "notify"] if self.probe == "notify" else [
            "--ready", "http/readyz", "--health-interval", f"{self.http_interval:g}s"]
        return [PYTHON, "-m", "supervisor", "--log-format", "json", "--log-level", "debug",
                "-l", f"{HOST}:{self.port}", *ready, "--watch", "0", "--ready-timeout", "30s",
                "--drain-timeout", "30s", *private_files(self.port), "--", PYTHON, str(APP)]

    def start(self) -> None:
        self.proc = Proc(self.label, self.argv(), cwd=SRC)  # `python -m supervisor` imports it from SRC
        self.proc.wait_event(lambda e: e["event"] == "serving", timeout=30, what="'serving' event")

    def upgrade(self) -> dict[str, Any]:
        proc = self.proc
        assert proc is not None
        _, mark = proc.marks()
        signalled = time.monotonic()
        os.kill(proc.pid, signal.SIGHUP)
        seen, verdict = proc.wait_event(lambda e: e["event"] in VERDICTS, after=mark, timeout=120, what="an upgrade verdict")
        record: dict[str, Any] = {"t_signal": signalled, "verdict": verdict["event"], "gen": verdict.get("gen"),
                                  "old_gen": verdict.get("old_gen"), "signal_to_verdict_s": round(seen - signalled, 6)}
        if verdict["event"] != "promoted":
            record.update(reason=verdict.get("reason"), timings=verdict.get("timings"), t_done=seen,
                          signal_to_done_s=round(seen - signalled, 6))
            return record
        gen, old = verdict["gen"], verdict["old_gen"]
        done, retired = proc.wait_event(lambda e: e["event"] == "retired" and e.get("gen") == old, after=mark,
                                        timeout=120, what=f"'retired' of generation {old}")
        timings = verdict["timings"]
        ready = proc.find_events(lambda e: e["event"] == "ready" and e.get("gen") == gen, after=mark)
        notified = proc.find_events(lambda e: e["event"] == "notify" and e.get("gen") == gen and "READY=1" in e.get("msg", ""),
                                    after=mark)
        phases = {"spawned": timings.get("spawned"), "ready_signal": None, "probe_ready": timings.get("ready"),
                  "promoted": timings.get("promoted"), "old_gone": round(timings["promoted"] + retired["elapsed"], 6)}
        ready_to_promoted = log_ts = None
        if ready and notified:
            # READY=1 was received before the probe's verdict: ready.elapsed = READY=1 receipt - generation start,
            # and the generation's start is stamped just before `spawned` (by a few bookkeeping steps).
            phases["ready_signal"] = round(timings["spawned"] + ready[0][1]["elapsed"], 6)
            ready_to_promoted = timings["promoted"] - phases["ready_signal"]
            log_ts = parse_ts(verdict["ts"]) - parse_ts(notified[0][1]["ts"])
        decision = timings["promoted"] - timings["ready"]
        # notify: the verdict *is* the READY=1 wake-up, so the share is the decision after it (exact, one clock);
        # http: the share also holds the polling lag after the app became ready, measured from the READY=1 the app
        # sends anyway (the `notify` event's timestamp, 1 ms resolution) to the promotion; the `ready` event's
        # elapsed is the probe's verdict in http mode, not the app's READY=1.
        share = decision if self.probe == "notify" else log_ts
        record.update(
            timings=timings, phases=phases, drain_s=retired["elapsed"], killed=retired.get("killed"),
            probe=ready[0][1].get("probe") if ready else None,
            share_ms=_ms(share), verdict_to_promotion_ms=_ms(decision),
            ready_signal_to_promotion_ms=_ms(ready_to_promoted), share_log_ts_ms=_ms(log_ts),
            t_verdict=seen, t_done=done, signal_to_done_s=round(done - signalled, 6),
        )
        return record

    def cpu(self) -> float | None:
        return _cpu(self.proc.pid) if self.proc else None

    def stop(self) -> dict[str, Any]:
        if self.proc is None:
            return {}
        family = self.proc.family()
        code = self.proc.stop(grace=40.0)
        stopped = self.proc.find_events(lambda e: e["event"] == "stopped")
        survivors = [p.pid for p in family if _alive(p)]
        return {"exit_code": code, "stopped_event": bool(stopped), "survivors": survivors,
                "interleaved_json_lines": len(self.proc.interleaved), "interleaved_examples": self.proc.interleaved[:2]}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _cpu(pid: int) -> float | None:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class NaiveRestart(System):
    """python examples/app.py --port PORT (binds itself); upgrade = SIGTERM, wait for exit, start again."""

    label = "naive restart"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.proc: Proc | None = None
        self.count = 0

    def _launch(self) -> Proc:
        self.count += 1
        return Proc(f"app-{self.count}", [PYTHON, str(APP), "--host", HOST, "--port", str(self.port)], cwd=ROOT)

    def start(self) -> None:
        self.proc = self._launch()
        self.proc.wait_line(lambda line: "serving on" in line, timeout=30, what="'serving on'")

    def upgrade(self) -> dict[str, Any]:
        old = self.proc
        assert old is not None
        signalled = time.monotonic()
        old.process.send_signal(signal.SIGTERM)
        watchdog = threading.Timer(60.0, old.kill)  # the app drains for at most 30 s
        watchdog.start()
        try:
            old.process.wait()  # blocking waitpid: exact exit instant
        finally:
            watchdog.cancel()
        gone = time.monotonic()
        old.stop()
        self.proc = new = self._launch()
        spawned = new.started
        ready, _ = new.wait_line(lambda line: "serving on" in line, timeout=60, what="'serving on'")
        phases = {"old_gone": gone - signalled, "spawned": spawned - signalled, "ready_signal": ready - signalled,
                  "promoted": None}
        return {"t_signal": signalled, "verdict": "restarted", "exit_code": old.process.returncode,
                "phases": {k: (None if v is None else round(v, 6)) for k, v in phases.items()},
                "t_done": ready, "signal_to_done_s": round(ready - signalled, 6)}

    def stop(self) -> dict[str, Any]:
        return {"exit_code": self.proc.stop() if self.proc else None}


class GunicornHup(System):
    """gunicorn --bind 127.0.0.1:PORT --workers W benchmarks/wsgi_app.py; upgrade = kill -HUP master."""

    label = "gunicorn HUP"

    def __init__(self, workdir: Path, workers: int) -> None:
        super().__init__(workdir)
        self.workers = workers
        self.proc: Proc | None = None

    def start(self) -> None:
        argv = [PYTHON, "-m", "gunicorn", "--bind", f"{HOST}:{self.port}", "--workers", str(self.workers),
                "--worker-class", "sync", "--graceful-timeout", "30", "--timeout", "30", "--log-level", "info",
                "--no-control-socket", "--worker-tmp-dir", str(self.workdir), "--pythonpath", str(BENCH_DIR), "wsgi_app:app"]
        self.proc = Proc(self.label, argv, cwd=self.workdir)
        deadline = time.monotonic() + 30
        while len(_mentions(self.proc, _LOADED, 0)) < self.workers:
            if time.monotonic() > deadline:
                raise BenchError("gunicorn workers did not start:\n" + self.proc.tail())
            time.sleep(0.05)

    def upgrade(self) -> dict[str, Any]:
        proc = self.proc
        assert proc is not None
        old = {p.pid for p in psutil.Process(proc.pid).children()}
        line_mark, _ = proc.marks()
        signalled = time.monotonic()
        os.kill(proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while True:
            # Lines of different processes can arrive glued together: look for every mention in every line.
            booted = _mentions(proc, _BOOTED, line_mark)
            loaded = {pid: t for pid, t in _mentions(proc, _LOADED, line_mark).items() if pid not in old}
            exited = {pid: t for pid, t in _mentions(proc, _EXITING, line_mark).items() if pid in old}
            if len(loaded) >= self.workers and len(exited) >= len(old):
                break
            if time.monotonic() > deadline:
                raise BenchError("gunicorn HUP did not complete:\n" + proc.tail())
            with proc._changed:
                proc._changed.wait(0.05)
        ready = max(loaded.values())
        gone = max(exited.values())
        psutil.wait_procs(_processes(old), timeout=30)  # the "Worker exiting" line comes just before the exit
        done = max(ready, gone)
        phases = {"spawned": min(booted.values()) - signalled if booted else None, "ready_signal": ready - signalled,
                  "promoted": None, "old_gone": gone - signalled}
        return {"t_signal": signalled, "verdict": "reloaded",
                "phases": {k: (None if v is None else round(v, 6)) for k, v in phases.items()},
                "t_done": done, "signal_to_done_s": round(done - signalled, 6)}

    def cpu(self) -> float | None:
        return _cpu(self.proc.pid) if self.proc else None

    def stop(self) -> dict[str, Any]:
        return {"exit_code": self.proc.stop() if self.proc else None}


_BOOTED = re.compile(r"Booting worker with pid: (\d+)")
_LOADED = re.compile(r"wsgi_app: pid (\d+) loaded")
_EXITING = re.compile(r"Worker exiting \(pid: (\d+)\)")


def _mentions(proc: Proc, pattern: re.Pattern[str], after: int) -> dict[int, float]:
    """pid → when the first line mentioning it (per `pattern`) was read, among lines after `after`."""
    found: dict[int, float] = {}
    for stamp, line in proc.find_lines(lambda line: True, after=after):
        for match in pattern.finditer(line):
            found.setdefault(int(match.group(1)), stamp)
    return found


def _processes(pids: Iterable[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.Error:
            pass
    return found


# -- measuring ------------------------------------------------------------------------------------------------


@dataclass
class Config:
    upgrades: int
    seconds: float
    concurrency: int
    warmup: float
    gap: float
    http_interval: float
    gunicorn_workers: int
    fd_upgrades: int
    wrk: bool
    quick: bool


def measure(system: System, cfg: Config, keepalive: bool, control: bool = False) -> dict[str, Any]:
    """Start the system, load it, a steady window, K upgrades back to back; samples split by window.

    With `control`, K control windows come between the steady window and the upgrades: a standalone
    examples/app.py started and stopped on another port, i.e. the CPU cost of an upgrade's new process on
    this machine without any upgrade happening.
    """
    variant = "keep-alive" if keepalive else "new connection per request"
    print(f"  {system.label:<18} {variant:<27}", end="", flush=True)
    began = time.monotonic()
    system.start()
    records: list[dict[str, Any]] = []
    controls: list[tuple[float, float]] = []
    cpu: dict[str, float | None] = {}
    load: Load | None = None
    try:
        load = Load(system.port, cfg.concurrency, keepalive).start()
        time.sleep(cfg.warmup)
        steady_begin = time.monotonic()
        cpu["steady_begin"] = system.cpu()
        time.sleep(cfg.seconds)
        steady = [(steady_begin, time.monotonic())]
        cpu["steady_end"] = system.cpu()
        if control:
            for _ in range(cfg.upgrades):
                controls.append(control_window())
                print(":", end="", flush=True)
                time.sleep(cfg.gap)
        cpu["upgrades_begin"] = system.cpu()
        for _ in range(cfg.upgrades):
            records.append(system.upgrade())
            print(".", end="", flush=True)
            time.sleep(cfg.gap)
        cpu["upgrades_end"] = system.cpu()
        time.sleep(min(cfg.gap, 0.3))
        stats = load.stop()
    finally:
        if load is not None:
            load.stop()
        stopped = system.stop()
    samples = Samples(stats)
    windows = [(r["t_signal"], r["t_done"]) for r in records]
    total = stats.summary()
    total["errors"] = {k: v for k, v in total["errors"].items() if k != KEEPALIVE_RESET}
    total["keepalive_resets"] = stats.errors.get(KEEPALIVE_RESET, 0)
    total["failed"] = total.pop("failures") - total["keepalive_resets"]
    for record in records:
        record.update(samples.summary([(record["t_signal"], record["t_done"])]))
    result = {
        "system": system.label, "keepalive": keepalive, "port": system.port,
        "steady": samples.summary(steady), "during": samples.summary(windows), "total": total,
        "upgrades": [{k: v for k, v in r.items() if not k.startswith("t_")} for r in records],
        "verdicts": dict(Counter(r["verdict"] for r in records)),
        "upgrade_s": _spread([r["signal_to_done_s"] for r in records]),
        "manager_cpu_ms": _cpu_report(cpu, cfg, len(records)),
        "stop": stopped, "wall_s": round(time.monotonic() - began, 1),
    }
    if controls:
        result["control"] = samples.summary(controls)
    if records and all("t_verdict" in r for r in records):
        result["during_before_promotion"] = samples.summary([(r["t_signal"], r["t_verdict"]) for r in records])
        result["during_after_promotion"] = samples.summary([(r["t_verdict"], r["t_done"]) for r in records])
    print(f" {result['wall_s']:5.1f}s  failed={total['failed']}"
          + (f" keepalive-resets={total['keepalive_resets']}" if keepalive else ""), flush=True)
    return result


def control_window() -> tuple[float, float]:
    """Start a standalone examples/app.py on another port, wait until it serves, stop it: (begin, end)."""
    began = time.monotonic()
    proc = Proc("control-app", [PYTHON, str(APP), "--host", HOST, "--port", str(free_port())], cwd=ROOT)
    try:
        proc.wait_line(lambda line: "serving on" in line, timeout=60, what="'serving on'")
        proc.process.send_signal(signal.SIGTERM)
        proc.process.wait(60)
    finally:
        proc.stop()
    return began, time.monotonic()


def _cpu_report(cpu: dict[str, float | None], cfg: Config, upgrades: int) -> dict[str, float | None]:
    def used(a: str, b: str) -> float | None:
        x, y = cpu.get(a), cpu.get(b)
        return None if x is None or y is None else y - x

    steady, upgrading = used("steady_begin", "steady_end"), used("upgrades_begin", "upgrades_end")
    return {"per_steady_second": None if steady is None else round(steady / cfg.seconds * 1000, 2),
            "per_upgrade": None if upgrading is None or not upgrades else round(upgrading / upgrades * 1000, 2)}


def _spread(values: list[float | None], scale: float = 1.0, digits: int = 4) -> dict[str, Any]:
    present = sorted(v * scale for v in values if v is not None)
    if not present:
        return {"n": 0, "median": None, "p90": None, "max": None, "min": None}
    return {"n": len(present), "min": round(present[0], digits), "median": round(statistics.median(present), digits),
            "p90": round(present[max(0, -(-len(present) * 9 // 10) - 1)], digits), "max": round(present[-1], digits)}


# -- rollbacks ------------------------------------------------------------------------------------------------


@dataclass
class Release:
    """A `run` script that execs the stub with this release's flags; rewritten atomically, as a deploy would."""

    directory: Path

    @property
    def script(self) -> Path:
        return self.directory / "run"

    def deploy(self, *flags: str) -> None:
        write_release(self.directory, STUB, *flags, python=PYTHON)


ROLLBACK_CASES: list[tuple[str, list[str] | None, str]] = [
    ("crash at start", ["--exit-at-start", "3"], "exited with status 3 during readiness"),
    ("exec failure (mode 0644)", None, "exec failed"),
    ("hang: never ready (503)", ["--never-ready"], "not ready after"),
    ("hang: never accepts", ["--start-delay", "60"], "not ready after"),
    ("sick in watch window", ["--sick-after", "0.5"], "unhealthy in watch window"),
]


def measure_rollbacks(cfg: Config, workdir: Path) -> dict[str, Any]:
    """One supervisor, a good stub release, load on; each bad release deployed and SIGHUPed in turn."""
    print(f"  {'rollbacks':<46}", end="", flush=True)
    began = time.monotonic()
    release = Release(workdir / "rollback-release")
    release.deploy("--tag", "good")
    port = free_port()
    argv = [PYTHON, "-m", "supervisor", "--log-format", "json", "--log-level", "debug", "-l", f"{HOST}:{port}",
            "--ready", "http/readyz", "--ready-timeout", "1.5s", "--watch", "3s", "--health-interval", "200ms",
            "--drain-timeout", "5s", *private_files(port), "--", str(release.script)]
    proc = Proc("supervise (rollbacks)", argv, cwd=SRC)
    cases: list[dict[str, Any]] = []
    load: Load | None = None
    try:
        proc.wait_event(lambda e: e["event"] == "serving", timeout=30, what="'serving'")
        load = Load(port, cfg.concurrency, keepalive=False).start()
        time.sleep(cfg.warmup)
        for name, flags, expected in ROLLBACK_CASES:
            if flags is None:
                release.deploy("--tag", "bad")
                release.script.chmod(0o644)
            else:
                release.deploy("--tag", "bad", *flags)
            _, mark = proc.marks()
            signalled = time.monotonic()
            os.kill(proc.pid, signal.SIGHUP)
            seen, verdict = proc.wait_event(lambda e: e["event"] in VERDICTS, after=mark, timeout=60, what="a verdict")
            time.sleep(0.3)  # requests started just before the verdict finish inside the window
            end = time.monotonic()
            release.deploy("--tag", "good")
            cases.append({"case": name, "verdict": verdict["event"], "reason": verdict.get("reason"),
                          "expected_reason": expected, "reason_ok": expected in (verdict.get("reason") or ""),
                          "timings": verdict.get("timings"), "signal_to_verdict_s": round(seen - signalled, 4),
                          "window": (signalled, end)})
            print(".", end="", flush=True)
            time.sleep(cfg.gap)
        stats = load.stop()
        status, body = http_get(port)
        still_serving = status == 200 and body.split()[1:2] == ["good"] if body else False
        serving_gens = [e["gen"] for _, e in proc.find_events(lambda e: e["event"] == "serving")]
    finally:
        if load is not None:
            load.stop()
        stop_code = proc.stop(grace=20.0)
    samples = Samples(stats)
    for case in cases:
        case.update(samples.summary([case.pop("window")]))
    total_failed = sum(c["failed"] for c in cases)
    result = {"cases": cases, "failed_total": total_failed, "first_generation_kept_serving": still_serving
              and serving_gens == [1], "serving_events": serving_gens, "exit_code": stop_code,
              "wall_s": round(time.monotonic() - began, 1)}
    print(f"  {result['wall_s']:5.1f}s  failed={total_failed}", flush=True)
    return result


# -- open fds -------------------------------------------------------------------------------------------------


def fd_table(pid: int) -> dict[int, str]:
    table = {}
    for entry in os.scandir(f"/proc/{pid}/fd"):
        try:
            table[int(entry.name)] = os.readlink(entry.path)
        except OSError:
            pass
    return table


def measure_fds(cfg: Config, workdir: Path) -> dict[str, Any]:
    """psutil num_fds() of the supervisor before any upgrade, after 1, and after N quick upgrades."""
    print(f"  {'open fds, ' + str(cfg.fd_upgrades) + ' quick upgrades':<46}", end="", flush=True)
    began = time.monotonic()
    release = Release(workdir / "fd-release")
    release.deploy("--tag", "v0")
    port = free_port()
    argv = [PYTHON, "-m", "supervisor", "--log-format", "json", "--log-level", "info", "-l", f"{HOST}:{port}",
            "--ready", "tcp", "--watch", "0", "--drain-timeout", "5s", *private_files(port), "--",
            str(release.script)]
    proc = Proc("supervise (fds)", argv, cwd=SRC)
    load: Load | None = None
    counts: dict[str, int] = {}
    tables: dict[str, dict[int, str]] = {}
    verdicts: Counter[str] = Counter()
    durations: list[float] = []

    def snapshot(name: str) -> None:
        time.sleep(0.3)
        counts[name] = psutil.Process(proc.pid).num_fds()
        tables[name] = fd_table(proc.pid)

    try:
        proc.wait_event(lambda e: e["event"] == "serving", timeout=30, what="'serving'")
        load = Load(port, 2, keepalive=False).start()
        snapshot("before")
        for number in range(1, cfg.fd_upgrades + 1):
            release.deploy("--tag", f"v{number}")
            _, mark = proc.marks()
            signalled = time.monotonic()
            os.kill(proc.pid, signal.SIGHUP)
            _, verdict = proc.wait_event(lambda e: e["event"] in VERDICTS, after=mark, timeout=60, what="a verdict")
            verdicts[verdict["event"]] += 1
            if verdict["event"] == "promoted":
                old = verdict["old_gen"]
                proc.wait_event(lambda e: e["event"] == "retired" and e.get("gen") == old, after=mark, timeout=60,
                                what="'retired'")
            durations.append(time.monotonic() - signalled)
            if number == 1:
                snapshot("after_1")
            if number % 10 == 0:
                print(".", end="", flush=True)
        snapshot(f"after_{cfg.fd_upgrades}")
        stats = load.stop()
    finally:
        if load is not None:
            load.stop()
        proc.stop(grace=20.0)
    before, after = tables["before"], tables[f"after_{cfg.fd_upgrades}"]
    diff = {"opened": {fd: target for fd, target in after.items() if before.get(fd) != target},
            "closed": {fd: target for fd, target in before.items() if after.get(fd) != target}}
    summary = stats.summary()
    result = {"upgrades": cfg.fd_upgrades, "num_fds": counts, "identical": counts["before"] == counts[f"after_{cfg.fd_upgrades}"],
              "diff_vs_before": diff, "fds_before": before, "verdicts": dict(verdicts),
              "upgrade_s": _spread(durations), "load": {"requests": summary["requests"], "failed": summary["failures"],
                                                        "errors": summary["errors"]},
              "wall_s": round(time.monotonic() - began, 1)}
    print(f"  {result['wall_s']:5.1f}s  fds {counts}", flush=True)
    return result


# -- wrk cross-check ------------------------------------------------------------------------------------------

WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%.0f,"p90_us":%.0f,"p99_us":%.0f,"max_us":%.0f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def wrk_run(port: int, cfg: Config, workdir: Path, seconds: float | None, name: str) -> tuple[Proc, Path]:
    script = workdir / "report.lua"
    script.write_text(WRK_SCRIPT)
    out = workdir / f"wrk-{name}.out"
    threads = min(2, cfg.concurrency)
    duration = f"{seconds:g}s" if seconds else "3600s"
    argv = ["wrk", "-t", str(threads), "-c", str(cfg.concurrency), "-d", duration, "--timeout", f"{REQUEST_TIMEOUT:g}s",
            "-s", str(script), "-H", "Connection: close", f"http://{HOST}:{port}/"]
    return Proc(f"wrk-{name}", argv, stdout=out), out


def wrk_result(proc: Proc, out: Path, interrupt: bool) -> dict[str, Any]:
    if interrupt:
        proc.process.send_signal(signal.SIGINT)  # wrk stops early and still runs done()
    proc.process.wait(60)
    proc.stop()
    for line in out.read_text().splitlines():
        if line.startswith("WRKJSON "):
            raw = json.loads(line[8:])
            errors = {k: raw[k] for k in ("connect", "read", "write", "timeout") if raw[k]}
            if raw["status"]:
                errors["non-2xx"] = raw["status"]
            seconds = raw["duration_us"] / 1e6
            return {"requests": raw["requests"], "failed": sum(errors.values()), "errors": errors,
                    "seconds": round(seconds, 3), "rps": round(raw["requests"] / seconds, 1) if seconds else None,
                    "p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000, "p99_ms": raw["p99_us"] / 1000,
                    "max_ms": raw["max_us"] / 1000}
    raise BenchError(f"wrk printed no report:\n{out.read_text()[-2000:]}")


def measure_wrk(system: System, cfg: Config, workdir: Path) -> dict[str, Any]:
    print(f"  {system.label:<18} {'wrk, new connections':<27}", end="", flush=True)
    began = time.monotonic()
    system.start()
    records = []
    try:
        time.sleep(0.3)
        proc, out = wrk_run(system.port, cfg, workdir, cfg.seconds, "steady")
        steady = wrk_result(proc, out, interrupt=False)
        proc, out = wrk_run(system.port, cfg, workdir, None, "upgrades")
        try:
            time.sleep(0.2)
            for _ in range(cfg.upgrades):
                records.append(system.upgrade())
                print(".", end="", flush=True)
                time.sleep(cfg.gap)
        finally:
            during = wrk_result(proc, out, interrupt=True)
    finally:
        system.stop()
    result = {"system": system.label, "steady": steady, "upgrade_phase": during,
              "upgrade_s": _spread([r["signal_to_done_s"] for r in records]), "wall_s": round(time.monotonic() - began, 1)}
    print(f" {result['wall_s']:5.1f}s  failed={during['failed']}", flush=True)
    return result


# -- report ---------------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def ratio(base: Any, ours: Any) -> str:
    if not isinstance(base, (int, float)) or not isinstance(ours, (int, float)):
        return "-"
    if ours == 0:
        return "=" if base == 0 else "∞"
    return f"×{base / ours:.2f}"


def errors_text(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in errors.items()) or "-"


def comparison_rows(runs: dict[str, dict[str, Any]]) -> list[tuple[str, Callable[[dict[str, Any]], Any]]]:
    return [
        ("requests, whole run", lambda r: r["total"]["requests"]),
        ("  in upgrade windows", lambda r: r["during"]["requests"]),
        ("failed requests", lambda r: r["total"]["failed"]),
        ("  in upgrade windows", lambda r: r["during"]["failed"]),
        ("keep-alive resets (apart)", lambda r: r["total"]["keepalive_resets"]),
        ("throughput steady, req/s", lambda r: r["steady"]["rps"]),
        ("throughput upgrading, req/s", lambda r: r["during"]["rps"]),
        ("p50 steady, ms", lambda r: r["steady"]["p50_ms"]),
        ("p50 upgrading, ms", lambda r: r["during"]["p50_ms"]),
        ("p99 steady, ms", lambda r: r["steady"]["p99_ms"]),
        ("p99 upgrading, ms", lambda r: r["during"]["p99_ms"]),
        ("p99 upgrading / steady", lambda r: _div(r["during"]["p99_ms"], r["steady"]["p99_ms"])),
        ("max steady, ms", lambda r: r["steady"]["max_ms"]),
        ("max upgrading, ms", lambda r: r["during"]["max_ms"]),
        ("longest no-success gap upgr., ms", lambda r: r["during"]["longest_gap_ms"]),
        ("upgrade time median, s", lambda r: r["upgrade_s"]["median"]),
        ("upgrade time max, s", lambda r: r["upgrade_s"]["max"]),
        ("manager CPU per steady s, ms", lambda r: r["manager_cpu_ms"]["per_steady_second"]),
        ("manager CPU per upgrade, ms", lambda r: r["manager_cpu_ms"]["per_upgrade"]),
    ]


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def print_comparison(title: str, runs: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    print(f"\n{title}")
    head = f"  {'':<33}"
    for run in runs:
        head += f"{run['system']:>18}" + ("" if run is reference else f"{'vs sup.':>9}")
    print(head)
    for label, get in comparison_rows({}):
        row = f"  {label:<33}"
        for run in runs:
            value = get(run)
            row += f"{fmt(value, 3 if isinstance(value, float) and value < 10 else 1):>18}"
            if run is not reference:
                row += f"{ratio(value, get(reference)):>9}"
        print(row)
    failing = [(run["system"], run["total"]["errors"]) for run in runs if run["total"]["errors"]]
    for system, errors in failing:
        print(f"  errors, {system}: {errors_text(errors)}")


def print_phases(run: dict[str, Any], every: bool) -> None:
    notify = run["system"].endswith("(notify)")
    print(f"\n  {run['system']}, {'keep-alive' if run['keepalive'] else 'new connection per request'}: phases in seconds "
          f"since the rollout began (supervisor clock); ms columns: share = "
          + ("promoted − probe ok" if notify else "promoted − READY=1 (app ready)"))
    print(f"  {'#':>3} {'spawned':>8} {'READY=1':>8} {'probe ok':>8} {'promoted':>8} {'old gone':>8} {'share':>7} "
          f"{'ok→prom':>8} {'RDY→prom':>8} {'ts x-chk':>8} {'HUP→gone':>8} {'failed':>6} {'p99 ms':>7}")
    rows = run["upgrades"]
    for index, record in enumerate(rows, 1):
        if not every and 3 < index < len(rows) - 1:
            if index == 4:
                print("  ...")
            continue
        phases = record.get("phases", {})
        print(f"  {index:>3} {fmt(phases.get('spawned'), 3):>8} {fmt(phases.get('ready_signal'), 3):>8} "
              f"{fmt(phases.get('probe_ready'), 3):>8} {fmt(phases.get('promoted'), 3):>8} {fmt(phases.get('old_gone'), 3):>8} "
              f"{fmt(record.get('share_ms'), 2):>7} {fmt(record.get('verdict_to_promotion_ms'), 2):>8} "
              f"{fmt(record.get('ready_signal_to_promotion_ms'), 2):>8} {fmt(record.get('share_log_ts_ms'), 0):>8} "
              f"{fmt(record.get('signal_to_done_s'), 3):>8} {record.get('failed', 0):>6} {fmt(record.get('p99_ms'), 2):>7}"
              + ("" if record["verdict"] == "promoted" else f"  {record['verdict']}: {record.get('reason')}"))
    agg = {key: _spread([r.get("phases", {}).get(key) for r in rows]) for key in
           ("spawned", "ready_signal", "probe_ready", "promoted", "old_gone")}
    ms = {key: _spread([r.get(key) for r in rows], digits=3) for key in
          ("share_ms", "verdict_to_promotion_ms", "ready_signal_to_promotion_ms", "share_log_ts_ms")}
    for name in ("median", "max"):
        print(f"  {name[:3]} " + " ".join(f"{fmt(agg[k][name], 3):>8}" for k in agg) + " "
              + " ".join(f"{fmt(ms[k][name], 2):>{7 if k == 'share_ms' else 8}}" for k in ms))


def print_baseline_phases(runs: list[dict[str, Any]]) -> None:
    print("\n  baselines: phases, seconds after the signal (benchmark clock), median / max over the upgrades")
    print(f"  {'':<34} {'old gone':>15} {'new spawned':>15} {'new ready':>15} {'signal→done':>15}")
    for run in runs:
        rows = run["upgrades"]
        cells = []
        for key in ("old_gone", "spawned", "ready_signal"):
            spread = _spread([r["phases"].get(key) for r in rows], digits=3)
            cells.append(f"{fmt(spread['median'], 3)} / {fmt(spread['max'], 3)}")
        cells.append(f"{fmt(run['upgrade_s']['median'], 3)} / {fmt(run['upgrade_s']['max'], 3)}")
        label = f"{run['system']} ({'keep-alive' if run['keepalive'] else 'new conn'})"
        print(f"  {label:<34} " + " ".join(f"{c:>15}" for c in cells))


NOTES = """
What is measured
  * Load: supervisor/testing/loadgen.py, C closed-loop clients on 127.0.0.1, GET /; latency = connect (when a new
    connection is opened) + request + whole response. "steady" = the S seconds before the first upgrade (after a
    warm-up); "upgrading" = requests *started* inside an upgrade window: signal → the old generation's `retired`
    event for supervise, SIGTERM → new process printed "serving on" for the naive restart, HUP → all new
    workers loaded and every old worker exited for gunicorn. Failed = any error or non-2xx; a keep-alive
    connection that dies before any response byte (the server closed it as idle) is a "keep-alive reset",
    counted apart (DESIGN.md, Traps). "longest no-success gap" = longest time inside the windows in which no
    request completed successfully: ~ the outage a client sees.
  * Phases (supervise): the `promoted` event's timings (seconds since the rollout began: spawned = fork/exec
    done, probe ok = the readiness probe's verdict, promoted = promotion decided), READY=1 = spawned + the
    `ready` event's elapsed (when the supervisor read the generation's READY=1; the app sends it in both probe
    modes, right after it starts accepting), old gone = promoted + the `retired` event's elapsed.
  * Supervisor's share (ready signal → promotion decision):
    - notify (--watch 0): "ok→prom" = promoted − probe ok, both on the rollout's clock; the notify probe's
      verdict is the wake-up on READY=1, so this is the supervisor's own decision time (target ≤ 5 ms).
      "ts x-chk" = promoted event ts − READY=1 `notify` event ts (1 ms log resolution) also covers that wake-up.
    - http (--watch 0): "RDY→prom" = promoted − READY=1, i.e. the probe's polling lag after the app became
      ready plus the decision (target ≤ one probe interval = --health-interval). READY=1 is placed via the
      generation's start instant, stamped a few bookkeeping steps before `spawned`: ± a few ms under load,
      which is why it can even come out negative for notify.
    Not visible on the supervisor's clock: how long the datagram / the connection waited before its loop ran.
  * Ratios: baseline ÷ supervise (notify) for the same load; "∞" = supervise 0, baseline not.
"""


def print_report(report: dict[str, Any]) -> None:
    cfg = report["config"]
    runs = report["runs"]
    print("\n" + "=" * 100)
    print(f"supervise: upgrades under load — {report['machine']['cpus']} cores, Python {report['machine']['python']}, "
          f"127.0.0.1, K={cfg['upgrades']} upgrades per run, C={cfg['concurrency']} clients, steady {cfg['seconds']:g}s")
    print(f"supervise, examples/app.py and the stub from: {report['source']['describe']}; event loop in the "
          f"supervisor: {report['machine']['loop']}; load average before/after: {report['machine']['loadavg_before']} / "
          f"{report['machine']['loadavg_after']}")
    print("=" * 100)
    close = [runs["supervise-notify-close"], runs["supervise-http-close"], runs["naive-close"], runs["gunicorn-close"]]
    print_comparison("1. New connection per request (zero-loss case)", close, close[0])
    reference = close[0]
    if "control" in reference:
        c = reference["control"]
        print(f"  control: {cfg['upgrades']} windows in the supervise (notify) run in which a standalone examples/app.py "
              f"starts and stops on\n  another port (an upgrade's CPU cost, no upgrade): p50 {fmt(c['p50_ms'], 3)} ms, "
              f"p99 {fmt(c['p99_ms'], 3)} ms (×{fmt(_div(c['p99_ms'], reference['steady']['p99_ms']), 2)} steady), "
              f"max {fmt(c['max_ms'], 1)} ms, {c['failed']} failed")
    for run in close[:2]:
        if "during_before_promotion" in run:
            pre, post = run["during_before_promotion"], run["during_after_promotion"]
            print(f"  {run['system']}: upgrade windows split at the promotion — before (new generation starting, old "
                  f"serving): p99 {fmt(pre['p99_ms'], 3)} ms, {pre['requests']} requests; after (both serve, old drains): "
                  f"p99 {fmt(post['p99_ms'], 3)} ms, {post['requests']} requests")
    print("  manager = the process that upgrades: the supervisor, or gunicorn's master (the naive restart has none);"
          " CPU from /proc, 10 ms ticks")
    ka = [runs[k] for k in ("supervise-notify-keepalive", "naive-keepalive", "gunicorn-keepalive") if k in runs]
    if ka:
        print_comparison("   Keep-alive variant (gunicorn sync workers close after every response)", ka, ka[0])
    print("\n2. Upgrade phases and the supervisor's own share")
    print_phases(runs["supervise-notify-close"], every=True)
    print_phases(runs["supervise-http-close"], every=True)
    if "supervise-notify-keepalive" in runs:
        print_phases(runs["supervise-notify-keepalive"], every=False)
    print_baseline_phases([runs[k] for k in runs if not k.startswith("supervise")])
    shares = report["share"]
    print(f"\n  share, notify: median {fmt(shares['notify']['median'], 3)} ms, p90 {fmt(shares['notify']['p90'], 3)} ms, "
          f"max {fmt(shares['notify']['max'], 3)} ms over {shares['notify']['n']} upgrades (target ≤ 5 ms)")
    print(f"  share, http (interval {cfg['http_interval']:g}s): median {fmt(shares['http']['median'], 1)} ms, "
          f"max {fmt(shares['http']['max'], 1)} ms over {shares['http']['n']} upgrades (target ≤ {cfg['http_interval'] * 1000:g} ms)")

    rb = report["rollbacks"]
    print("\n3. Rollbacks under load (stub releases, --ready http/readyz --ready-timeout 1.5s --watch 3s "
          "--health-interval 200ms)")
    print(f"  {'case':<26} {'verdict':<12} {'HUP→verdict s':>13} {'requests':>9} {'failed':>7} {'p99 ms':>7}  reason")
    for case in rb["cases"]:
        print(f"  {case['case']:<26} {case['verdict']:<12} {case['signal_to_verdict_s']:>13.3f} {case['requests']:>9} "
              f"{case['failed']:>7} {fmt(case['p99_ms'], 2):>7}  {case['reason']}"
              + ("" if case["reason_ok"] else f"  (expected: {case['expected_reason']})")
              + (f"  errors: {errors_text(case['errors'])}" if case["errors"] else ""))
    print(f"  generation 1 kept serving throughout: {rb['first_generation_kept_serving']}")
    interleaved = sum(run["stop"].get("interleaved_json_lines", 0) for run in runs.values())
    if interleaved:
        print(f"\n  note: {interleaved} supervisor JSON log lines arrived glued after a child's unterminated stderr "
              "output (the child wrote its text and its newline separately); parsed anyway")

    fds = report["fds"]
    counts = fds["num_fds"]
    print("\n4. Supervisor open fds (psutil num_fds), stub release, --ready tcp --watch 0, light load (2 clients)")
    print("  " + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items())
          + f"  → identical: {fds['identical']}; verdicts {fds['verdicts']}; upgrade median "
          f"{fmt(fds['upgrade_s']['median'], 3)} s; load {fds['load']['requests']} requests, {fds['load']['failed']} failed")
    if not fds["identical"]:
        print(f"  opened since before: {fds['diff_vs_before']['opened']}; closed: {fds['diff_vs_before']['closed']}")

    if report.get("wrk"):
        print("\n5. wrk cross-check (aggregates only; new connection per request; latency excludes connect)")
        print(f"  {'':<18} {'steady req/s':>12} {'p50':>7} {'p99':>7} {'max':>8} | {'upgrade run req/s':>17} "
              f"{'p50':>7} {'p99':>7} {'max':>8} {'failed':>7} {'upgrade med s':>13}")
        for item in report["wrk"]:
            s, d = item["steady"], item["upgrade_phase"]
            print(f"  {item['system']:<18} {s['rps']:>12} {s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f} {s['max_ms']:>8.2f} | "
                  f"{d['rps']:>17} {d['p50_ms']:>7.2f} {d['p99_ms']:>7.2f} {d['max_ms']:>8.2f} {d['failed']:>7} "
                  f"{fmt(item['upgrade_s']['median'], 3):>13}" + (f"  {errors_text(d['errors'])}" if d["errors"] else ""))
    elif report.get("wrk_skipped"):
        print(f"\n5. wrk cross-check skipped: {report['wrk_skipped']}")

    print("\nTargets")
    for target in report["targets"]:
        print(f"  [{'PASS' if target['ok'] else 'FAIL'}] {target['name']}: {target['measured']}")
    print(NOTES.rstrip())
    print(f"\ntotal wall time {report['wall_s']:.0f}s")


def evaluate_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    runs = report["runs"]
    ours = [runs[k] for k in runs if k.startswith("supervise")]
    targets = []
    upgrades = sum(len(r["upgrades"]) for r in ours)
    failed = sum(r["total"]["failed"] for r in ours if not r["keepalive"])
    targets.append({"name": f"0 failed requests across upgrades under load (new connection per request, {upgrades - len(runs['supervise-notify-keepalive']['upgrades']) if 'supervise-notify-keepalive' in runs else upgrades} upgrades)",
                    "ok": failed == 0, "measured": failed})
    if "supervise-notify-keepalive" in runs:
        ka = runs["supervise-notify-keepalive"]["total"]
        targets.append({"name": "keep-alive variant: failed requests other than keep-alive resets", "ok": ka["failed"] == 0,
                        "measured": f"{ka['failed']} (keep-alive resets, reported apart: {ka['keepalive_resets']})"})
    rb = report["rollbacks"]
    targets.append({"name": "0 failed requests across rollbacks (" + ", ".join(c["case"] for c in rb["cases"]) + ")",
                    "ok": rb["failed_total"] == 0 and all(c["verdict"] == "rolled-back" for c in rb["cases"]),
                    "measured": f"{rb['failed_total']} failed; verdicts " + ", ".join(c["verdict"] for c in rb["cases"])})
    for run in ours:
        ratio_value = _div(run["during"]["p99_ms"], run["steady"]["p99_ms"])
        variant = "keep-alive" if run["keepalive"] else "new conn"
        context = []
        if "control" in run:
            context.append(f"control windows ×{_div(run['control']['p99_ms'], run['steady']['p99_ms'])}")
        for key in (("naive-keepalive", "gunicorn-keepalive") if run["keepalive"] else ("naive-close", "gunicorn-close")):
            if key in runs:
                context.append(f"{runs[key]['system']} ×{_div(runs[key]['during']['p99_ms'], runs[key]['steady']['p99_ms'])}")
        targets.append({"name": f"p99 upgrading ≤ 1.1 × steady p99 — {run['system']}, {variant}",
                        "ok": ratio_value is not None and ratio_value <= 1.1,
                        "measured": f"{run['during']['p99_ms']} ms vs {run['steady']['p99_ms']} ms = ×{ratio_value}"
                        + (f" (for comparison: {'; '.join(context)})" if context else "")})
    share = report["share"]
    targets.append({"name": "supervisor's share ≤ 5 ms with notify (max over upgrades)",
                    "ok": share["notify"]["max"] is not None and share["notify"]["max"] <= 5.0,
                    "measured": f"median {share['notify']['median']} ms, max {share['notify']['max']} ms"})
    limit = report["config"]["http_interval"] * 1000
    targets.append({"name": f"supervisor's share ≤ one probe interval ({limit:g} ms) with http (max)",
                    "ok": share["http"]["max"] is not None and share["http"]["max"] <= limit,
                    "measured": f"median {share['http']['median']} ms, max {share['http']['max']} ms"})
    fds = report["fds"]
    targets.append({"name": f"open fds identical after {fds['upgrades']} upgrades", "ok": fds["identical"],
                    "measured": " → ".join(str(v) for v in fds["num_fds"].values())})
    return targets


# -- main -----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Upgrades of examples/app.py under load: supervise vs a naive "
                                     "restart vs gunicorn's HUP reload (127.0.0.1 only).")
    parser.add_argument("--upgrades", type=int, help="upgrades per run, K (default 20; 3 with --quick)")
    parser.add_argument("--seconds", type=float, help="steady-state window per run (default 5; 1.5 with --quick)")
    parser.add_argument("--concurrency", type=int, default=8, help="load clients (default 8)")
    parser.add_argument("--json", metavar="PATH", help="write every figure to this file")
    parser.add_argument("--quick", action="store_true", help="K=3, shorter windows, 30 fd upgrades, no keep-alive "
                        "baselines, no wrk: under a minute")
    parser.add_argument("--fd-upgrades", type=int, help="upgrades of the open-fd check (default 100; 30 with --quick)")
    parser.add_argument("--http-interval", type=float, default=1.0, help="--health-interval of the http-probe run, "
                        "seconds (default 1, supervise's default)")
    parser.add_argument("--gunicorn-workers", type=int, default=2, help="gunicorn sync workers (default 2)")
    parser.add_argument("--src", metavar="DIR|git:REV", help="take supervisor/, examples/app.py and the stub from DIR, "
                        "or from a `git archive` of REV of this checkout (e.g. git:HEAD), instead of the working tree")
    parser.add_argument("--wrk", choices=("auto", "on", "off"), default="auto",
                        help="wrk cross-check: auto = when installed and not --quick")
    args = parser.parse_args(argv)
    if (args.upgrades is not None and args.upgrades < 1) or args.concurrency < 1 or (args.seconds is not None and args.seconds <= 0):
        parser.error("--upgrades, --concurrency and --seconds must be positive")
    return args


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quick = args.quick
    wrk_path = shutil.which("wrk")
    cfg = Config(
        upgrades=args.upgrades or (3 if quick else 20),
        seconds=args.seconds or (1.5 if quick else 5.0),
        concurrency=args.concurrency,
        warmup=0.5 if quick else 1.0,
        gap=0.1 if quick else 0.25,
        http_interval=args.http_interval,
        gunicorn_workers=args.gunicorn_workers,
        fd_upgrades=args.fd_upgrades or (30 if quick else 100),
        wrk=bool(wrk_path) and (args.wrk == "on" or (args.wrk == "auto" and not quick)),
        quick=quick,
    )
    if args.wrk == "on" and not wrk_path:
        print("upgrade_under_load: --wrk on, but wrk is not installed", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="supervise-bench-"))
    report: dict[str, Any] = {
        "config": cfg.__dict__,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "wrk": wrk_path, "loop": "uvloop" if _has("uvloop") else "asyncio",
                    "loadavg_before": [round(x, 2) for x in os.getloadavg()]},
        "runs": {},
    }
    try:
        report["source"] = use_source(args.src, workdir)
        probe_options(workdir)
        report["source"]["private_options"] = list(PRIVATE_OPTIONS)
        print(f"upgrade_under_load: K={cfg.upgrades}, C={cfg.concurrency}, steady {cfg.seconds:g}s; "
              f"supervise from {report['source']['describe']}; work dir {workdir}", flush=True)
        runs = report["runs"]
        runs["supervise-notify-close"] = measure(Supervised(workdir, "notify", cfg.http_interval), cfg, keepalive=False,
                                                 control=True)
        runs["supervise-http-close"] = measure(Supervised(workdir, "http", cfg.http_interval), cfg, keepalive=False)
        runs["naive-close"] = measure(NaiveRestart(workdir), cfg, keepalive=False)
        runs["gunicorn-close"] = measure(GunicornHup(workdir, cfg.gunicorn_workers), cfg, keepalive=False)
        runs["supervise-notify-keepalive"] = measure(Supervised(workdir, "notify", cfg.http_interval), cfg, keepalive=True)
        if not quick:
            runs["naive-keepalive"] = measure(NaiveRestart(workdir), cfg, keepalive=True)
            runs["gunicorn-keepalive"] = measure(GunicornHup(workdir, cfg.gunicorn_workers), cfg, keepalive=True)
        report["rollbacks"] = measure_rollbacks(cfg, workdir)
        report["fds"] = measure_fds(cfg, workdir)
        if cfg.wrk:
            report["wrk"] = [measure_wrk(system, cfg, workdir) for system in
                             (Supervised(workdir, "notify", cfg.http_interval), NaiveRestart(workdir),
                              GunicornHup(workdir, cfg.gunicorn_workers))]
        else:
            report["wrk_skipped"] = "wrk is not installed" if not wrk_path else "--quick (use --wrk on)" if quick else "--wrk off"
        report["share"] = {
            "notify": _spread([r.get("share_ms") for r in runs["supervise-notify-close"]["upgrades"]
                               + runs["supervise-notify-keepalive"]["upgrades"]], digits=3),
            "http": _spread([r.get("share_ms") for r in runs["supervise-http-close"]["upgrades"]], digits=3),
        }
        report["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        report["targets"] = evaluate_targets(report)
        report["wall_s"] = round(time.monotonic() - began, 1)
        print_report(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(f"wrote {args.json}")
        return 0 if all(t["ok"] for t in report["targets"]) else 1
    except KeyboardInterrupt:
        print("\nupgrade_under_load: interrupted; stopping everything it started", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"\nupgrade_under_load: {exc}", file=sys.stderr)
        return 2
    finally:
        stop_everything()
        shutil.rmtree(workdir, ignore_errors=True)


def use_source(spec: str | None, workdir: Path) -> dict[str, Any]:
    """Point SRC/APP/STUB at the code to measure: the working tree, a directory, or a git snapshot."""
    global SRC, APP, STUB
    if spec is None:
        SRC = ROOT
    elif spec.startswith("git:"):
        rev = spec[4:] or "HEAD"
        SRC = workdir / "src"
        SRC.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "supervisor", "examples", "tests/servers"],
                                 capture_output=True, check=False)
        if archive.returncode != 0:
            raise BenchError(f"--src {spec}: git archive failed: {archive.stderr.decode(errors='replace').strip()}")
        subprocess.run(["tar", "-x", "-C", str(SRC)], input=archive.stdout, check=True)
    else:
        SRC = Path(spec).resolve()
    APP, STUB = SRC / "examples" / "app.py", SRC / "tests" / "servers" / "stub.py"
    if not (SRC / "supervisor" / "__main__.py").is_file() or not APP.is_file() or not STUB.is_file():
        raise BenchError(f"--src {spec}: no supervisor/, examples/app.py and tests/servers/stub.py under {SRC}")
    commit = _git("rev-parse", "HEAD") if spec is None else _git("rev-parse", spec[4:] or "HEAD") if spec.startswith("git:") else None
    dirty = bool(_git("status", "--porcelain", "--", "supervisor", "examples", "tests/servers")) if spec is None else False
    describe = (f"working tree at {commit[:10] if commit else '?'}" + (" + uncommitted changes" if dirty else "")
                if spec is None else f"{spec} = {commit[:10] if commit else '?'}" if commit else str(SRC))
    return {"spec": spec, "dir": str(SRC), "commit": commit, "uncommitted_changes": dirty, "describe": describe}


PRIVATE_OPTIONS: list[str] = []  # supervise options of SRC that place its files (control socket, state) in WORKDIR
WORKDIR = Path(tempfile.gettempdir())


def private_files(port: int) -> list[str]:
    """--name, and --control/--state-dir inside our work dir when this supervise has them: nothing is left behind
    in the user's runtime directory, and no two benchmark supervisors share a file."""
    options = ["--name", f"bench-{port}"]
    if "--control" in PRIVATE_OPTIONS:
        options += ["--control", str(WORKDIR / f"ctl-{port}.sock")]
    if "--state-dir" in PRIVATE_OPTIONS:
        options += ["--state-dir", str(WORKDIR / "state")]
    return options


def probe_options(workdir: Path) -> None:
    """Which of --control / --state-dir the supervise under test understands (older commits lack them)."""
    global WORKDIR
    WORKDIR = workdir
    done = subprocess.run([PYTHON, "-m", "supervisor", "--help"], cwd=SRC, capture_output=True, text=True,
                          env=child_env(), check=False, timeout=60)
    PRIVATE_OPTIONS[:] = [option for option in ("--control", "--state-dir") if option in done.stdout]


def _git(*args: str) -> str | None:
    done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
