"""Walking our own process subtree cheaply.

psutil's children(recursive=True) reads /proc/*/stat for every process on the host: with thousands of
processes that is tens of milliseconds of blocked event loop, on every probe and every sweep. Linux lists each
thread's children in /proc/PID/task/TID/children, so walking only our subtree costs what the subtree costs.

A process is ours only if its parent chain reaches us. In a PID namespace without its own /proc (`unshare --pid`
without --mount-proc) the pid numbers in /proc are another namespace's: /proc/2 is not our pid 2, and /proc/1's
children are the host's processes. There nothing is read from /proc: the caller trusts only the direct children
it spawned itself (by pid, in our own namespace) and no tree is walked.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import cache

import psutil


@cache
def proc_is_ours() -> bool:
    """Whether /proc numbers processes as our PID namespace does (it names us by our own pid). Fixed for the
    life of the process, hence computed once."""
    try:
        return int(os.readlink("/proc/self")) == os.getpid()
    except (OSError, ValueError):
        return False


def still_running(pid: int) -> bool:
    """Whether `pid` has not exited (a zombie has: it holds nothing and runs no code). Where /proc is another
    namespace's, only whether the pid exists can be known."""
    if not proc_is_ours():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def child_pids(pid: int) -> list[int] | None:
    """Direct children of `pid`; None if this kernel does not offer the children files."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    found: list[int] = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found.extend(int(item) for item in handle.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{task}"):
                continue  # the thread just ended
            return None
        except OSError:
            continue
    return found


def descendants(process: psutil.Process) -> list[psutil.Process]:
    """Every living descendant of `process` (children first); none when /proc is not our namespace's."""
    if not proc_is_ours():
        return []
    pending, found = [process.pid], []
    while pending:
        pids = child_pids(pending.pop())
        if pids is None:
            try:
                return process.children(recursive=True)
            except psutil.Error:
                return []
        for pid in pids:
            try:
                found.append(psutil.Process(pid))
            except psutil.Error:
                continue
            pending.append(pid)
    return found


def children(process: psutil.Process) -> list[psutil.Process]:
    """Direct children of `process`; none when /proc is not our namespace's."""
    if not proc_is_ours():
        return []
    pids = child_pids(process.pid)
    if pids is None:
        try:
            return process.children()
        except psutil.Error:
            return []
    return processes(pids)


def processes(pids: Iterable[int]) -> list[psutil.Process]:
    """The processes of those pids that still exist."""
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.Error:
            continue
    return found
