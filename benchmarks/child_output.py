#!/usr/bin/env python3
"""What relaying the children's output costs (`--child-output prefix` against `inherit`), on 127.0.0.1.

    python benchmarks/child_output.py [--seconds 10] [--processes 2] [--concurrency 8] [--burst-mb 100] [--json PATH]

1. Throughput and latency: a supervisor runs the test stub with --log-requests (one access-log line on stderr
   per request) under closed-loop load, once with each mode, its stderr read by `cat > /dev/null` as journald or
   docker would read it. Measured: requests per second, p50/p99/max, failed requests, and the supervisor's own
   CPU time per 1000 requests (inherit: the children write to the reader themselves, the supervisor does nothing).
2. A burst: one instance writes --burst-mb MiB of 100-byte lines to stdout as fast as it can, while the benchmark
   asks `GET /status` over the control socket every 5 ms: how long the burst took, the slowest and the p99
   status answer, and the supervisor's CPU time — with a reader that keeps up (/dev/null) and with one that is
   stalled (a pipe nobody reads: the lines are dropped and counted).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import psutil

from supervisor.control.client import Endpoint
from supervisor.testing.checkout import STUB
from supervisor.testing.loadgen import LoadGenerator
from supervisor.testing.net import free_port, http_get


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


class Supervisor:
    """One supervisor of the stub, its stderr going to `stderr`, stopped by its pid."""

    def __init__(self, workdir: Path, mode: str, processes: int, stderr: int | IO[bytes], *flags: str) -> None:
        self.port, self.control = free_port(), workdir / f"{mode}-{time.monotonic_ns()}.sock"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "supervisor", "--control", str(self.control), "--child-output", mode,
             "-l", f"127.0.0.1:{self.port}", "-n", str(processes), "--watch", "0", "--health-interval", "5s",
             "--", sys.executable, STUB, *flags],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        self.endpoint = Endpoint(self.control)
        deadline = time.monotonic() + 30
        while not self.serving():
            if time.monotonic() > deadline:
                raise SystemExit("the supervisor did not start serving within 30 s")
            time.sleep(0.05)

    def serving(self) -> bool:
        try:
            status = self.endpoint.json(self.endpoint.request("GET", "/status"))
        except Exception:  # noqa: BLE001 - not up yet: whatever the client raises, ask again
            return False
        return any(generation.get("serving") for generation in status.get("generations", []))

    def stop(self) -> None:
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


def under_load(workdir: Path, mode: str, options: argparse.Namespace) -> dict[str, Any]:
    reader = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert reader.stdin is not None
    sup = Supervisor(workdir, mode, options.processes, reader.stdin, "--log-requests")
    reader.stdin.close()
    try:
        load = LoadGenerator("127.0.0.1", sup.port, "/", concurrency=options.concurrency,
                             max_seconds=options.seconds, timeout=10.0)
        cpu_before = cpu_seconds(sup.process.pid)
        load.start()
        load.wait(options.seconds + 30)
        stats = load.stop()
        cpu = cpu_seconds(sup.process.pid) - cpu_before
    finally:
        sup.stop()
        reader.wait(10)
    summary = stats.summary()
    summary["supervisor_cpu_s"] = round(cpu, 3)
    summary["supervisor_cpu_ms_per_1000_requests"] = round(cpu / max(stats.requests, 1) * 1e6, 2)
    return summary


def burst(workdir: Path, reader: str, megabytes: int) -> dict[str, Any]:
    read_end, write_end = os.pipe()
    sup = Supervisor(workdir, "prefix", 1, write_end if reader == "stalled" else subprocess.DEVNULL)
    os.close(write_end)
    try:
        cpu_before = cpu_seconds(sup.process.pid)
        began = time.monotonic()
        http_get(sup.port, f"/burst?mb={megabytes}")
        times: list[float] = []
        last = ""
        while "burst done" not in last and time.monotonic() - began < 120:
            asked = time.monotonic()
            sup.endpoint.json(sup.endpoint.request("GET", "/status"))
            times.append(time.monotonic() - asked)
            lines = sup.endpoint.json(sup.endpoint.request("GET", "/logs?lines=1"))["lines"]
            last = lines[-1]["msg"] if lines else ""
            time.sleep(0.005)
        took = time.monotonic() - began
        cpu = cpu_seconds(sup.process.pid) - cpu_before
        metrics = sup.endpoint.read(sup.endpoint.request("GET", "/metrics")).decode()
        dropped = next(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("supervise_child_output_dropped_total"))
    finally:
        sup.stop()
        os.close(read_end)
    ordered = sorted(times)
    return {"reader": reader, "megabytes": megabytes, "seconds": round(took, 3), "status_requests": len(times),
            "status_max_ms": round(ordered[-1] * 1000, 2),
            "status_p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2),
            "status_median_ms": round(statistics.median(ordered) * 1000, 2),
            "supervisor_cpu_s": round(cpu, 3), "lines_dropped": int(dropped), "child_said": last}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load per mode")
    parser.add_argument("--processes", type=int, default=2, help="instances of the stub")
    parser.add_argument("--concurrency", type=int, default=8, help="clients of the load generator")
    parser.add_argument("--burst-mb", type=int, default=100, help="MiB one instance writes in the burst")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    options = parser.parse_args(argv)
    figures: dict[str, Any] = {"cpus": os.cpu_count(), "load": {}, "burst": []}
    with tempfile.TemporaryDirectory(prefix="child-output-") as workdir:
        for mode in ("inherit", "prefix"):
            result = under_load(Path(workdir), mode, options)
            figures["load"][mode] = result
            print(f"{mode:8} {result['rps']:8.1f} req/s  p50 {result['p50_ms']} ms  p99 {result['p99_ms']} ms  "
                  f"max {result['max_ms']} ms  failed {result['failures']}/{result['requests']}  supervisor CPU "
                  f"{result['supervisor_cpu_ms_per_1000_requests']} ms per 1000 requests", flush=True)
        for reader in ("fast", "stalled"):
            result = burst(Path(workdir), reader, options.burst_mb)
            figures["burst"].append(result)
            print(f"burst {options.burst_mb} MiB, {reader} reader: {result['seconds']} s, status max "
                  f"{result['status_max_ms']} ms p99 {result['status_p99_ms']} ms over {result['status_requests']} "
                  f"requests, supervisor CPU {result['supervisor_cpu_s']} s, {result['lines_dropped']} lines dropped",
                  flush=True)
    if options.json:
        options.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
