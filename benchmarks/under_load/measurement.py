"""One measured run of a system: start it, load it, a steady window, K upgrades back to back; the requests
split by window, the upgrades' records and the managing process's CPU."""

from __future__ import annotations

import signal
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from supervisor.testing.loadgen import KEEPALIVE_RESET
from supervisor.testing.net import free_port

from .processes import HOST, Load, Proc
from .samples import Samples, spread
from .source import PYTHON, ROOT
from .systems import System


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
    startup: float  # seconds of the slowed start-ups of the cutover rows


def measure(system: System, cfg: Config, keepalive: bool, control: bool | Beside = False) -> dict[str, Any]:
    """Start the system, load it, a steady window, K upgrades back to back; samples split by window.

    With `control`, K control windows come between the steady window and the upgrades: a standalone
    examples/app.py (or the `Beside` given) started and stopped on another port, i.e. the CPU cost of an
    upgrade's new process on this machine without any upgrade happening.
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
                beside = control if isinstance(control, Beside) else Beside((PYTHON, str(system.source.app)))
                controls.append(control_window(beside))
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
        "upgrade_s": spread([r["signal_to_done_s"] for r in records]),
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


@dataclass(frozen=True)
class Beside:
    """A server started beside the measured one for a control window: its command (`--host` and `--port` are
    appended), and whether it is lowered the way supervise lowers a passive generation on a host (its session's
    autogroup at nice 19)."""

    command: tuple[str, ...]
    lowered: bool = False


def control_window(beside: Beside) -> tuple[float, float]:
    """Start `beside` standalone on another port, wait until it serves, stop it: (begin, end)."""
    began = time.monotonic()
    proc = Proc("control-app", [*beside.command, "--host", HOST, "--port", str(free_port())], cwd=ROOT)
    try:
        if beside.lowered:
            lower_autogroup(proc.process.pid)
        proc.wait_line(lambda line: "serving on" in line, timeout=60, what="'serving on'")
        proc.process.send_signal(signal.SIGTERM)
        proc.process.wait(60)
    finally:
        proc.stop()
    return began, time.monotonic()


def lower_autogroup(pid: int) -> None:
    """The autogroup of `pid`'s session at nice 19, as supervise's --start-priority low does on a host; where
    there are no autogroups the control runs at normal priority."""
    try:
        with open(f"/proc/{pid}/autogroup", "w") as handle:
            handle.write("19")
    except OSError:
        pass


def _cpu_report(cpu: dict[str, float | None], cfg: Config, upgrades: int) -> dict[str, float | None]:
    def used(a: str, b: str) -> float | None:
        x, y = cpu.get(a), cpu.get(b)
        return None if x is None or y is None else y - x

    steady, upgrading = used("steady_begin", "steady_end"), used("upgrades_begin", "upgrades_end")
    return {"per_steady_second": None if steady is None else round(steady / cfg.seconds * 1000, 2),
            "per_upgrade": None if upgrading is None or not upgrades else round(upgrading / upgrades * 1000, 2)}
