"""CPU priority of a starting generation: lowered until it is activated, so its start-up only uses CPU the
serving generation leaves idle; normal again, for its whole tree, at activation (or after a bound: see fleet.py).

How depends on where we run, chosen once (`StartPriority.choose`):
- **autogroup nice 19** where every session is a CPU group of its own (kernel.sched_autogroup_enabled=1 and our
  tasks in the root cpu cgroup: a host, outside any service cgroup with the cpu controller). supervise starts each
  instance in a session of its own, so each is its own group with an equal share, and no per-task nice or policy
  changes that; the group's nice (/proc/PID/autogroup) does, for every process of the session at once. Going back
  to 0 needs no privilege (only a negative value does).
- **SCHED_IDLE** where the generations share one CPU group (a container, a systemd service with the cpu
  controller): set between fork and exec, so every thread and process the release creates inherits it.
- **neither** where SCHED_IDLE could not be undone (no CAP_SYS_NICE, RLIMIT_NICE below 20): the start-up runs at
  normal priority, said once.

Measured (benchmarks/startup_priority.py, 2 cores, gunicorn under closed-loop load, a start-up burning 2 x 1 s),
throughput of the serving generation during a start-up over before it: on the host layout 0.75 / 0.73 (2 / 8
clients) not lowered, 1.01 / 1.11 at autogroup nice 19, and as if not lowered at nice 19 or SCHED_IDLE; with both
generations in one CPU group 0.71 / 0.64 not lowered, 1.01 / 1.03 at SCHED_IDLE, 1.04 / 1.13 at nice 19.
SCHED_IDLE is chosen over nice 19 there because leaving it keeps the nice value the process had (restoring a nice
value must guess it, and clobbers one the release set itself). A cgroup cpu.weight measured about the same, but
needs the cpu controller delegated to the supervisor's cgroup v2, which the machine measured does not have.

The cost: a lowered start-up gets only CPU nobody else wants, and under load that saturates the host it may not
finish (measured with 8 clients: 1 of 2 start-ups at SCHED_IDLE, nice 19 or the lowest weight alike had not
finished its 2 s of CPU after 10 s). So the lowering is bounded (start_priority.py: 5 s, or half the readiness
timeout when that is shorter).

Two facts of Linux shape the use of SCHED_IDLE:
- Policy and nice are per THREAD. A process lowered before exec passes it to every thread and process it
  creates, but restoring one pid restores one thread: every /proc/PID/task/TID must be set back, and a task
  forked while we walk was copied from a still-lowered parent, so the walk repeats until it finds none.
- Lowering is always allowed; raising is not: leaving SCHED_IDLE takes CAP_SYS_NICE, or an RLIMIT_NICE of 20
  in the lowered task (the default is 0). A supervisor that could lower but not restore would leave its release
  idle for good, so it asks `restore_refusal()` first and does not lower where that names a reason.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .cgroups import own_cgroup

_CAP_SYS_NICE = 23
_PASSES = 5  # walks of the tree; a second one only finds what was forked during the first


@dataclass(frozen=True)
class Lowering:
    """Everything `lower_in_child` needs, built in the parent before fork, so the child makes one system call."""

    param: os.sched_param

    @classmethod
    def prepare(cls) -> Lowering:
        """Build it in the parent: a sched_param is a Python object, and the child should not allocate."""
        return cls(os.sched_param(0))


def lower_in_child(lowering: Lowering) -> int:
    """Between fork and exec: put the calling process on SCHED_IDLE, which all it creates inherits.

    Preexec-safe: one system call, no lock, no allocation but the error's. Returns 0, or the errno (the caller
    may report it through its exec-status pipe); never raises, so a failure cannot run the parent's code.
    """
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, lowering.param)
    except OSError as exc:
        return exc.errno or errno.EINVAL
    return 0


def restore_refusal() -> str | None:
    """Why this process could not take a task off SCHED_IDLE again, or None where it can. Ask before lowering."""
    if not hasattr(os, "SCHED_IDLE"):
        return "this system has no SCHED_IDLE"
    if _has_capability(_CAP_SYS_NICE):
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NICE)
    if soft == resource.RLIM_INFINITY or soft >= 20:
        return None  # children inherit it, and the kernel checks the lowered task's own limit
    return "raising a priority needs CAP_SYS_NICE (or RLIMIT_NICE 20), which this supervisor does not have"


def separate_groups() -> str | None:
    """Why lowering a generation's tasks would not lower its share of the CPU here (each session is a CPU group
    of its own: kernel autogroups in the root cpu cgroup), or None where the generations share a group."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as handle:
            if handle.read().strip() != "1":
                return None
    except OSError:
        return None  # a kernel without autogroups
    if not _in_root_cpu_group():
        return None
    return ("every session is a CPU group of its own here (kernel autogroups, root cpu cgroup): a generation "
            "started at a low priority still gets as much CPU as the serving one")


def _in_root_cpu_group() -> bool:
    """Whether our tasks are scheduled in the root task group: the cpu controller's cgroup is "/" (cgroup v1),
    or no cgroup v2 from ours up to the root has the cpu controller (no cpu.weight), so none is a group."""
    try:
        with open("/proc/self/cgroup") as handle:
            lines = [line.rstrip("\n").split(":", 2) for line in handle]
    except OSError:
        return True
    for _, controllers, path in lines:
        if "cpu" in controllers.split(","):
            return path == "/"
    directory = own_cgroup()
    for candidate in [directory, *directory.parents] if directory is not None else []:
        if not (candidate / "cgroup.procs").exists():
            break  # above the cgroup v2 mount
        if (candidate / "cpu.weight").exists():
            return False
    return True


