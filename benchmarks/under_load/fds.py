"""The supervisor's open fds before any upgrade, after one, and after N quick upgrades under light load."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from typing import Any

import psutil

from supervisor.testing.net import free_port
from supervisor.testing.release import Release

from .measurement import Config
from .processes import Load, Proc
from .samples import spread
from .source import Source
from .systems import VERDICTS


def fd_table(pid: int) -> dict[int, str]:
    table = {}
    for entry in os.scandir(f"/proc/{pid}/fd"):
        try:
            table[int(entry.name)] = os.readlink(entry.path)
        except OSError:
            pass
    return table


def measure_fds(cfg: Config, source: Source) -> dict[str, Any]:
    """psutil num_fds() of the supervisor before any upgrade, after 1, and after N quick upgrades."""
    print(f"  {'open fds, ' + str(cfg.fd_upgrades) + ' quick upgrades':<46}", end="", flush=True)
    began = time.monotonic()
    release = Release(source.workdir / "fd-release", source.stub)
    release.deploy("--tag", "v0")
    port = free_port()
    argv = source.supervise(port, "--ready", "tcp", "--watch", "0", "--drain-timeout", "5s",
                            command=[str(release.script)], log_level="info")
    proc = Proc("supervise (fds)", argv, cwd=source.root)
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
              "upgrade_s": spread(durations), "load": {"requests": summary["requests"], "failed": summary["failures"],
                                                        "errors": summary["errors"]},
              "wall_s": round(time.monotonic() - began, 1)}
    print(f"  {result['wall_s']:5.1f}s  fds {counts}", flush=True)
    return result
