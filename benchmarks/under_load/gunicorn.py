"""gunicorn's own reloads, the baselines supervise is compared with: `kill -HUP` (new workers, same master) and
`kill -USR2` then `kill -TERM` of the old master (a new master re-executed, the way gunicorn's docs upgrade the
binary). Both bind the port themselves and serve benchmarks/wsgi_app.py with sync workers."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import psutil

from supervisor.proctree import processes

from .processes import HOST, BenchError, Proc
from .source import PYTHON, Source
from .systems import BENCH_DIR, System, alive, cpu_seconds


class GunicornHup(System):
    """gunicorn --bind 127.0.0.1:PORT --workers W benchmarks/wsgi_app.py; upgrade = kill -HUP master."""

    label = "gunicorn HUP"

    def __init__(self, source: Source, workers: int) -> None:
        super().__init__(source)
        self.workers = workers
        self.proc: Proc | None = None

    def start(self) -> None:
        argv = [PYTHON, "-m", "gunicorn", "--bind", f"{HOST}:{self.port}", "--workers", str(self.workers),
                "--worker-class", "sync", "--graceful-timeout", "30", "--timeout", "30", "--log-level", "info",
                "--no-control-socket", "--worker-tmp-dir", str(self.source.workdir), "--pythonpath", str(BENCH_DIR), "wsgi_app:app"]
        self.proc = Proc(self.label, argv, cwd=self.source.workdir)
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
            proc.wait_change(0.05)
        ready = max(loaded.values())
        gone = max(exited.values())
        psutil.wait_procs(processes(old), timeout=30)  # the "Worker exiting" line comes just before the exit
        done = max(ready, gone)
        phases = {"spawned": min(booted.values()) - signalled if booted else None, "ready_signal": ready - signalled,
                  "promoted": None, "old_gone": gone - signalled}
        return {"t_signal": signalled, "verdict": "reloaded",
                "phases": {k: (None if v is None else round(v, 6)) for k, v in phases.items()},
                "t_done": done, "signal_to_done_s": round(done - signalled, 6)}

    def cpu(self) -> float | None:
        return cpu_seconds(self.proc.pid) if self.proc else None

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


class GunicornUsr2(System):
    """gunicorn --preload --pid FILE ... wsgi_app:app; upgrade = kill -USR2 master, wait until the new master
    (its child; gunicorn 27 writes its pid to FILE.2) has all its workers booted, kill -TERM the old master, wait
    until it and its workers are gone, then until the new master has taken FILE over (it refuses a USR2 before).

    `--preload` makes each generation pay a `slow_start` (SLOW_START=KIND:SECONDS, see benchmarks/slow_start.py)
    once, in the new master while the old workers serve, as a supervised app does: gunicorn's best case."""

    def __init__(self, source: Source, workers: int, slow_start: str | None) -> None:
        super().__init__(source)
        self.workers = workers
        self.slow_start = slow_start
        self.label = "gunicorn USR2" + (f" {slow_start}" if slow_start else "")
        self.pidfile = source.workdir / f"gunicorn-{self.port}.pid"
        self.proc: Proc | None = None
        self.master = 0  # the serving master: the first one is our child, later ones are not

    def argv(self) -> list[str]:
        argv = [PYTHON, "-m", "gunicorn", "--bind", f"{HOST}:{self.port}", "--workers", str(self.workers),
                "--worker-class", "sync", "--preload", "--pid", str(self.pidfile), "--graceful-timeout", "30",
                "--timeout", "30", "--log-level", "info", "--no-control-socket",
                "--worker-tmp-dir", str(self.source.workdir), "--pythonpath", str(BENCH_DIR)]
        if self.slow_start:
            argv += ["--env", f"SLOW_START={self.slow_start}"]
        return [*argv, "wsgi_app:app"]

    def start(self) -> None:
        self.proc = Proc(self.label, self.argv(), cwd=self.source.workdir)
        self.master = self.proc.pid
        self._workers_booted(self.master, 0, time.monotonic() + 60)

    def upgrade(self) -> dict[str, Any]:
        proc = self.proc
        assert proc is not None
        old = self.master
        old_family = processes([old, *(p.pid for p in _children(old))])
        line_mark, _ = proc.marks()
        deadline = time.monotonic() + 60
        signalled = time.monotonic()
        os.kill(old, signal.SIGUSR2)
        new = self._read_pid(self.pidfile.with_name(self.pidfile.name + ".2"), old, deadline)
        found = time.monotonic()
        ready = self._workers_booted(new, line_mark, deadline)
        os.kill(old, signal.SIGTERM)
        if old == proc.pid:
            proc.process.wait(60)  # our child: reap it
        if not _gone(old_family, deadline):
            raise BenchError(f"gunicorn's old master {old} did not exit after TERM:\n" + proc.tail())
        gone = time.monotonic()
        self._read_pid(self.pidfile, old, deadline)  # promoted: the next USR2 is accepted
        self.master = new
        phases = {"spawned": found - signalled, "ready_signal": ready - signalled, "promoted": None,
                  "old_gone": gone - signalled}
        return {"t_signal": signalled, "verdict": "re-executed", "old_master": old, "new_master": new,
                "phases": {k: (None if v is None else round(v, 6)) for k, v in phases.items()},
                "t_done": gone, "signal_to_done_s": round(gone - signalled, 6)}

    def _read_pid(self, path: Path, other_than: int, deadline: float) -> int:
        """The pid written to `path` once it names a master other than `other_than`."""
        while True:
            try:
                pid = int(path.read_text().strip() or 0)
            except (FileNotFoundError, ValueError):
                pid = 0
            if pid and pid != other_than:
                return pid
            if time.monotonic() > deadline:
                raise BenchError(f"gunicorn: no new master pid in {path}:\n" + (self.proc.tail() if self.proc else ""))
            time.sleep(0.005)

    def _workers_booted(self, master: int, line_mark: int, deadline: float) -> float:
        """When the last of `master`'s workers said "Booting worker" (a sync worker accepts right after)."""
        assert self.proc is not None
        while True:
            booted = _mentions(self.proc, _BOOTED, line_mark)
            times = [booted[p.pid] for p in _children(master) if p.pid in booted]
            if len(times) >= self.workers:
                return max(times)
            if time.monotonic() > deadline:
                raise BenchError(f"gunicorn master {master}: workers did not boot:\n" + self.proc.tail())
            self.proc.wait_change(0.01)

    def cpu(self) -> float | None:
        return cpu_seconds(self.master) if self.master else None

    def stop(self) -> dict[str, Any]:
        if self.proc is None:
            return {}
        family = processes([self.master, *(p.pid for p in _children(self.master))])
        try:
            os.kill(self.master, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _gone(family, time.monotonic() + 30)
        self.proc.stop()  # and SIGKILL to whatever is left in the process group
        return {"survivors": [p.pid for p in family if alive(p)]}


def _gone(processes: list[psutil.Process], deadline: float) -> bool:
    """Wait until every one of `processes` has exited (or is a zombie: a master that is not our child is reaped
    by whoever adopted it), at most until `deadline`."""
    while any(alive(p) for p in processes):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.Error:
        return []
