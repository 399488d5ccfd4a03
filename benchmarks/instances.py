#!/usr/bin/env python3
"""Surge vs rolling with N instances: peak processes, peak memory, duration, and what the clients saw.

    python benchmarks/instances.py [--processes 4] [--upgrades 3] [--watch 1s] [--concurrency 8] [--json out.json]

For each strategy (`surge`, `rolling --batch 1`) one supervisor runs examples/app.py with `-n N --ready
notify` under a closed-loop load of C clients on 127.0.0.1, and is upgraded K times with `supervise ctl
upgrade` (which returns once the old generation is gone). A sampler thread reads, every 10 ms, the process
tree below the supervisor (count and summed RSS, zombies excluded) and the ready-instance count from GET
/status. Reported per strategy: peak process count, peak RSS of the children vs steady, fewest ready
instances seen, upgrade duration (ctl upgrade's wall time: start → promoted → old gone), failed requests.
Only processes started here are stopped (by pid / process group). Exit 1 if a request failed or fewer than N
instances were ever ready; 2 on a setup failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from supervisor.testing.checkout import APP
from supervisor.testing.loadgen import LoadGenerator
from supervisor.testing.net import free_port

HOST = "127.0.0.1"
STRATEGIES = {"surge": [], "rolling": ["--strategy", "rolling", "--batch", "1"]}


def supervise_argv() -> list[str]:
    return [sys.executable, "-c", "from supervisor.cli import main; main()"]


def status(control: Path) -> dict[str, Any]:
    """GET /status over the control socket (stdlib only, so the sampler costs little)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(control))
        sock.sendall(b"GET /status HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data.partition(b"\r\n\r\n")[2])


@dataclass
class Sampler:
    """Process count, children's RSS and ready instances, every `interval` seconds, in a thread."""

    supervisor: int
    control: Path
    interval: float = 0.01
    processes: list[int] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)

    def _run(self) -> None:
        root = psutil.Process(self.supervisor)
        while not self._stop.is_set():
            count, total = 0, 0
            for process in root.children(recursive=True):
                try:
                    if process.status() == psutil.STATUS_ZOMBIE:
                        continue
                    total += process.memory_info().rss
                    count += 1
                except psutil.Error:
                    continue
            self.processes.append(count)
            self.rss.append(total)
            try:
                self.ready.append(status(self.control)["supervisor"]["ready_instances"])
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(self.interval)


def run_strategy(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port, control = free_port(), workdir / f"{name}.sock"
    argv = [*supervise_argv(), "-l", f"{HOST}:{port}", "-n", str(args.processes), *STRATEGIES[name], "--ready", "notify",
            "--watch", args.watch, "--health-interval", "200ms", "--control", str(control), "--log-level", "warning",
            "--", sys.executable, APP]
    log = workdir / f"{name}.log"
    with open(log, "wb") as output:  # the supervisor's and the app's stderr: shown only if something goes wrong
        supervisor = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=output,
                                      start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if status(control)["supervisor"]["ready_instances"] >= args.processes:
                    break
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline or supervisor.poll() is not None:
                raise SystemExit(f"setup failed: {name} never had {args.processes} ready instances:\n"
                                 + log.read_text(errors="replace")[-2000:])
            time.sleep(0.05)
        time.sleep(0.5)
        sampler = Sampler(supervisor.pid, control).start()
        load = LoadGenerator(HOST, port, "/", concurrency=args.concurrency, max_seconds=600.0, timeout=10.0)
        load.start()
        time.sleep(1.0)
        steady = max(sampler.rss[-50:]) if sampler.rss else 0
        durations = []
        for _ in range(args.upgrades):
            began = time.monotonic()
            result = subprocess.run([*supervise_argv(), "ctl", "--control", str(control), "upgrade"],
                                    capture_output=True, text=True, timeout=300, check=False)
            durations.append(time.monotonic() - began)
            if result.returncode != 0:
                raise SystemExit(f"setup failed: {name} upgrade was not promoted: {result.stdout}{result.stderr}")
            time.sleep(0.5)
        stats = load.stop()
        sampler.stop()
        return {"strategy": name, "processes": args.processes, "upgrades": args.upgrades, "watch": args.watch,
                "peak_processes": max(sampler.processes), "steady_processes": min(sampler.processes),
                "steady_rss_mb": round(steady / 2**20, 1), "peak_rss_mb": round(max(sampler.rss) / 2**20, 1),
                "min_ready": min(sampler.ready), "max_ready": max(sampler.ready),
                "duration_s": {"median": round(statistics.median(durations), 3), "min": round(min(durations), 3),
                               "max": round(max(durations), 3)},
                "requests": stats.requests, "failed": stats.failures, "errors": stats.errors}
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGTERM)
            try:
                supervisor.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(supervisor.pid, signal.SIGKILL)
                supervisor.wait(5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--upgrades", type=int, default=3)
    parser.add_argument("--watch", default="1s", help="--watch of the supervisor (each rolling batch is watched)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="supervise-bench-") as workdir:
        try:
            results = [run_strategy(name, args, Path(workdir)) for name in STRATEGIES]
        except SystemExit as exc:
            print(exc, file=sys.stderr)
            return 2
    print(f"N={args.processes}, {args.upgrades} upgrades each, --watch {args.watch}, {args.concurrency} clients, "
          f"examples/app.py, {os.cpu_count()} cores")
    print(f"{'strategy':10} {'procs peak':>10} {'RSS steady':>11} {'RSS peak':>9} {'ready min/max':>14} "
          f"{'duration med (min-max)':>24} {'requests':>9} {'failed':>7}")
    for result in results:
        duration = result["duration_s"]
        print(f"{result['strategy']:10} {result['peak_processes']:>10} {result['steady_rss_mb']:>9.1f}MB "
              f"{result['peak_rss_mb']:>7.1f}MB {result['min_ready']:>6}/{result['max_ready']:<7} "
              f"{duration['median']:>9.2f}s ({duration['min']:.2f}-{duration['max']:.2f}s) "
              f"{result['requests']:>9} {result['failed']:>7}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "cores": os.cpu_count()}, indent=2))
    bad = [r for r in results if r["failed"] or r["min_ready"] < args.processes]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
