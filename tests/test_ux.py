"""What an operator reads: log lines in the order things happened, each said once."""

from __future__ import annotations

import os
import signal

import pytest

from harness import PYTHON, STUB, Supervise, free_port


@pytest.mark.timeout(30)
def test_ctl_signal_says_whether_the_signal_ended_the_processes() -> None:
    port = free_port()
    sup = Supervise(["-l", f"127.0.0.1:{port}", "--ready", "http/readyz", "--watch", "0", "--", PYTHON, STUB]).start()
    try:
        leader = sup.wait_for("serving")["pids"][0]
        kept = sup.ctl("signal", "WINCH")
        assert kept.returncode == 0 and kept.stdout.strip() == (
            f"sent SIGWINCH to generation 1 (pids {leader}); still running after 0.5s: pids {leader}"), kept.stdout
        mark = sup.mark()
        ended = sup.ctl("signal", "TERM")
        said = f"sent SIGTERM to generation 1 (pids {leader}); killed pids {leader} (the supervisor replaces"
        assert ended.returncode == 0 and ended.stdout.startswith(said), ended.stdout
        sup.wait_for("ready", after=mark)
    finally:
        sup.stop()


@pytest.mark.timeout(30)
def test_a_dead_instance_is_gone_before_its_replacement_starts_and_each_end_is_said_once() -> None:
    port = free_port()
    sup = Supervise(["-l", f"127.0.0.1:{port}", "--ready", "http/readyz", "--watch", "0", "--", PYTHON, STUB]).start()
    try:
        leader = sup.wait_for("serving")["pids"][0]
        mark = sup.mark()
        os.kill(leader, signal.SIGKILL)
        replacement = sup.wait_for("ready", after=mark)["pids"][0]
        sup.wait_for("serving", after=mark)
    finally:
        sup.stop()
    kinds = [(event["event"], event.get("pids")) for event in sup.events[mark:]
             if event["event"] in ("exited", "instance-retired", "spawned", "ready", "retired")]
    assert kinds[:4] == [("exited", [leader]), ("instance-retired", [leader]), ("spawned", [replacement]),
                         ("ready", [replacement])], kinds
    gone = [event["msg"] for event in sup.events if event["event"] in ("instance-retired", "retired")]
    assert gone[0] == f"generation 1 instance 0 (pid {leader}) gone", gone
    assert len(gone) == len(set(gone)), f"an end said twice: {gone}"
