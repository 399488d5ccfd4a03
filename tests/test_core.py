"""Issue 2 (core): `supervise -- myserver` holds the sockets and runs a supervised child generation.

Every test runs a real `python -m supervisor` with real children on real sockets (127.0.0.1, ::1, unix).
Each supervisor gets a unique marker variable in its environment, which every child and grandchild
inherits; "nothing left running" is checked by looking for that marker in /proc, and teardown kills
what still carries it — by pid, never by name.
"""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness import PYTHON, STUB, Supervise, free_port, http_get, pid_gone, supervise_command, wait_port_free

MARKER_VAR = "CORE_TEST_MARKER"  # not SUPERVISE_*: supervise strips those from children
FAST = ["--watch", "0", "--drain-timeout", "2s"]  # nothing here upgrades; keep stops quick


# -- helpers ---------------------------------------------------------------------------------------------------


def stub(*args: str) -> list[str]:
    return [PYTHON, STUB, *args]


def child_script(source: str, *args: str) -> list[str]:
    """A tiny python child given as source text (for what /env cannot show)."""
    return [PYTHON, "-c", textwrap.dedent(source), *args]


def env_report(port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    status, body = http_get(port, "/env", host=host)
    assert status == 200, body
    return json.loads(body)


def marked(marker: str) -> list[psutil.Process]:
    """Living processes (zombies excluded) whose environment carries `marker`."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.pid == os.getpid() or process.status() == psutil.STATUS_ZOMBIE:
                continue
            if process.environ().get(MARKER_VAR) == marker:
                found.append(process)
        except psutil.Error:
            continue
    return found


def leftovers(marker: str, timeout: float = 3.0) -> list[str]:
    """What still runs with `marker` after `timeout` (empty as soon as nothing does)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = marked(marker)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    described = []
    for process in alive:
        try:
            described.append(f"pid {process.pid} ppid {process.ppid()}: {' '.join(process.cmdline())}")
        except psutil.Error:
            pass
    return described


def kill_marked(marker: str) -> None:
    for process in marked(marker):
        try:
            process.kill()
        except psutil.Error:
            pass


def connections_by_fd(pid: int) -> dict[int, Any]:
    process = psutil.Process(pid)
    listing = process.net_connections(kind="all") if hasattr(process, "net_connections") else process.connections(kind="all")
    return {conn.fd: conn for conn in listing}


def wait_file(path: Path, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)
    return path.read_text()


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def unix_http_get(path: str, target: str = "/env", timeout: float = 5.0) -> tuple[int, str]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(f"GET {target} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split(" ")[1]), body


# -- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture
def marker() -> Iterator[str]:
    value = f"core-{uuid.uuid4().hex}"
    yield value
    kill_marked(value)


@pytest.fixture
def supervise(marker: str) -> Iterator[Callable[..., Supervise]]:
    """Start supervisors (JSON logs via the harness) that are always stopped at teardown."""
    started: list[Supervise] = []

    def start(args: list[str], env: dict[str, str] | None = None, cwd: str | None = None) -> Supervise:
        environ = {**os.environ, MARKER_VAR: marker, **(env or {})}
        process = Supervise(list(args), env=environ, cwd=cwd).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def run_supervise(marker: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run supervise to completion with plain (text) logs, as an operator would; stderr captured."""

    def run(args: list[str], prefix: list[str] | None = None, timeout: float = 15.0, cwd: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        environ = {**os.environ, MARKER_VAR: marker, **(env or {})}
        return subprocess.run([*(prefix or []), *supervise_command(), *args], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout,
                              env=environ, cwd=cwd, start_new_session=True)

    return run


def gen(number: int) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event.get("gen") == number


# -- the child and its sockets ---------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_child_serves_on_inherited_socket_with_its_own_environment(supervise: Callable[..., Supervise],
                                                                   marker: str) -> None:
    port = free_port()
    addressed_to_supervisor = {"LISTEN_FDS": "5", "LISTEN_PID": "1", "LISTEN_FDNAMES": "a:b:c:d:e",
                               "NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}
    sup = supervise(["-l", f"127.0.0.1:{port}", *FAST, "--", *stub("--tag", "core")], env=addressed_to_supervisor)
    listening = sup.wait_for("listening")
    assert listening["address"] == f"127.0.0.1:{port}" and listening["adopted"] is False
    serving = sup.wait_for("serving", where=gen(1))

    status, body = http_get(port, "/")
    assert status == 200 and body.startswith("ok core gen=1 "), body
    info = env_report(port)
    pid = info["pid"]
    assert serving["pids"] == [pid]
    assert info["ppid"] == sup.pid
    assert info["listen_pid"] == pid
    assert info["listen_fds"] == 1
    assert info["listen_fdnames"] == ["listen0"]
    assert info["generation"] == 1
    environ = info["environ"]
    assert environ["SUPERVISE_GENERATION"] == "1"
    assert environ["LISTEN_FDNAMES"] == "listen0"
    assert "WATCHDOG_USEC" not in environ and "WATCHDOG_PID" not in environ
    assert environ[MARKER_VAR] == marker  # the rest of the environment is passed on (and "nothing left" checks work)
    notify = info["notify_socket"]
    assert notify and notify != "/nonexistent"
    assert stat.S_ISSOCK(os.stat(notify).st_mode)
    # fd 3 of the child is the supervisor's listening socket, and the child leads its own session
    listener = connections_by_fd(pid)[3]
    assert listener.status == psutil.CONN_LISTEN and listener.laddr.port == port
    assert os.getsid(pid) == pid and os.getpgid(pid) == pid


@pytest.mark.timeout(20)
def test_named_listeners_in_order_and_fd_substitution(supervise: Callable[..., Supervise]) -> None:
    web, admin = free_port(), free_port()
    template = "admin={fd:admin},web={fd:web},first={fd}"
    sup = supervise(["-l", f"web=127.0.0.1:{web}", "-l", f"admin=127.0.0.1:{admin}", *FAST, "--",
                     *stub("--tag", template)])
    sup.wait_for("serving", where=gen(1))
    assert [(event["name"], event["address"]) for event in sup.of_kind("listening")] == [
        ("web", f"127.0.0.1:{web}"), ("admin", f"127.0.0.1:{admin}")]
    info = env_report(web)
    assert info["listen_fds"] == 2
    assert info["listen_fdnames"] == ["web", "admin"]
    assert info["environ"]["LISTEN_FDNAMES"] == "web:admin"
    assert info["tag"] == "admin=4,web=3,first=3"
    assert "admin=4,web=3,first=3" in info["argv"] and template not in info["argv"]
    assert sup.of_kind("spawned")[0]["msg"].endswith(" --tag admin=4,web=3,first=3"), "the log shows what the child got"
    by_fd = connections_by_fd(info["pid"])
    assert by_fd[3].laddr.port == web and by_fd[4].laddr.port == admin
    assert by_fd[3].status == by_fd[4].status == psutil.CONN_LISTEN


@pytest.mark.timeout(20)
@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_ipv6_listener(supervise: Callable[..., Supervise]) -> None:
    port = free_port()
    sup = supervise(["-l", f"[::1]:{port}", *FAST, "--", *stub()])
    assert sup.wait_for("listening")["address"] == f"[::1]:{port}"
    sup.wait_for("serving", where=gen(1))
    status, body = http_get(port, "/", host="[::1]")
    assert status == 200 and "gen=1" in body
    assert env_report(port, host="[::1]")["listen_fds"] == 1


@pytest.mark.timeout(20)
def test_listen_port_only_binds_all_addresses(supervise: Callable[..., Supervise]) -> None:
    port = free_port()
    sup = supervise(["-l", f":{port}", *FAST, "--", *stub()])
    assert sup.wait_for("listening")["address"] in (f"[::]:{port}", f"0.0.0.0:{port}")
    sup.wait_for("serving", where=gen(1))
    info = env_report(port)
    assert connections_by_fd(info["pid"])[3].laddr.ip in ("::", "0.0.0.0")
    assert http_get(port, "/")[0] == 200
    if ipv6_loopback() and sup.of_kind("listening")[0]["address"].startswith("[::]"):
        assert http_get(port, "/", host="[::1]")[0] == 200


@pytest.mark.timeout(20)
def test_unix_listener_replaces_a_stale_socket_file(supervise: Callable[..., Supervise]) -> None:
    path = f"/tmp/supervise-core-{uuid.uuid4().hex[:12]}.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # a server that died without removing its socket file
    stale.close()
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    try:
        sup = supervise(["-l", f"unix:{path}", "--ready", "delay:50ms", *FAST, "--", *stub()])
        assert sup.wait_for("listening")["address"] == f"unix:{path}"
        sup.wait_for("serving", where=gen(1))
        status, body = unix_http_get(path)
        assert status == 200
        info = json.loads(body)
        assert info["listen_fds"] == 1 and info["listen_pid"] == info["pid"]
        assert connections_by_fd(info["pid"])[3].family == socket.AF_UNIX
        sup.signal(signal.SIGTERM)
        assert sup.wait_exit(10) == 0
        assert not os.path.exists(path), "the socket file supervise created is left behind"
    finally:
        if os.path.exists(path):
            os.unlink(path)


@pytest.mark.timeout(20)
def test_unix_listener_refuses_a_live_socket(run_supervise: Callable[..., Any], marker: str) -> None:
    path = f"/tmp/supervise-core-{uuid.uuid4().hex[:12]}.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(8)
    try:
        result = run_supervise(["-l", f"unix:{path}", "--ready", "delay:50ms", "--", *stub()])
        assert_one_error_line(result, path)
        assert "another process" in result.stderr or "in use" in result.stderr, result.stderr
        assert leftovers(marker) == []
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:  # ours still answers: not removed
            client.connect(path)
    finally:
        live.close()
        os.unlink(path)


NODELAY_CHILD = """
    import os, socket, sys, time
    out = sys.argv[1]
    listener = socket.socket(fileno=3)
    values = [listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)]
    conn, _ = listener.accept()
    values.append(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    with open(out + ".tmp", "w") as f:
        f.write(" ".join("1" if value else "0" for value in values))
    os.rename(out + ".tmp", out)
    conn.close()
    while True:
        time.sleep(1)
"""


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("flags", "expected"), [([], "1 1"), (["--no-nodelay"], "0 0")], ids=["default", "no-nodelay"])
def test_tcp_nodelay_on_listener_and_accepted_connections(supervise: Callable[..., Supervise], tmp_path: Path,
                                                          flags: list[str], expected: str) -> None:
    port, out = free_port(), tmp_path / "nodelay"
    sup = supervise(["-l", f"127.0.0.1:{port}", *flags, "--ready", "delay:50ms", *FAST, "--",
                     *child_script(NODELAY_CHILD, str(out))])
    sup.wait_for("serving", where=gen(1))
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        assert wait_file(out) == expected  # "listener accepted" as 0/1


@pytest.mark.timeout(20)
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss(8) to read the listen backlog")
def test_backlog_is_applied(supervise: Callable[..., Supervise]) -> None:
    port = free_port()
    sup = supervise(["-l", f"127.0.0.1:{port}", "--backlog", "7", *FAST, "--", *stub()])
    sup.wait_for("serving", where=gen(1))
    output = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in output.splitlines() if line.strip()]
    assert len(rows) == 1, output
    assert rows[0][2] == "7", output  # Send-Q of a listening socket is its backlog


SIGNALS_CHILD = """
    import os, signal, sys, time
    out = sys.argv[1]
    def note(signum, frame):
        with open(out, "a") as f:
            f.write(f"{signal.Signals(signum).name} {os.getpid()}\\n")
    for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH):
        signal.signal(signum, note)
    with open(out + ".ready", "w") as f:
        f.write(" ".join(line for line in open("/proc/self/status").read().splitlines() if line.startswith("SigBlk")))
    while True:
        time.sleep(0.05)
"""


@pytest.mark.timeout(20)
@pytest.mark.parametrize("signame", ["SIGUSR1", "SIGUSR2", "SIGWINCH"])
def test_signals_are_forwarded_to_the_serving_child(supervise: Callable[..., Supervise], tmp_path: Path,
                                                    signame: str) -> None:
    out = tmp_path / "signals"
    sup = supervise(["--ready", "delay:50ms", *FAST, "--", *child_script(SIGNALS_CHILD, str(out))])
    pid = sup.wait_for("serving", where=gen(1))["pids"][0]
    wait_file(Path(str(out) + ".ready"))
    mark = sup.mark()
    sup.signal(signal.Signals[signame])
    forwarded = sup.wait_for("signal-forwarded", after=mark, timeout=5)
    assert forwarded["signal"] == signame and forwarded["gen"] == 1
    deadline = time.monotonic() + 5
    while not (out.exists() and out.read_text()):
        assert time.monotonic() < deadline, "the child never received the signal"
        time.sleep(0.02)
    assert out.read_text() == f"{signame} {pid}\n"
    assert psutil.Process(pid).is_running() and not sup.of_kind("exited")


MASK_CHILD = """
    import os, sys, time
    out = sys.argv[1]
    with open(out + ".tmp", "w") as f:  # python leaves the mask it was started with alone
        f.write("".join(line for line in open("/proc/self/status") if line.startswith("SigBlk:")))
    os.rename(out + ".tmp", out)
    while True:
        time.sleep(1)
"""


def _signal_state_child(what: str, out: Path) -> list[str]:
    if what == "SigBlk":
        return child_script(MASK_CHILD, str(out))
    # a shell, not python: python ignores SIGPIPE itself at start-up (and dash resets the mask, so not for SigBlk)
    return ["/bin/sh", "-c", f'grep -E "^SigIgn:" /proc/self/status > {out}.tmp && mv {out}.tmp {out}; exec sleep 60']


@pytest.mark.timeout(20)
@pytest.mark.parametrize("what", ["SigBlk", "SigIgn"], ids=["mask-empty", "no-ignored-signals"])
def test_child_starts_with_empty_signal_mask_and_default_dispositions(supervise: Callable[..., Supervise],
                                                                     tmp_path: Path, what: str) -> None:
    out = tmp_path / "status"
    sup = supervise(["--ready", "delay:50ms", *FAST, "--", *_signal_state_child(what, out)])
    sup.wait_for("serving", where=gen(1))
    name, _, value = wait_file(out).strip().partition(":")
    assert name == what
    # SigBlk: nothing blocked survives exec; SigIgn: no SIG_IGN (python's SIGPIPE, SIGXFSZ) survives exec.
    # Only signals a program can manage count: glibc reserves 32 and 33 for itself (sigaction refuses them), so
    # if whoever started the test run ignored one of those, no process below it can undo that.
    manageable = sum(1 << (signum - 1) for signum in signal.valid_signals())
    assert int(value.strip(), 16) & manageable == 0, f"{what} {value.strip()}"


# -- supervision -----------------------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_killed_child_is_replaced_and_the_port_keeps_answering(supervise: Callable[..., Supervise]) -> None:
    port = free_port()
    sup = supervise(["-l", f"127.0.0.1:{port}", *FAST, "--", *stub()])
    first = sup.wait_for("serving", where=gen(1))["pids"][0]
    mark = sup.mark()
    os.kill(first, signal.SIGKILL)
    # Sent while no child accepts: the held socket queues it until the replacement does. The replacement is the
    # same release, so it is the same generation: only the process is new.
    status, body = http_get(port, "/", timeout=10)
    assert status == 200 and "gen=1" in body, body
    exited = sup.wait_for("exited", where=gen(1), after=mark)
    assert exited["signal"] == signal.SIGKILL and exited["expected"] is False
    restarting = sup.wait_for("restarting", after=mark)
    assert restarting["delay"] == pytest.approx(0.1)
    second = sup.wait_for("ready", where=gen(1), after=mark)["pids"][0]
    assert second != first and f"pid={second}" in body
    assert pid_gone(first, 2)
    report = env_report(port)
    assert report["generation"] == 1 and report["pid"] == second


@pytest.mark.timeout(20)
def test_child_failing_at_start_gives_up_after_max_restarts(supervise: Callable[..., Supervise], marker: str) -> None:
    port = free_port()
    sup = supervise(["-l", f"127.0.0.1:{port}", "--max-restarts", "2", *FAST, "--", *stub("--exit-at-start", "3")])
    code = sup.wait_exit(15)
    assert code != 0
    sup.wait_for("fatal", timeout=1)
    assert len(sup.of_kind("restarting")) == 2
    assert len(sup.of_kind("spawned")) == 3
    assert not sup.of_kind("serving")
    assert [event["code"] for event in sup.of_kind("exited")] == [3, 3, 3]
    assert sup.of_kind("stopped")[-1]["exit_code"] == code
    assert leftovers(marker) == []
    assert wait_port_free(port, 2)


LATE_GRANDCHILD_CHILD = """
    import os, sys, time
    out, then = sys.argv[1], sys.argv[2]
    time.sleep(0.2)  # ready by now (--ready delay:50ms): forked after every readiness look at the tree
    pid = os.fork()
    if pid == 0:
        os.setsid()  # out of the process group: only the tree (not a killpg) reaches it
        while True:
            time.sleep(1)
    with open(out + ".tmp", "w") as f:
        f.write(str(pid))
    os.rename(out + ".tmp", out)
    if then == "crash":
        time.sleep(0.2)
        os._exit(3)  # well before the supervisor's first periodic (1 s) tree scan
    while True:
        time.sleep(1)
"""


@pytest.mark.timeout(20)
def test_grandchild_of_a_crashed_generation_does_not_outlive_the_supervisor(
        supervise: Callable[..., Supervise], marker: str, tmp_path: Path) -> None:
    out = tmp_path / "grandchild"
    sup = supervise(["--ready", "delay:50ms", "--max-restarts", "0", "--watch", "0", "--drain-timeout", "1s", "--",
                     *child_script(LATE_GRANDCHILD_CHILD, str(out), "crash")])
    assert sup.wait_exit(15) != 0
    sup.wait_for("fatal", timeout=1)
    grandchild = int(out.read_text())
    left = leftovers(marker, timeout=1.0)  # the supervisor is gone: whatever still runs now has leaked
    kill_marked(marker)  # (a leaked process also holds the supervisor's stderr open)
    assert left == [], f"grandchild {grandchild} leaked"


@pytest.mark.timeout(20)
def test_grandchild_of_a_killed_generation_is_killed_when_it_is_replaced(
        supervise: Callable[..., Supervise], marker: str, tmp_path: Path) -> None:
    out = tmp_path / "grandchild"
    sup = supervise(["--ready", "delay:50ms", "--watch", "0", "--drain-timeout", "300ms", "--",
                     *child_script(LATE_GRANDCHILD_CHILD, str(out), "stay")])
    leader = sup.wait_for("serving", where=gen(1))["pids"][0]
    grandchild = int(wait_file(out))
    out.unlink()
    mark = sup.mark()
    os.kill(leader, signal.SIGKILL)  # within the first second: before any periodic tree scan
    replacement = sup.wait_for("ready", where=gen(1), after=mark)["pids"][0]
    sup.wait_for("instance-retired", where=gen(1), after=mark, timeout=5)
    # "No process of a finished instance outlives its drain timeout": gone when the dead instance is retired
    # (a short grace only), not whenever a periodic scan happens to notice it.
    assert pid_gone(grandchild, 0.3), f"grandchild {grandchild} of the dead instance outlived its retirement"
    second_grandchild = int(wait_file(out))
    left = {process.pid for process in marked(marker)} - {sup.pid}
    assert left == {replacement, second_grandchild}, left


# -- stopping --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_sigterm_drains_exits_zero_and_frees_the_port(supervise: Callable[..., Supervise], marker: str) -> None:
    port = free_port()
    sup = supervise(["-l", f"127.0.0.1:{port}", *FAST, "--", *stub()])
    pid = sup.wait_for("serving", where=gen(1))["pids"][0]
    began = time.monotonic()
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(10) == 0
    assert time.monotonic() - began < 2.0
    assert sup.wait_for("draining", where=gen(1))["pids"] == [pid]
    exited = sup.wait_for("exited", where=gen(1))
    assert exited["code"] == 0 and exited["expected"] is True
    assert not sup.of_kind("drain-timeout")
    assert sup.wait_for("stopped")["exit_code"] == 0
    assert pid_gone(pid, 1)
    assert leftovers(marker) == []
    assert wait_port_free(port, 2)


@pytest.mark.timeout(20)
def test_sigterm_kills_a_child_ignoring_it_and_all_grandchildren_after_drain_timeout(
        supervise: Callable[..., Supervise], marker: str) -> None:
    port = free_port()
    sup = supervise(["-l", f"127.0.0.1:{port}", "--watch", "0", "--drain-timeout", "1s", "--",
                     *stub("--ignore-term", "--grandchildren", "2")])
    sup.wait_for("serving", where=gen(1))
    info = env_report(port)
    pid, grandchildren = info["pid"], info["grandchildren"]
    assert len(grandchildren) == 2
    assert os.getsid(grandchildren[1]) == grandchildren[1] != os.getsid(pid)  # the second one left the session
    began = time.monotonic()
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(10) == 0
    elapsed = time.monotonic() - began
    assert 0.9 <= elapsed < 3.0, elapsed
    timed_out = sup.wait_for("drain-timeout", where=gen(1))
    assert pid in timed_out["pids"]  # grandchildren got the drain signal too (as systemd does) and obeyed it
    for each in (pid, *grandchildren):
        assert pid_gone(each, 2), f"pid {each} survived"
    assert leftovers(marker) == []
    assert wait_port_free(port, 2)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("signals", [("SIGQUIT",), ("SIGTERM", "SIGQUIT"), ("SIGINT", "SIGINT")],
                         ids=["quit", "term-then-quit", "int-then-int"])
def test_second_interrupt_or_quit_kills_at_once(supervise: Callable[..., Supervise], marker: str,
                                                signals: tuple[str, ...]) -> None:
    port = free_port()
    sup = supervise(["-l", f"127.0.0.1:{port}", "--watch", "0", "--drain-timeout", "30s", "--",
                     *stub("--ignore-term", "--grandchildren", "2")])
    sup.wait_for("serving", where=gen(1))
    info = env_report(port)
    for index, name in enumerate(signals):
        if index:
            sup.wait_for("draining", where=gen(1), timeout=5)
            time.sleep(0.1)
        began = time.monotonic()
        sup.signal(signal.Signals[name])
    sup.wait_exit(10)
    assert time.monotonic() - began < 2.0
    assert any(event.get("forced") for event in sup.of_kind("stopping"))
    for each in (info["pid"], *info["grandchildren"]):
        assert pid_gone(each, 2), f"pid {each} survived"
    assert leftovers(marker) == []
    assert wait_port_free(port, 2)


@pytest.mark.timeout(20)
def test_sigkill_of_the_supervisor_takes_the_child_and_frees_the_port(supervise: Callable[..., Supervise],
                                                                      marker: str) -> None:
    port = free_port()
    sup = supervise(["-l", f"127.0.0.1:{port}", *FAST, "--", *stub()])
    pid = sup.wait_for("serving", where=gen(1))["pids"][0]
    sup.signal(signal.SIGKILL)
    sup.wait_exit(5)
    assert pid_gone(pid, 2), "the child outlived its supervisor (no parent-death signal?)"
    assert wait_port_free(port, 2)
    assert leftovers(marker) == []


@pytest.mark.timeout(20)
def test_orphaned_zombies_are_reaped(supervise: Callable[..., Supervise]) -> None:
    port = free_port()
    # (a short drain: the setsid()'d grandchildren are outside the group the drain signal goes to)
    sup = supervise(["-l", f"127.0.0.1:{port}", "--watch", "0", "--drain-timeout", "300ms", "--",
                     *stub("--grandchildren", "2")])
    sup.wait_for("serving", where=gen(1))
    info = env_report(port)
    for each in info["grandchildren"]:
        os.kill(each, signal.SIGKILL)
    for each in info["grandchildren"]:  # the stub never waits: they stay its zombies
        assert pid_gone(each, 2)
    mark = sup.mark()
    os.kill(info["pid"], signal.SIGKILL)  # now they are orphans, re-parented to the supervisor (subreaper)
    sup.wait_for("ready", where=gen(1), after=mark)  # the replacement instance
    supervisor = psutil.Process(sup.pid)
    deadline = time.monotonic() + 3
    while True:
        zombies = [child.pid for child in supervisor.children() if child.status() == psutil.STATUS_ZOMBIE]
        gone = all(not psutil.pid_exists(each) for each in (info["pid"], *info["grandchildren"]))
        if (not zombies and gone) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert zombies == [], f"zombie children of the supervisor: {zombies}"
    assert gone, "the dead child or its grandchildren were never reaped"
    assert [child.pid for child in supervisor.children()] == [env_report(port)["pid"]]


ORPHAN_CHILD = """
    import os, sys, time
    out = sys.argv[1]
    middle = os.fork()
    if middle == 0:
        grandchild = os.fork()
        if grandchild == 0:
            time.sleep(1.0)
            os._exit(0)
        with open(out + ".tmp", "w") as f:
            f.write(str(grandchild))
        os.rename(out + ".tmp", out)
        os._exit(0)  # the grandchild is orphaned now
    os.waitpid(middle, 0)
    while True:
        time.sleep(1)
"""


@pytest.mark.timeout(20)
def test_orphaned_grandchild_is_adopted_and_reaped(supervise: Callable[..., Supervise], tmp_path: Path) -> None:
    out = tmp_path / "grandchild"
    sup = supervise(["--ready", "delay:50ms", *FAST, "--", *child_script(ORPHAN_CHILD, str(out))])
    leader = sup.wait_for("serving", where=gen(1))["pids"][0]
    grandchild = int(wait_file(out))
    deadline = time.monotonic() + 1
    while psutil.Process(grandchild).ppid() != sup.pid:
        assert time.monotonic() < deadline, "the orphan was not re-parented to the supervisor (no child subreaper?)"
        time.sleep(0.01)
    deadline = time.monotonic() + 4  # it exits 1 s after it was forked
    while psutil.pid_exists(grandchild):
        assert time.monotonic() < deadline, f"orphan {grandchild} exited but was never reaped"
        time.sleep(0.05)
    supervisor = psutil.Process(sup.pid)
    assert [child.pid for child in supervisor.children()] == [leader]
    assert all(child.status() != psutil.STATUS_ZOMBIE for child in supervisor.children())


# -- bad input -------------------------------------------------------------------------------------------------


def assert_one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    assert lines[0].startswith("supervise: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


BAD_INPUT: list[tuple[str, Callable[[int, Path], list[str]], str]] = [
    ("listen-unparseable", lambda port, tmp: ["-l", "not-an-address", "--", *stub()], "not-an-address"),
    ("listen-port-not-a-number", lambda port, tmp: ["-l", "127.0.0.1:http", "--", *stub()], "127.0.0.1:http"),
    ("listen-port-out-of-range", lambda port, tmp: ["-l", "127.0.0.1:70000", "--", *stub()], "70000"),
    ("no-command-after-dashes", lambda port, tmp: ["-l", f"127.0.0.1:{port}", "--"], "command"),
    ("no-command-at-all", lambda port, tmp: ["-l", f"127.0.0.1:{port}"], "command"),
    ("executable-not-found-path", lambda port, tmp: ["-l", f"127.0.0.1:{port}", "--", "/nonexistent/server"],
     "/nonexistent/server"),
    ("executable-not-found-in-path", lambda port, tmp: ["-l", f"127.0.0.1:{port}", "--", "no-such-server-xyzzy"],
     "no-such-server-xyzzy"),
    ("executable-is-a-directory", lambda port, tmp: ["-l", f"127.0.0.1:{port}", "--", str(tmp)], "{tmp}"),
    ("unknown-ready-kind", lambda port, tmp: ["--ready", "pigeon:coo", "--", *stub()], "pigeon"),
    ("bad-duration", lambda port, tmp: ["--drain-timeout", "5 parsecs", "--", *stub()], "5 parsecs"),
    ("bad-ready-delay", lambda port, tmp: ["--ready", "delay:soon", "--", *stub()], "soon"),
    ("unknown-drain-signal", lambda port, tmp: ["--drain-signal", "SIGBOGUS", "--", *stub()], "SIGBOGUS"),
    ("unknown-loop", lambda port, tmp: ["--loop", "tokio", "--", *stub()], "tokio"),
    ("unknown-option", lambda port, tmp: ["--frobnicate", "--", *stub()], "--frobnicate"),
    ("unknown-fd-name", lambda port, tmp: ["-l", f"web=127.0.0.1:{port}", "--", *stub("--tag", "{fd:nosuch}")],
     "nosuch"),
    ("pidfile-unwritable", lambda port, tmp: ["--pidfile", "/proc/x/pid", "-l", f"127.0.0.1:{port}", "--", *stub()],
     "/proc/x/pid"),
    ("pidfile-is-a-directory", lambda port, tmp: ["--pidfile", str(tmp), "-l", f"127.0.0.1:{port}", "--", *stub()],
     "{tmp}"),
    ("control-unwritable", lambda port, tmp: ["--control", "/proc/x/ctl.sock", "-l", f"127.0.0.1:{port}", "--",
                                              *stub()], "/proc/x/ctl.sock"),
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("args", "needle"), [pytest.param(args, needle, id=name) for name, args, needle in BAD_INPUT])
def test_bad_input_gives_one_clear_error_line(run_supervise: Callable[..., Any], marker: str, tmp_path: Path,
                                              args: Callable[[int, Path], list[str]], needle: str) -> None:
    port = free_port()
    result = run_supervise(args(port, tmp_path))
    assert_one_error_line(result, needle.replace("{tmp}", str(tmp_path)))
    assert leftovers(marker, timeout=0.5) == []
    assert wait_port_free(port, 1)


@pytest.mark.timeout(20)
def test_port_already_in_use(run_supervise: Callable[..., Any], marker: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_supervise(["-l", f"127.0.0.1:{port}", "--", *stub()])
        line = assert_one_error_line(result, str(port))
        assert "in use" in line
        assert leftovers(marker, timeout=0.5) == []


@pytest.mark.timeout(20)
def test_not_executable(run_supervise: Callable[..., Any], marker: str, tmp_path: Path) -> None:
    script = tmp_path / "server.sh"
    script.write_text("#!/bin/sh\nexec sleep 60\n")
    script.chmod(0o644)
    result = run_supervise(["-l", f"127.0.0.1:{free_port()}", "--", str(script)])
    line = assert_one_error_line(result, str(script))
    assert "permission denied" in line.lower() or "not executable" in line.lower()
    assert leftovers(marker, timeout=0.5) == []


@pytest.mark.timeout(20)
def test_exec_format_error_is_one_clear_cannot_execute_line(run_supervise: Callable[..., Any], marker: str,
                                                            tmp_path: Path) -> None:
    binary = tmp_path / "server"
    binary.write_text("this is not a program\n")  # x bit but no #! line: execve fails with ENOEXEC
    binary.chmod(0o755)
    port = free_port()
    result = run_supervise(["-l", f"127.0.0.1:{port}", "--", str(binary)])
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    assert any(f"cannot execute {binary}: Exec format error" in line for line in result.stderr.splitlines()), result.stderr
    assert leftovers(marker, timeout=0.5) == []
    assert wait_port_free(port, 1)


def _nobody_prefix() -> list[str]:
    group = "nogroup"
    try:
        grp.getgrnam(group)
    except KeyError:
        group = "nobody"
    return ["setpriv", "--reuid=nobody", f"--regid={group}", "--clear-groups"]


@pytest.mark.timeout(20)
def test_privileged_port_permission_denied(run_supervise: Callable[..., Any], marker: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run supervise as user nobody")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv(1) to drop to user nobody")
    port = 80
    try:
        first_unprivileged = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    except OSError:
        first_unprivileged = 1024
    if first_unprivileged <= port:
        pytest.skip(f"net.ipv4.ip_unprivileged_port_start={first_unprivileged}: anyone may bind port {port} here")
    check = subprocess.run([*_nobody_prefix(), PYTHON, "-c", "import supervisor, psutil"], cwd="/",
                           capture_output=True, text=True, timeout=15)
    if check.returncode != 0:
        pytest.skip(f"the test venv ({PYTHON}) is not usable by user nobody: {check.stderr.strip()[-200:]}")
    result = run_supervise(["-l", f"127.0.0.1:{port}", "--", "/bin/sleep", "60"], prefix=_nobody_prefix(), cwd="/",
                           env={"XDG_RUNTIME_DIR": ""})  # the session's runtime directory is root's: nobody uses its own
    line = assert_one_error_line(result, f"127.0.0.1:{port}")
    assert "permission denied" in line.lower()
    assert leftovers(marker, timeout=0.5) == []


# -- command line, pidfile, loops, log format ------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_help_documents_every_option(run_supervise: Callable[..., Any]) -> None:
    result = run_supervise(["--help"])
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "supervise [OPTIONS] -- COMMAND [ARG...]" in text
    assert re.search(r"-l, --listen\b", text)
    for option in ("--ready", "--ready-timeout", "--watch", "--health-interval", "--health-threshold",
                   "--drain-signal", "--drain-timeout", "--name", "--control", "--pidfile", "--max-restarts",
                   "--log-format", "--log-level", "--loop", "--backlog", "--no-nodelay"):
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), f"{option} missing from --help"


@pytest.mark.timeout(20)
def test_pidfile_is_written_and_removed(supervise: Callable[..., Supervise], tmp_path: Path) -> None:
    pidfile = tmp_path / "run" / "supervise.pid"
    sup = supervise(["-l", f"127.0.0.1:{free_port()}", "--pidfile", str(pidfile), *FAST, "--", *stub()])
    sup.wait_for("serving", where=gen(1))
    assert pidfile.read_text().strip() == str(sup.pid)
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(10) == 0
    assert not pidfile.exists()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_event_loops_run_a_child_to_ready(supervise: Callable[..., Supervise], loop: str) -> None:
    port = free_port()
    sup = supervise(["--loop", loop, "-l", f"127.0.0.1:{port}", *FAST, "--", *stub()])
    ready = sup.wait_for("ready", where=gen(1))
    assert ready["probe"].startswith("HTTP 200")
    assert http_get(port, "/")[0] == 200
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(10) == 0


@pytest.mark.timeout(20)
def test_text_log_format_is_for_people(supervise: Callable[..., Supervise]) -> None:
    port = free_port()
    sup = supervise(["--log-format", "text", "-l", f"127.0.0.1:{port}", *FAST, "--", *stub()])  # last one wins
    sup.wait_line(lambda line: "gen 1" in line and "serving" in line, timeout=10)
    sup.signal(signal.SIGTERM)
    assert sup.wait_exit(10) == 0
    sup.wait_line(lambda line: line.endswith("stopped"), timeout=5)  # the last line, read by the harness thread
    mine = [line for line in sup.lines if not line.startswith("stub:")]
    assert mine and not sup.events, "text format printed JSON events"
    assert any("gen 1" in line and "pid" in line for line in mine), "\n".join(mine)
    for line in mine:
        assert not line.lstrip().startswith("{"), line
