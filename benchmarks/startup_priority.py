#!/usr/bin/env python3
"""What a starting generation's CPU burn costs the serving one, at each CPU priority the starting one could get.

    .venv/bin/python benchmarks/startup_priority.py [--modes ...] [--clients 2,8] [--budget 300] [--json PATH]

(the cgroup and "service:" modes need a writable cpu cgroup: root, or a delegated one; they are skipped, with the
reason, elsewhere).

A serving generation (gunicorn, 2 sync workers, benchmarks/wsgi_app.py, in a session of its own as supervise
starts it) answers closed-loop load from supervisor/testing/loadgen.py. Every few seconds a "starting generation"
is launched beside it, in a session of its own too: a parent that forks --burners children, each burning
--burn seconds of CPU and exiting, like an app importing heavy modules. For each mode it measures the serving
latency in the window before the start (steady) and while the start-up runs (burn), and how long the start-up
took: a low priority only gets CPU the serving generation leaves idle, so it may take longer, or never finish.

Modes: where both generations are scheduled, and how the starting one is lowered. "host:" leaves both in the
root cpu cgroup, where the kernel's autogroups (kernel.sched_autogroup_enabled) give every session a group of its
own, so a nice value or policy only counts against the tasks of the same session. "service:" puts both in one
cpu cgroup of ours, as a container or a systemd service with the cpu controller would: no autogroups there.
  host:none, service:none       same priority as the serving one
  host:nice19, service:nice19   setpriority(19) before exec
  host:idle, service:idle       SCHED_IDLE before exec (inherited by the threads and processes it creates)
  host:autogroup19              its session's autogroup at nice 19 (/proc/self/autogroup)
  host:autogroup19+idle         both: the autogroup's share, and SCHED_IDLE's immediate preemption on wakeup
  cgweight    its own cpu cgroup at the lowest weight (cgroup v2 cpu.weight=1, or v1 cpu.shares=10, which the
              kernel maps to the same group weight), the serving one in a sibling cgroup at the default
  cgidle      its own cpu cgroup with cpu.idle=1 (SCHED_IDLE for the whole group), the serving one as above

Columns: "p99 x" is p99 during start-ups / steady, pooled over the rounds; "paired" and "rps x" are the medians
over start-ups of p99 and of throughput during it / just before it, which cancels the other work on the host
(closed-loop throughput is the serving generation's share of the CPU, the least noisy figure).
Modes are interleaved within every round, so drift affects them alike. Only 127.0.0.1 is loaded; every process
started is killed by its process group, and the temporary cgroups are removed, before it exits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from supervisor.testing.loadgen import LoadGenerator
from supervisor.testing.net import free_port

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
MODES = ("host:none", "host:nice19", "host:idle", "host:autogroup19", "host:autogroup19+idle", "service:none", "service:nice19", "service:idle",
         "cgweight", "cgidle")
GROUP_MODES = ("cgweight", "cgidle")  # each generation in a cpu cgroup of its own

# The starting generation: it first takes the mode's cgroup and priority, as supervise would do between fork and
# exec (done here, in its first lines, because a preexec_fn is unsafe in our threaded process: the load runs in a
# thread), then forks the burners (the way a prefork master starts workers) and waits for them.
STARTER = """
import os, sys, time
burn, count, procs, lowering = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if procs:
    with open(procs, "w") as handle:
        handle.write("0")
if lowering == "nice19":
    os.setpriority(os.PRIO_PROCESS, 0, 19)
if lowering.startswith("autogroup19"):
    with open("/proc/self/autogroup", "w") as handle:
        handle.write("19")
if lowering.endswith("idle"):
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
def spin():
    end = time.process_time() + burn
    while time.process_time() < end:
        sum(range(2000))
