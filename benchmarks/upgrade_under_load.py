#!/usr/bin/env python3
"""Upgrades under load: what an upgrade through `supervise` costs the clients, next to what people use today.

    python benchmarks/upgrade_under_load.py [--upgrades K] [--seconds S] [--concurrency C] [--json out.json] [--quick]
                                            [--cutover-only] [--startup SECONDS]

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
6. Steered vs shared cutover side by side (under_load/cutover.py): examples/app.py with an I/O-bound and a
   CPU-bound start-up (`--startup` seconds), uvicorn and hypercorn, each with `--cutover steered` and
   `--cutover shared`, the CPU-bound start-up also not lowered (`--start-priority normal`) and with `--ramp 2s`,
   uvicorn with `--ramp 2s`, and gunicorn's USR2 re-exec; one table of failed requests, p99 upgrading / steady,
   the longest gap with no successful request and signal → old generation gone. `--cutover-only` runs just this.

Per-request figures come from supervisor/testing/loadgen.py, which records every request's start, latency and error
kind: that is what lets samples be split into steady and upgrade windows and keep-alive resets be told apart.
It runs in a process of its own, so our parsing of the supervisor's log does not delay its clients.
wrk reports only aggregates per run, so its section compares a steady run with a run spanning all K upgrades.
Every process started here runs in its own session and is stopped by pid / process group in `finally`, also
on Ctrl-C or SIGTERM. `--src git:HEAD` measures the committed code (a `git archive` snapshot) instead of the
working tree. Exit status: 0 when every target is met, 1 when one is not, 2 on a setup failure, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from under_load.cutover import cutover_targets, measure_cutover, print_cutover
from under_load.fds import measure_fds
from under_load.gunicorn import GunicornHup
from under_load.measurement import Config, measure
from under_load.processes import BenchError, stop_everything
from under_load.report import print_report
from under_load.rollbacks import measure_rollbacks
from under_load.samples import spread
from under_load.source import Source, use_source
from under_load.systems import NaiveRestart, Supervised
from under_load.targets import evaluate_targets
from under_load.wrk import measure_wrk


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Upgrades of examples/app.py under load: supervise vs a naive "
                                     "restart vs gunicorn's HUP reload, and steered vs shared cutover next to gunicorn's USR2 "
                                     "(127.0.0.1 only).")
    parser.add_argument("--upgrades", type=int, help="upgrades per run, K (default 20; 3 with --quick)")
    parser.add_argument("--seconds", type=float, help="steady-state window per run (default 5; 1.5 with --quick)")
    parser.add_argument("--concurrency", type=int, default=8, help="load clients (default 8)")
    parser.add_argument("--json", metavar="PATH", help="write every figure to this file")
    parser.add_argument("--quick", action="store_true", help="K=3, shorter windows, 30 fd upgrades, no keep-alive "
                        "baselines, no wrk, no gunicorn io:S row: about 3 minutes on 2 busy cores, under 2 with "
                        "--cutover-only. Full: about 14 minutes, 10 of them section 6 (--cutover-only)")
    parser.add_argument("--cutover-only", action="store_true", help="run only section 6, steered vs shared cutover")
    parser.add_argument("--startup", type=float, default=1.0, help="seconds the slowed start-ups of section 6 "
                        "sleep (io) or burn CPU (cpu) (default 1)")
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
    if args.startup < 0:
        parser.error("--startup must not be negative")
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
        startup=args.startup,
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
        source, report["source"] = use_source(args.src, workdir)
        print(f"upgrade_under_load: K={cfg.upgrades}, C={cfg.concurrency}, steady {cfg.seconds:g}s; "
              f"supervise from {report['source']['describe']}; work dir {workdir}", flush=True)
        if not args.cutover_only:
            measure_classic(report, cfg, source, workdir)
        report["cutover"] = measure_cutover(cfg, source)
        report["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        report["targets"] = (evaluate_targets(report) if report["runs"] else []) + cutover_targets(report["cutover"])
        report["wall_s"] = round(time.monotonic() - began, 1)
        print_report(report, print_cutover)
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


def measure_classic(report: dict[str, Any], cfg: Config, source: Source, workdir: Path) -> None:
    """Sections 1-5: supervise's probes next to a naive restart and gunicorn's HUP, rollbacks, fds, wrk."""
    runs = report["runs"]
    runs["supervise-notify-close"] = measure(Supervised(source, "notify", cfg.http_interval), cfg, keepalive=False,
                                             control=True)
    runs["supervise-http-close"] = measure(Supervised(source, "http", cfg.http_interval), cfg, keepalive=False)
    runs["naive-close"] = measure(NaiveRestart(source), cfg, keepalive=False)
    runs["gunicorn-close"] = measure(GunicornHup(source, cfg.gunicorn_workers), cfg, keepalive=False)
    runs["supervise-notify-keepalive"] = measure(Supervised(source, "notify", cfg.http_interval), cfg, keepalive=True)
    if not cfg.quick:
        runs["naive-keepalive"] = measure(NaiveRestart(source), cfg, keepalive=True)
        runs["gunicorn-keepalive"] = measure(GunicornHup(source, cfg.gunicorn_workers), cfg, keepalive=True)
    report["rollbacks"] = measure_rollbacks(cfg, source)
    report["fds"] = measure_fds(cfg, source)
    if cfg.wrk:
        report["wrk"] = [measure_wrk(system, cfg, workdir) for system in
                         (Supervised(source, "notify", cfg.http_interval), NaiveRestart(source),
                          GunicornHup(source, cfg.gunicorn_workers))]
    else:
        report["wrk_skipped"] = ("wrk is not installed" if not report["machine"]["wrk"] else "--quick (use --wrk on)"
                                 if cfg.quick else "--wrk off")
    report["share"] = {
        "notify": spread([r.get("share_ms") for r in runs["supervise-notify-close"]["upgrades"]
                           + runs["supervise-notify-keepalive"]["upgrades"]], digits=3),
        "http": spread([r.get("share_ms") for r in runs["supervise-http-close"]["upgrades"]], digits=3),
    }


def _has(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
