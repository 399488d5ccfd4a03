"""A generation started lowered runs on SCHED_IDLE, its threads and children too, and `restore` sets the whole
tree back to normal: real processes, read back from the kernel, no mocks."""

from __future__ import annotations

import os
import resource
import select
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from supervisor import priority, proctree

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE and /proc are Linux's")

# The release: a thread, then a child with a thread of its own; both say their pid and wait for stdin to close.
RELEASE = """
import os, sys, threading
threading.Thread(target=threading.Event().wait, daemon=True).start()
if os.fork() == 0:
    threading.Thread(target=threading.Event().wait, daemon=True).start()
print(os.getpid(), flush=True)
sys.stdin.read()
"""


@contextmanager
def started_lowered() -> Iterator[tuple[int, list[int]]]:
    """Fork, lower between fork and exec as spawn.py would, exec RELEASE; yield its pid and both pids it printed."""
    lowering = priority.Lowering.prepare()
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    argv = [sys.executable, "-c", RELEASE]
    pid = os.fork()
    if pid == 0:
        try:
            if priority.lower_in_child(lowering) == 0:
                os.dup2(stdin_read, 0)
                os.dup2(stdout_write, 1)
                os.execv(argv[0], argv)
        finally:
            os._exit(127)
    os.close(stdin_read)
    os.close(stdout_write)
    try:
        yield pid, _read_pids(stdout_read, 2)
    finally:
        os.close(stdin_write)  # both processes read stdin to its end and exit
        os.close(stdout_read)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def _read_pids(fd: int, count: int, timeout: float = 5.0) -> list[int]:
    data = b""
    while data.count(b"\n") < count:
        ready, _, _ = select.select([fd], [], [], timeout)
        chunk = os.read(fd, 1024) if ready else b""
        if not chunk:
            pytest.fail(f"the release printed {data!r}, not {count} pids")
        data += chunk
    return sorted(int(line) for line in data.split())


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants, as a supervisor without cgroups would find them."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        pending.extend(proctree.child_pids(current) or [])
    return found


def threads(pids: list[int]) -> list[int]:
    return [int(tid) for pid in pids for tid in os.listdir(f"/proc/{pid}/task")]


def test_a_tree_started_lowered_is_idle_and_restore_makes_all_of_it_normal() -> None:
    if reason := priority.restore_refusal():
        pytest.skip(reason)
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    with started_lowered() as (pid, printed):
        assert pid in printed and len(printed) == 2  # the release and its child
        tids = threads(printed)
        assert len(tids) == 4  # a main thread and a second one in each
        assert [priority.idle(tid) for tid in tids] == [True] * 4

        restored = priority.restore(lambda: tree(pid))

        assert restored == priority.Restored(done=4, refused=0, reason=None)
        assert [os.sched_getscheduler(tid) for tid in tids] == [os.SCHED_OTHER] * 4
        assert [os.getpriority(os.PRIO_PROCESS, tid) for tid in tids] == [nice] * 4  # its nice, untouched
        assert priority.restore(lambda: tree(pid)) == priority.Restored(0, 0, None)  # nothing left to do


REFUSED = """
import os, sys
from supervisor import priority
priority.lower_in_child(priority.Lowering.prepare())
os.setgid(65534)
os.setuid(65534)
restored = priority.restore(lambda: [os.getpid()])
print(restored.done, restored.refused, restored.reason)
"""


def test_a_refused_restore_is_counted_with_its_reason_not_raised() -> None:
    """An unprivileged supervisor may lower but not raise: restore reports the refusal for the log."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to become a user that may lower its priority but not raise it again")
    if resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20:
        pytest.skip("RLIMIT_NICE lets any user raise a priority here")
    result = subprocess.run([sys.executable, "-c", REFUSED], check=False, capture_output=True, text=True, timeout=10,
                            cwd="/")
    assert result.returncode == 0, result.stderr
    threads, refused, reason = result.stdout.split(" ", 2)
    assert (threads, refused) == ("0", "1")
    assert reason.startswith("thread ") and reason.endswith(": Operation not permitted\n")