children = []
for _ in range(count):
    pid = os.fork()
    if pid == 0:
        spin()
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
"""


class BenchError(Exception):
    """The benchmark cannot run here; the message says why."""


@dataclass
class CpuGroups:
    """A temporary cpu-controller cgroup with three leaves: `service` (both generations, for the "service:" modes),
    `serving` and `starting` (one generation each, for the cgroup modes; `starting` gets the mode's setting)."""

    root: Path
    v2: bool

    @classmethod
    def create(cls) -> tuple[CpuGroups | None, str]:
        """Our own parent cgroup, in the v2 hierarchy if the cpu controller is already enabled where we are (so no
        other cgroup changes), else in a v1 cpu hierarchy; None and the reason where neither is possible."""
        name = f"supervise-bench.{os.getpid()}"
        own = _own_v2_cgroup()
        if own is not None and "cpu" in _read(own / "cgroup.subtree_control").split():
            groups = cls(own / name, True)
        elif Path("/sys/fs/cgroup/cpu/cpu.shares").exists():
            groups = cls(Path("/sys/fs/cgroup/cpu") / name, False)
        else:
            return None, "no cpu controller: not enabled in our cgroup v2's subtree_control, and no v1 cpu hierarchy"
        try:
            groups.root.mkdir()
            if groups.v2:
                (groups.root / "cgroup.subtree_control").write_text("+cpu")
            for child in _LEAVES:
                (groups.root / child).mkdir()
        except OSError as exc:
            groups.remove()
            return None, f"cannot create {groups.root}: {exc.strerror}"
        return groups, f"{'v2' if groups.v2 else 'v1'} cpu controller, {groups.root}"

    def lowest(self, mode: str) -> None:
        """Give the `starting` child the mode's setting: the lowest weight, or the idle flag."""
        starting = self.root / "starting"
        (starting / "cpu.idle").write_text("0")  # an idle group refuses a weight (EINVAL)
        (starting / ("cpu.weight" if self.v2 else "cpu.shares")).write_text("1" if self.v2 else "10")
        (starting / "cpu.idle").write_text("1" if mode == "cgidle" else "0")

    def move(self, pids: list[int], child: str | None) -> None:
        """Move processes into one of our leaves, or back to the parent of our temporary cgroup (None)."""
        target = (self.root / child if child else self.root.parent) / "cgroup.procs"
        for pid in pids:
            try:
                target.write_text(str(pid))
            except ProcessLookupError:
                continue

    def remove(self) -> None:
        """Move whatever is left back out and remove the cgroups, children first."""
        for child in _LEAVES:
            self.move([int(p) for p in _read(self.root / child / "cgroup.procs").split()], None)
            _rmdir(self.root / child)
        _rmdir(self.root)


_LEAVES = ("service", "serving", "starting")


def _own_v2_cgroup() -> Path | None:
    relative = next((line[3:].strip() for line in _read(Path("/proc/self/cgroup")).splitlines()
                     if line.startswith("0::")), None)
    for mount in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if relative is not None and Path(mount, "cgroup.subtree_control").exists():
            return Path(mount) / relative.lstrip("/")
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass


def leaves(mode: str) -> tuple[str | None, str | None]:
    """The leaves of our cgroup the serving and the starting generation run in (None: where we were started)."""
    if mode in GROUP_MODES:
        return "serving", "starting"
    return ("service", "service") if mode.startswith("service:") else (None, None)


def starter_argv(mode: str, groups: CpuGroups | None, args: argparse.Namespace) -> list[str]:
    """The starting generation's command line: its burn, the cgroup.procs it enters ("" none) and its lowering."""
    leaf = leaves(mode)[1]
    procs = str(groups.root / leaf / "cgroup.procs") if groups is not None and leaf else ""
    return [sys.executable, "-c", STARTER, str(args.burn), str(args.burners), procs, mode.partition(":")[2]]


@dataclass
class Trial:
    """One start-up of the starting generation beside the serving one under load."""

    mode: str
    steady: tuple[float, float]  # monotonic window before the start-up
    burn: tuple[float, float]  # from launch until it finished (or was killed)
    finished: bool
    load_average: float  # the host's 1-minute load when it ended: other work on the machine shows here


@dataclass
class Server:
    """gunicorn with `workers` sync workers, in a session of its own (as supervise starts a generation)."""

    workers: int
    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = self.workdir / "gunicorn.log"
        argv = [sys.executable, "-m", "gunicorn", "--bind", f"{HOST}:{self.port}", "--workers", str(self.workers),
                "--worker-class", "sync", "--log-level", "warning", "--no-control-socket", "--worker-tmp-dir",
                str(self.workdir), "--pythonpath", str(BENCH_DIR), "wsgi_app:app"]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + 30
        while _read(log).count(" loaded") < self.workers:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise BenchError("gunicorn did not start:\n" + _read(log)[-2000:])
            time.sleep(0.05)

    def pids(self) -> list[int]:
        assert self.proc is not None
        return [self.proc.pid] + [child.pid for child in psutil.Process(self.proc.pid).children()]

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group its session leader made, then collect the leader."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def start_up(mode: str, groups: CpuGroups | None, args: argparse.Namespace) -> tuple[float, float, bool]:
    """Launch the starting generation at the mode's priority; (began, ended, finished within --timeout)."""
    began = time.monotonic()
    proc = subprocess.Popen(starter_argv(mode, groups, args), stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        proc.wait(args.timeout)
        finished = proc.returncode == 0
    except subprocess.TimeoutExpired:
        finished = False
    finally:
        ended = time.monotonic()
        _kill_group(proc)  # the burners too, when it was cut short
    return began, ended, finished


def run_load(clients: int, modes: list[str], groups: CpuGroups | None, workdir: Path,
             args: argparse.Namespace) -> tuple[list[Trial], list[tuple[float, float, bool]]]:
    """One serving generation under `clients` closed-loop clients; every round starts one generation per mode."""
    server = Server(args.workers, workdir)
    trials: list[Trial] = []
    bound = args.rounds * len(modes) * (args.steady + args.timeout + args.settle) + 30
    load: LoadGenerator | None = None
    try:
        server.start()
        load = LoadGenerator(HOST, server.port, concurrency=clients, max_seconds=bound, timeout=10.0)
        load.start()
        time.sleep(args.settle)
        deadline = time.monotonic() + args.budget / len(args.clients)
        for number in range(args.rounds):
            round_began = time.monotonic()
            for mode in modes[number % len(modes):] + modes[:number % len(modes)]:  # rotate: no mode always first
                if groups is not None:
                    if mode in GROUP_MODES:
                        try:
                            groups.lowest(mode)
                        except OSError as exc:
                            raise BenchError(f"cannot set {mode} on {groups.root}/starting: {exc.strerror}") from None
                    groups.move(server.pids(), leaves(mode)[0])
                before = time.monotonic()
                time.sleep(args.steady)
                began, ended, finished = start_up(mode, groups, args)
                trials.append(Trial(mode, (before, began), (began, ended), finished, os.getloadavg()[0]))
                time.sleep(args.settle)
            if time.monotonic() + (time.monotonic() - round_began) > deadline:
                break  # another round like this one would overrun --budget
        samples, load = load.stop().samples, None
    finally:
        if load is not None:
            load.stop()  # cut short by an error: its requests in flight end within their timeout
        if groups is not None and server.proc is not None and server.proc.poll() is None:
            groups.move(server.pids(), None)
        server.stop()
    return trials, samples


def window(samples: list[tuple[float, float, bool]], spans: list[tuple[float, float]]) -> dict[str, Any]:
    """Latency percentiles (ms), throughput and failures of the requests started within any of `spans`."""
    inside = [(latency, ok) for start, latency, ok in samples if any(a <= start < b for a, b in spans)]
    ordered = sorted(latency for latency, ok in inside if ok)
    seconds = sum(b - a for a, b in spans)

    def pct(percent: int) -> float | None:
        return round(ordered[max(1, -(-len(ordered) * percent // 100)) - 1] * 1000, 2) if ordered else None

    return {"requests": len(inside), "failures": sum(1 for _, ok in inside if not ok),
            "rps": round(len(inside) / seconds, 1) if seconds else None, "p50_ms": pct(50), "p99_ms": pct(99)}


def summarize(trials: list[Trial], samples: list[tuple[float, float, bool]], mode: str) -> dict[str, Any]:
    """One mode at one load: steady vs burn windows pooled over its rounds, and its start-up times."""
    mine = [trial for trial in trials if trial.mode == mode]
    durations = sorted(trial.burn[1] - trial.burn[0] for trial in mine if trial.finished)
    steady, burn = window(samples, [t.steady for t in mine]), window(samples, [t.burn for t in mine])
    ratio = burn["p99_ms"] / steady["p99_ms"] if burn["p99_ms"] and steady["p99_ms"] else None
    return {"mode": mode, "rounds": len(mine), "steady": steady, "burn": burn,
            "p99_ratio": round(ratio, 2) if ratio else None, "p99_ratio_paired": _paired_ratio(samples, mine, "p99_ms"),
            "rps_ratio_paired": _paired_ratio(samples, mine, "rps"), "unfinished": len(mine) - len(durations),
            "startup_median_s": round(durations[len(durations) // 2], 3) if durations else None,
            "startup_max_s": round(durations[-1], 3) if durations else None,
            "load_average": round(sum(trial.load_average for trial in mine) / len(mine), 2) if mine else None}


def _paired_ratio(samples: list[tuple[float, float, bool]], trials: list[Trial], key: str) -> float | None:
    """Median over start-ups of `key` during it / `key` just before it: other work on the host, which comes and
    goes, moves both windows of one start-up alike."""
    ratios = []
    for trial in trials:
        steady, burn = window(samples, [trial.steady])[key], window(samples, [trial.burn])[key]
        if steady and burn:
            ratios.append(burn / steady)
    return round(sorted(ratios)[len(ratios) // 2], 2) if ratios else None


def environment(groups_note: str) -> dict[str, Any]:
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "autogroup": _read(Path("/proc/sys/kernel/sched_autogroup_enabled")).strip() == "1",
            "cpu_groups": groups_note}


def table(results: list[dict[str, Any]]) -> str:
    head = (f"{'clients':>7} {'mode':<16} {'n':>2} {'p50 steady':>10} {'p50 burn':>9} {'p99 steady':>10} {'p99 burn':>9} "
            f"{'p99 x':>6} {'paired':>6} {'rps steady':>10} {'rps burn':>9} {'rps x':>6} {'start-up med/max s':>19} {'unfinished':>10} {'loadavg':>7}")
    lines = [head]
    for row in results:
        s, b = row["steady"], row["burn"]
        lines.append(f"{row['clients']:>7} {row['mode']:<16} {row['rounds']:>2} {s['p50_ms']!s:>10} {b['p50_ms']!s:>9} {s['p99_ms']!s:>10} "
                     f"{b['p99_ms']!s:>9} {row['p99_ratio']!s:>6} {row['p99_ratio_paired']!s:>6} {s['rps']!s:>10} {b['rps']!s:>9} {row['rps_ratio_paired']!s:>6} "
                     f"{row['startup_median_s']!s:>9}/{row['startup_max_s']!s:<9} {row['unfinished']:>10} {row['load_average']!s:>7}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--clients", default="2,8", help="load levels: concurrent closed-loop clients")
    parser.add_argument("--rounds", type=int, default=4, help="start-ups per mode and load level")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn sync workers of the serving generation")
    parser.add_argument("--burners", type=int, default=2, help="processes the starting generation forks")
    parser.add_argument("--burn", type=float, default=1.0, help="CPU seconds each burner uses")
    parser.add_argument("--steady", type=float, default=1.0, help="seconds of steady window before each start-up")
    parser.add_argument("--settle", type=float, default=0.5, help="seconds after each start-up")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for all rounds (whole rounds are cut)")
    parser.add_argument("--timeout", type=float, default=10.0, help="a start-up not done by then counts as starved")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    args.modes = [mode for mode in args.modes.split(",") if mode]
    args.clients = [int(item) for item in args.clients.split(",")]
    if unknown := set(args.modes) - set(MODES):
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    grouped = [mode for mode in args.modes if leaves(mode)[1] is not None]
    groups, note = CpuGroups.create() if grouped else (None, "not used")
    modes = [mode for mode in args.modes if groups is not None or mode not in grouped]
    if len(modes) < len(args.modes):
        print(f"cgroup modes skipped: {note}", file=sys.stderr)
    results: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="startup-priority.") as workdir:
            for clients in args.clients:
                trials, samples = run_load(clients, modes, groups, Path(workdir), args)
                results.extend({"clients": clients, **summarize(trials, samples, mode)} for mode in modes)
    except BenchError as exc:
        print(f"startup_priority: {exc}", file=sys.stderr)
        return 1
    finally:
        if groups is not None:
            groups.remove()
    report = {"environment": environment(note), "config": {k: v for k, v in vars(args).items() if k != "json"},
              "results": results}
    print(json.dumps(report["environment"]))
    print(f"starting generation: {args.burners} x {args.burn}s CPU; {args.rounds} rounds per mode and load")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
