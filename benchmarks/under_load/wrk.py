"""The wrk cross-check: aggregates of a steady run and of a run spanning all K upgrades (wrk has no per-request
figures)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

from .measurement import Config
from .processes import HOST, REQUEST_TIMEOUT, BenchError, Proc
from .samples import spread
from .systems import System

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
              "upgrade_s": spread([r["signal_to_done_s"] for r in records]), "wall_s": round(time.monotonic() - began, 1)}
    print(f" {result['wall_s']:5.1f}s  failed={during['failed']}", flush=True)
    return result
