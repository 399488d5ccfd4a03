"""Rollbacks under load: one supervisor, a good stub release, each bad release deployed and SIGHUPed in turn."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from supervisor.testing.net import free_port, http_get
from supervisor.testing.release import Release

from .measurement import Config
from .processes import Load, Proc
from .samples import Samples
from .source import Source
from .systems import VERDICTS

ROLLBACK_CASES: list[tuple[str, list[str] | None, str]] = [
    ("crash at start", ["--exit-at-start", "3"], "exited with status 3 during readiness"),
    ("exec failure (mode 0644)", None, "exec failed"),
    ("hang: never ready (503)", ["--never-ready"], "not ready after"),
    ("hang: never accepts", ["--start-delay", "60"], "not ready after"),
    ("sick in watch window", ["--sick-after", "0.5"], "unhealthy in watch window"),
]


def measure_rollbacks(cfg: Config, source: Source) -> dict[str, Any]:
    """One supervisor, a good stub release, load on; each bad release deployed and SIGHUPed in turn."""
    print(f"  {'rollbacks':<46}", end="", flush=True)
    began = time.monotonic()
    release = Release(source.workdir / "rollback-release", source.stub)
    release.deploy("--tag", "good")
    port = free_port()
    argv = source.supervise(port, "--ready", "http/readyz", "--ready-timeout", "1.5s", "--watch", "3s",
                            "--health-interval", "200ms", "--drain-timeout", "5s", command=[str(release.script)])
    proc = Proc("supervise (rollbacks)", argv, cwd=source.root)
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
