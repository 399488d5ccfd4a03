#!/usr/bin/env python3
"""What a re-exec of the supervisor costs (`supervise ctl reexec`, issue 14), under load on 127.0.0.1.

    python benchmarks/reexec.py [--reexecs 50] [--processes 2] [--concurrency 4] [--json PATH]

A supervisor runs examples/app.py (N instances) under closed-loop load; it is re-executed K times in a row
through its control socket. Measured per re-exec: request → the new image's `reexecuted` event (the whole
operation), its check (request → `reexecuting`: the new supervise run once in check mode) and the exec itself
(`reexecuting` → `reexecuted`: execve, interpreter start, imports, revival); and over the series: failed
requests, p99 and max latency, the supervisor's open fds and RSS at the start and after each re-exec, and
whether every child kept its pid. Exit 1 if a request failed, a child changed or the fds changed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from supervisor.control.client import Endpoint
from supervisor.testing.checkout import APP
from supervisor.testing.loadgen import LoadGenerator
from supervisor.testing.net import free_port
from supervisor.testing.proclog import ProcessLog


def seconds(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["ts"]).timestamp()


def fds(pid: int) -> list[str]:
    """Open descriptors by kind (the event loop's own pipes are new in every image; the count must not change),
    once they stay the same for 0.2 s: the control connection just used is closed on the server's side later."""
    def now() -> list[str]:
        return sorted(os.readlink(f"/proc/{pid}/fd/{fd}").split(":[")[0] for fd in os.listdir(f"/proc/{pid}/fd"))

    found, deadline = now(), time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if (again := now()) == found:
            break
        found = again
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reexecs", type=int, default=50, help="re-execs in a row (default 50)")
    parser.add_argument("--processes", type=int, default=2, help="instances of examples/app.py (default 2)")
    parser.add_argument("--concurrency", type=int, default=4, help="load clients (default 4)")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="supervise-reexec-bench-")
    control = Path(directory) / "control.sock"
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "supervisor", "--log-format", "json", "--control", str(control),
                                "-l", f"127.0.0.1:{port}", "-n", str(args.processes), "--ready", "notify", "--",
                                sys.executable, str(APP)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    log = ProcessLog()
    threading.Thread(target=log.follow, args=(process.stderr,), daemon=True).start()
    try:
        if log.first("events", lambda event: event["event"] == "serving", timeout=30) is None:
            print("the supervisor did not serve", file=sys.stderr)
            return 2
        endpoint = Endpoint(control)
        endpoint.json(endpoint.request("GET", "/status"))  # the control server runs from its first request on
        children = sorted(child.pid for child in psutil.Process(process.pid).children(recursive=True))
        before_fds, rss = fds(process.pid), [psutil.Process(process.pid).memory_info().rss]
        load = LoadGenerator("127.0.0.1", port, "/", concurrency=args.concurrency, max_seconds=600.0, timeout=10.0)
        load.start()
        total, checks, execs = [], [], []
        for _ in range(args.reexecs):
            mark, asked = len(log.events), time.time()
            response = endpoint.request("POST", "/reexec", stream=True)
            if response.status != 200:
                print(f"refused: {endpoint.read(response)!r}", file=sys.stderr)
                return 1
            done = log.first("events", lambda event: event["event"] == "reexecuted", mark, timeout=60)
            going = log.first("events", lambda event: event["event"] == "reexecuting", mark, timeout=1)
            if done is None or going is None:
                print("no re-exec", file=sys.stderr)
                return 1
            total.append(seconds(log.events[done]) - asked)
            checks.append(seconds(log.events[going]) - asked)
            execs.append(seconds(log.events[done]) - seconds(log.events[going]))
            endpoint.json(endpoint.request("GET", "/status"))
            rss.append(psutil.Process(process.pid).memory_info().rss)
        stats = load.stop().summary()
        after_fds = fds(process.pid)
        after_children = sorted(child.pid for child in psutil.Process(process.pid).children(recursive=True))
        result = {
            "reexecs": args.reexecs, "processes": args.processes, "load": stats,
            "reexec_s": {"median": statistics.median(total), "max": max(total)},
            "check_s": {"median": statistics.median(checks), "max": max(checks)},
            "exec_s": {"median": statistics.median(execs), "max": max(execs)},
            "rss_mib": {"start": rss[0] / 2**20, "after_first": rss[1] / 2**20, "after_last": rss[-1] / 2**20,
                        "max": max(rss) / 2**20},
            "fds": {"before": len(before_fds), "after": len(after_fds), "same": after_fds == before_fds},
            "children_unchanged": after_children == children,
        }
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(30)
    print(f"{args.reexecs} re-execs, {args.processes} instances of examples/app.py, {args.concurrency} clients")
    print(f"  re-exec (request → new image serving): median {result['reexec_s']['median']:.3f}s, "
          f"max {result['reexec_s']['max']:.3f}s")
    print(f"    check of the new install: median {result['check_s']['median']:.3f}s; exec → revived: median "
          f"{result['exec_s']['median']:.3f}s, max {result['exec_s']['max']:.3f}s")
    print(f"  requests {stats['requests']}, failed {stats['failures']}, p99 {stats['p99_ms']:.2f} ms, "
          f"max {stats['max_ms']:.2f} ms")
    print(f"  RSS MiB: start {result['rss_mib']['start']:.1f}, after the first {result['rss_mib']['after_first']:.1f}, "
          f"after the last {result['rss_mib']['after_last']:.1f}, max {result['rss_mib']['max']:.1f}")
    print(f"  open fds: {result['fds']['before']} → {result['fds']['after']} (same kinds: {result['fds']['same']}); "
          f"children unchanged: {result['children_unchanged']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    ok = stats["failures"] == 0 and result["children_unchanged"] and result["fds"]["same"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
