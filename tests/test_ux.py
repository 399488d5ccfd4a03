"""What an operator reads: log lines in the order things happened, each said once."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from harness import PYTHON, STUB, Supervise, free_port, supervise_command


def completions(words: str, index: str, shell: str = "bash") -> list[str]:
    """What `supervise` completes for the words typed so far (as the shell function README installs asks it)."""
    env = {**os.environ, "COMP_WORDS": words, "COMP_CWORD": index, "_SUPERVISE_COMPLETE": f"{shell}_complete"}
    done = subprocess.run(supervise_command(), env=env, capture_output=True, text=True, timeout=30, check=True)
    # each line is `plain,WORD` (fish: `plain,WORD<TAB>help`)
    return [line.split(",", 1)[1].split("\t")[0] for line in done.stdout.splitlines() if line.startswith("plain,")]


@pytest.mark.timeout(60)
def test_shell_completion_covers_the_run_form_check_and_ctl() -> None:
    assert completions("supervise --max", "1") == ["--max-rss", "--max-restarts", "--max-surge"]
    assert completions("supervise check --liv", "2") == ["--liveness-interval"]
    assert completions("supervise ctl st", "2") == ["status", "stop"]
    assert completions("supervise ctl status --", "3") == ["--json", "--help"]
    assert completions("supervise ctl st", "st", "fish") == ["status", "stop"]
    script = subprocess.run(supervise_command(), env={**os.environ, "_SUPERVISE_COMPLETE": "bash_source"},
                            capture_output=True, text=True, timeout=30, check=True).stdout
    assert "complete -o nosort -F _supervise_completion supervise" in script


@pytest.mark.timeout(30)
def test_ctl_signal_says_whether_the_signal_ended_the_processes() -> None:
    port = free_port()
    sup = Supervise(["-l", f"127.0.0.1:{port}", "--ready", "http/readyz", "--watch", "0", "--", PYTHON, STUB]).start()
    try:
        leader = sup.wait_for("serving")["pids"][0]
        workers = {worker["name"]: worker for worker in json.loads(sup.ctl("status", "--json").stdout)["workers"]}
        assert workers["liveness"]["interval"] == 10.0, "liveness checks every 10s unless told, like Kubernetes"
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
    reason = sup.of_kind("restarting")[0]["reason"]  # then what it said last (child output), when it said something
    assert reason.split("; last output: ")[0] == "generation 1 killed by SIGKILL", reason
    gone = [event["msg"] for event in sup.events if event["event"] in ("instance-retired", "retired")]
    assert gone[0] == f"generation 1 instance 0 (pid {leader}) gone", gone
    assert len(gone) == len(set(gone)), f"an end said twice: {gone}"
