"""The systems driven under load: something serving examples/app.py (or its twin) on a port that can be
upgraded — supervise (a notify or an http readiness probe, either cutover, examples/app.py or another server)
and a naive restart; gunicorn's own reloads are in gunicorn.py."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from supervisor.testing.net import free_port

from .processes import HOST, Proc
from .source import PYTHON, ROOT, Source

BENCH_DIR = ROOT / "benchmarks"
VERDICTS = ("promoted", "rolled-back", "upgrade-refused")


class System:
    """Something serving examples/app.py (or its twin) on `port` that can be upgraded under load."""

    label = ""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.port = free_port()

    def start(self) -> None: ...
    def upgrade(self) -> dict[str, Any]: ...
    def stop(self) -> dict[str, Any]: ...

    def cpu(self) -> float | None:
        """CPU seconds (user + system) used so far by the managing process (supervisor, gunicorn master)."""
        return None


def parse_ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True)
class Launch:
    """What supervise runs, when not plain examples/app.py: the command after `--` (`{fd}` as supervise
    replaces it), the children's --chdir, and the name the report gives it."""

    name: str
    command: tuple[str, ...]
    chdir: Path | None = None


class Supervised(System):
    """supervise -l 127.0.0.1:PORT --ready notify|http/readyz --watch 0 [--cutover C] [OPTIONS] -- python
    examples/app.py (or `launch`'s command). Without `cutover` supervise's default applies."""

    def __init__(self, source: Source, probe: str, http_interval: float, cutover: str | None = None,
                 launch: Launch | None = None, options: tuple[str, ...] = ()) -> None:
        super().__init__(source)
        self.probe = probe
        self.http_interval = http_interval
        self.cutover = cutover
        self.launch = launch
        self.options = options
        name = launch.name if launch else f"supervise ({probe})"
        self.label = f"{name} {cutover}" if cutover else name
        self.proc: Proc | None = None

    def argv(self) -> list[str]:
        ready = ["--ready", "notify"] if self.probe == "notify" else [
            "--ready", "http/readyz", "--health-interval", f"{self.http_interval:g}s"]
        options = [*ready, "--watch", "0", "--ready-timeout", "30s", "--drain-timeout", "30s"]
        if self.cutover:
            options += ["--cutover", self.cutover]
        options += self.options
        if self.launch and self.launch.chdir:
            options += ["--chdir", str(self.launch.chdir)]
        command = list(self.launch.command) if self.launch else [PYTHON, str(self.source.app)]
        return self.source.supervise(self.port, *options, command=command)

    def start(self) -> None:
        self.proc = Proc(self.label, self.argv(), cwd=self.source.root)  # `python -m supervisor` imports it from there
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
        return cpu_seconds(self.proc.pid) if self.proc else None

    def stop(self) -> dict[str, Any]:
        if self.proc is None:
            return {}
        family = self.proc.family()
        code = self.proc.stop(grace=40.0)
        stopped = self.proc.find_events(lambda e: e["event"] == "stopped")
        survivors = [p.pid for p in family if alive(p)]
        return {"exit_code": code, "stopped_event": bool(stopped), "survivors": survivors,
                "interleaved_json_lines": len(self.proc.interleaved), "interleaved_examples": self.proc.interleaved[:2]}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def cpu_seconds(pid: int) -> float | None:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class NaiveRestart(System):
    """python examples/app.py --port PORT (binds itself); upgrade = SIGTERM, wait for exit, start again."""

    label = "naive restart"

    def __init__(self, source: Source) -> None:
        super().__init__(source)
        self.proc: Proc | None = None
        self.count = 0

    def _launch(self) -> Proc:
        self.count += 1
        return Proc(f"app-{self.count}", [PYTHON, str(self.source.app), "--host", HOST, "--port", str(self.port)], cwd=ROOT)

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