def _has_capability(number: int) -> bool:
    try:
        with open("/proc/self/status") as handle:
            line = next((line for line in handle if line.startswith("CapEff:")), "CapEff:\t0")
    except OSError:
        return False
    return bool(int(line.split()[1], 16) >> number & 1)


@dataclass(frozen=True)
class Restored:
    """What a restore did: threads taken off SCHED_IDLE (or autogroups set back to 0), and those the kernel
    refused (with why)."""

    done: int
    refused: int
    reason: str | None  # one line for the log when refused > 0


def restore(members: Callable[[], Iterable[int]]) -> Restored:
    """Take every thread of every process `members()` names off SCHED_IDLE, back to SCHED_OTHER (at the nice
    value each had all along). `members` is called again on every pass (the generation's cgroup, or its process
    tree), because a process forked during a pass may have inherited SCHED_IDLE after its parent was looked at.

    A thread on SCHED_IDLE at activation is taken to be ours: a release that puts its own threads there on
    purpose has them restored too. Threads that exit meanwhile are skipped; a refusal (EPERM) is counted, not
    raised: the generation then runs partly at idle priority, which the caller should say.
    """
    threads = refused = 0
    reason: str | None = None
    normal = os.sched_param(0)
    for _ in range(_PASSES):
        found = 0
        for tid in _threads(members()):
            try:
                if os.sched_getscheduler(tid) != os.SCHED_IDLE:
                    continue
                found += 1
                os.sched_setscheduler(tid, os.SCHED_OTHER, normal)
                threads += 1
            except ProcessLookupError:
                continue
            except OSError as exc:
                refused += 1
                reason = reason or f"thread {tid}: {exc.strerror}"
        if found == 0 or refused:
            break
    return Restored(threads, refused, reason)


def _threads(pids: Iterable[int]) -> list[int]:
    """The thread ids of the processes `pids` (a process that is gone has none)."""
    found: list[int] = []
    for pid in pids:
        try:
            found.extend(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))
        except (OSError, ValueError):
            continue
    return found


def idle(tid: int) -> bool | None:
    """Whether the thread `tid` runs on SCHED_IDLE; None if it is gone. For status and tests."""
    try:
        return os.sched_getscheduler(tid) == os.SCHED_IDLE
    except OSError:
        return None


AUTOGROUP = "autogroup nice 19"
SCHED_IDLE = "SCHED_IDLE"
_LOWEST_NICE = 19


@dataclass(frozen=True)
class StartPriority:
    """How a starting generation is lowered here: `method` (AUTOGROUP, SCHED_IDLE, or None: not at all) and
    `why` (one line for the log: where we run, or why nothing can be lowered)."""

    method: str | None
    why: str

    @classmethod
    def choose(cls) -> StartPriority:
        """The method that lowers a generation's share of the CPU where we run (see the module's docstring)."""
        if (separate := separate_groups()) is not None:
            if os.path.exists("/proc/self/autogroup"):
                return cls(AUTOGROUP, separate.split(":")[0])
            return cls(None, separate)
        if (refusal := restore_refusal()) is not None:
            return cls(None, refusal)
        return cls(SCHED_IDLE, "the generations share one CPU group")

    def lowering(self) -> Lowering | None:
        """What spawn applies between fork and exec: SCHED_IDLE's, or None (nothing, or an autogroup after)."""
        return Lowering.prepare() if self.method == SCHED_IDLE else None

    def lower(self, leader: int) -> str | None:
        """After spawn: put the session `leader` started in at autogroup nice 19 (SCHED_IDLE was set before exec);
        None, or why it could not (the process is gone, /proc refused)."""
        return _set_autogroup(leader, _LOWEST_NICE) if self.method == AUTOGROUP else None

    def restore(self, leaders: Iterable[int], members: Callable[[], Iterable[int]]) -> Restored:
        """Every process of a generation back to normal: its sessions' autogroups (by their `leaders`) at nice 0,
        or every thread of `members()` off SCHED_IDLE."""
        if self.method == SCHED_IDLE:
            return restore(members)
        if self.method != AUTOGROUP:
            return Restored(0, 0, None)
        done = refused = 0
        reason: str | None = None
        for leader in leaders:
            if (error := _set_autogroup(leader, 0)) is None:
                done += 1
            elif error != _GONE:
                refused += 1
                reason = reason or f"process {leader}: {error}"
        return Restored(done, refused, reason)


_GONE = "gone"


def _set_autogroup(pid: int, nice: int) -> str | None:
    """Set the nice value of the autogroup (session) of `pid`; None, _GONE, or the error."""
    try:
        with open(f"/proc/{pid}/autogroup", "w") as handle:
            handle.write(str(nice))
    except (FileNotFoundError, ProcessLookupError):
        return _GONE
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def autogroup_nice(pid: int) -> int | None:
    """The nice value of the autogroup `pid` is in (`/autogroup-N nice K`); None if it is gone. For tests."""
    try:
        with open(f"/proc/{pid}/autogroup") as handle:
            return int(handle.read().split()[-1])
    except (OSError, ValueError, IndexError):
        return None
