"""supervise as PID 1 of a container (a new PID namespace): orphans are reaped, signals work."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import psutil
import pytest

from harness import PYTHON, STUB, Supervise, free_port, http_get

UNSHARE = shutil.which("unshare")


def can_unshare() -> bool:
    if UNSHARE is None:
        return False
    done = subprocess.run([UNSHARE, "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=10)
    return done.returncode == 0


pytestmark = pytest.mark.skipif(not can_unshare(), reason="cannot create a PID namespace here (needs root or userns)")


@pytest.mark.timeout(30)
def test_supervise_as_pid1_reaps_orphans_and_stops_on_sigterm(tmp_path) -> None:
    port = free_port()
    # The child leaves orphans behind: each subshell starts a short sleep and exits at once.
    script = tmp_path / "run"
    script.write_text(f"#!/bin/sh\nfor i in 1 2 3; do (sleep 0.3 &) ; done\nexec {PYTHON} {STUB}\n")
    script.chmod(0o755)
    sup = Supervise(["-l", f"127.0.0.1:{port}", "--watch", "0", "--", str(script)],
                    wrapper=[UNSHARE, "--pid", "--fork", "--mount-proc"]).start()
    try:
        sup.wait_for("serving")
        inner = psutil.Process(sup.pid).children()[0]  # supervise itself: PID 1 inside the namespace
        env = json.loads(http_get(port, "/env")[1])
        assert env["ppid"] == 1, "the child's parent is PID 1 of the namespace: the supervisor"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            zombies = [child for child in inner.children() if child.status() == psutil.STATUS_ZOMBIE]
            sleepers = [child for child in inner.children() if child.name() == "sleep"]
            if not zombies and not sleepers:
                break
            time.sleep(0.1)
        assert not zombies and not sleepers, "orphans re-parented to PID 1 must be reaped"
        inner.send_signal(signal.SIGTERM)
        assert sup.wait_exit(10) == 0
        assert sup.wait_for("stopped")["exit_code"] == 0
    finally:
        sup.stop()


# Namespace A (own /proc) holds a decoy at pid 2 and, in namespace B without its own /proc, the supervisor: what
# B's supervisor reads in /proc is A's numbering, where "pid 2" is the decoy and PID 1's children are A's processes.
# The decoy's exit status tells whether it lived until the shell ended it (SIGTERM: 143) or was killed before.
_FOREIGN_PROC = ('sleep 1000 & decoy=$!; unshare --pid --fork "$@"; code=$?; '
                 'kill $decoy; wait $decoy; echo "decoy-status $?" >&2; exit $code')


@pytest.mark.timeout(60)
def test_a_pid_namespace_without_its_own_proc_touches_no_process_it_did_not_spawn() -> None:
    port = free_port()
    sup = Supervise(["-l", f"127.0.0.1:{port}", "--watch", "0", "--", PYTHON, STUB],
                    wrapper=[UNSHARE, "--pid", "--fork", "--mount-proc", "sh", "-c", _FOREIGN_PROC, "sh"]).start()
    try:
        sup.wait_for("serving")
        inner = next(process for process in psutil.Process(sup.pid).children(recursive=True)
                     if process.cmdline()[:3] == [PYTHON, "-m", "supervisor"])
        mark = sup.mark()
        inner.send_signal(signal.SIGHUP)
        assert sup.wait_for("promoted", after=mark)["gen"] == 2
        assert http_get(port)[0] == 200
        began = time.monotonic()
        inner.send_signal(signal.SIGTERM)
        assert sup.wait_exit(40) == 0
        took = time.monotonic() - began
        print(f"stop under a foreign /proc took {took:.3f}s")
        assert "decoy-status 143" in sup.lines, "a process the supervisor did not spawn was killed:\n" + "\n".join(sup.lines[-30:])
        assert not sup.of_kind("leftover-killed"), "nothing outside our own children may be taken for ours"
        assert took < 10, f"stop took {took:.1f}s: it waited for processes that are not its own"
    finally:
        sup.stop()


@pytest.mark.timeout(60)
def test_a_reexec_as_pid1_keeps_everything_running(tmp_path) -> None:
    """In a PID namespace the supervisor is init: exiting would end the namespace and every child with it. A
    re-exec keeps PID 1, the children and the service; an upgrade works afterwards."""
    port = free_port()
    script = tmp_path / "run"
    script.write_text(f"#!/bin/sh\nexec {PYTHON} {STUB}\n")
    script.chmod(0o755)
    sup = Supervise(["-l", f"127.0.0.1:{port}", "--watch", "0", "--", str(script)],
                    wrapper=[UNSHARE, "--pid", "--fork", "--mount-proc"]).start()
    try:
        sup.wait_for("serving")
        inner = psutil.Process(sup.pid).children()[0]
        children = {child.pid for child in inner.children(recursive=True)}
        done = sup.ctl("reexec")
        assert done.returncode == 0, (done.stdout, done.stderr)
        assert "in pid 1" in sup.wait_for("reexecuted")["msg"]
        assert inner.is_running() and {child.pid for child in inner.children(recursive=True)} == children
        assert http_get(port, "/")[0] == 200
        upgraded = sup.ctl("upgrade")
        assert upgraded.returncode == 0, (upgraded.stdout, upgraded.stderr)
        inner.send_signal(signal.SIGTERM)
        assert sup.wait_exit(10) == 0
    finally:
        sup.stop()
