"""The test servers, the demo app and the load generator, checked on their own (no supervisor).

Each test binds the listening socket itself and hands it to the server as fd 3 the way the supervisor
will (LISTEN_FDS, LISTEN_PID set to the server's own pid), so these tests pin down the child's side of
the contract: a server drained while another one keeps accepting on the same socket loses no request.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from supervisor.testing.loadgen import LoadGenerator, LoadStats

ROOT = Path(__file__).resolve().parent.parent
STUB = ROOT / "tests" / "servers" / "stub.py"
APP = ROOT / "examples" / "app.py"
SERVERS = {"stub": [sys.executable, str(STUB)], "app": [sys.executable, str(APP)]}
# The shim exports its own pid as LISTEN_PID and execs the server, which keeps that pid.
LISTEN_PID_SHIM = ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh"]
SPARE_FD_FLOOR = 10  # dup2 sources live above fds 3..: dup2(fd, fd) would keep close-on-exec


@dataclass
class ServerProcess:
    """A server started by a test: its pid and the file its stdout/stderr go to."""

    pid: int
    log_path: Path
    returncode: int | None = None

    def poll(self) -> int | None:
        """The exit code once the process has exited (reaping it), else None."""
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        """The exit code; fails the test if the process is still running after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                pytest.fail(f"pid {self.pid} still running after {timeout}s; log:\n{self.log()}")
            time.sleep(0.01)
        return code

    def send(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL and reap, if still running."""
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Launcher:
    """Starts servers on sockets the test owns, and kills whatever is left when the test ends."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.processes: list[ServerProcess] = []

    def spawn(self, argv: list[str], sockets: list[socket.socket], *, names: list[str] | None = None,
              generation: int = 1, env: dict[str, str] | None = None, shim: bool = True) -> ServerProcess:
        """Start `argv` with `sockets` at fds 3, 4, ... (posix_spawn dup2), in its own session."""
        child_env = {k: v for k, v in os.environ.items()
                     if not k.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        child_env.update(LISTEN_FDS=str(len(sockets)), SUPERVISE_GENERATION=str(generation),
                         LISTEN_FDNAMES=":".join(names or [f"listen{i}" for i in range(len(sockets))]))
        child_env.update(env or {})
        log_path = self.tmp_path / f"server-{len(self.processes)}.log"
        sources = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, SPARE_FD_FLOOR) for s in sockets]
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 2, str(log_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
                   (os.POSIX_SPAWN_DUP2, 2, 1)]
        actions += [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(sources)]
        full_argv = LISTEN_PID_SHIM + argv if shim else argv
        try:
            pid = os.posix_spawn(full_argv[0], full_argv, child_env, file_actions=actions, setsid=True)
        finally:
            for fd in sources:
                os.close(fd)
        process = ServerProcess(pid, log_path)
        self.processes.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.processes:
            process.kill()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.kill_all()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """The shared listening socket, held by the test for its whole duration (as the supervisor does)."""
    with socket.create_server(("127.0.0.1", 0), backlog=1024) as sock:
        yield sock


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, str]:
    """One GET on a new connection: status and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def get_json(port: int, path: str = "/env") -> dict[str, Any]:
    """A JSON answer (by default the server's /env report)."""
    status, body = get(port, path)
    assert status == 200, body
    document: dict[str, Any] = json.loads(body)
    return document


def wait_serving(port: int, pids: set[int], timeout: float = 10.0) -> None:
    """Wait until each of `pids` has answered at least one request on the shared port."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while not pids <= seen:
        assert time.monotonic() < deadline, f"only {seen} of {pids} answered"
        seen.add(get_json(port)["pid"])


def run_load(generator: LoadGenerator, seconds: float) -> None:
    generator.start()
    time.sleep(seconds)


def assert_no_failures(stats: LoadStats) -> None:
    summary = stats.summary()
    assert stats.failures == 0, summary
    assert stats.requests > 100, summary


# --- the contract with the child -------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["stub", "app"])
def test_server_sees_the_contract(kind: str, launcher: Launcher, listener: socket.socket) -> None:
    server = launcher.spawn(SERVERS[kind], [listener], names=["web"], generation=7)
    env = get_json(port_of(listener))
    assert env["pid"] == server.pid
    assert env["listen_pid"] == server.pid
    assert env["listen_fds"] == 1
    assert env["listen_fdnames"] == ["web"]
    assert env["generation"] == 7
    assert env["argv"][0].endswith(f"{kind}.py")
    status, body = get(port_of(listener), "/")
    expected = f"ok stub gen=7 pid={server.pid}\n" if kind == "stub" else f"hello from generation 7 pid {server.pid}\n"
    assert (status, body) == (200, expected)
    assert get(port_of(listener), "/readyz")[0] == 200
    server.send(signal.SIGTERM)
    assert server.wait(10) == 0


@pytest.mark.timeout(60)
def test_stub_logs_start_and_drain(launcher: Launcher, listener: socket.socket) -> None:
    server = launcher.spawn(SERVERS["stub"] + ["--tag", "v2"], [listener], generation=3)
    get(port_of(listener), "/")
    server.send(signal.SIGTERM)
    assert server.wait(10) == 0
    log = server.log()
    assert f"stub: pid {server.pid} gen 3 tag v2 listening on fd 3" in log
    assert "stopped accepting" in log and "drained" in log


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["stub", "app"])
def test_socket_name_picks_the_fd(kind: str, launcher: Launcher, listener: socket.socket) -> None:
    with socket.create_server(("127.0.0.1", 0)) as other:
        server = launcher.spawn(SERVERS[kind] + ["--socket-name", "admin"], [other, listener], names=["web", "admin"])
        assert get_json(port_of(listener))["pid"] == server.pid


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["stub", "app"])
def test_foreign_listen_pid_is_ignored(kind: str, launcher: Launcher, listener: socket.socket) -> None:
    """LISTEN_* meant for another process (LISTEN_PID != own pid) are ignored: it binds --port itself."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = port_of(probe)  # free it for the server; a race with other processes is unlikely
    server = launcher.spawn(SERVERS[kind] + ["--port", str(port)], [listener], env={"LISTEN_PID": "1"}, shim=False)
    deadline = time.monotonic() + 10
    while True:
        try:
            assert get_json(port)["pid"] == server.pid
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline and server.poll() is None, server.log()
            time.sleep(0.02)


# --- draining ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["stub", "app"])
def test_drain_under_load_loses_nothing(kind: str, launcher: Launcher, listener: socket.socket) -> None:
    """Generations take turns on one shared socket; each SIGTERMed one drains without a failed request."""
    port = port_of(listener)
    old = launcher.spawn(SERVERS[kind], [listener], generation=1)
    generator = LoadGenerator("127.0.0.1", port, concurrency=8)
    run_load(generator, 0.5)
    try:
        for generation in (2, 3, 4):
            new = launcher.spawn(SERVERS[kind], [listener], generation=generation)
            wait_serving(port, {old.pid, new.pid})
            time.sleep(0.3)
            old.send(signal.SIGTERM)
            assert old.wait(10) == 0, old.log()
            time.sleep(0.3)
            old = new
    finally:
        stats = generator.stop()
    assert_no_failures(stats)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["stub", "app"])
def test_keepalive_drain_fails_only_with_keepalive_resets(kind: str, launcher: Launcher,
                                                         listener: socket.socket) -> None:
    """With keep-alive load the only tolerated errors are the idle-close race, reported on their own."""
    port = port_of(listener)
    old = launcher.spawn(SERVERS[kind], [listener], generation=1)
    new = launcher.spawn(SERVERS[kind], [listener], generation=2)
    wait_serving(port, {old.pid, new.pid})
    generator = LoadGenerator("127.0.0.1", port, concurrency=8, keepalive=True)
    run_load(generator, 0.5)
    try:
        old.send(signal.SIGTERM)
        assert old.wait(10) == 0, old.log()
        time.sleep(0.3)
    finally:
        stats = generator.stop()
    assert set(stats.errors) <= {"keepalive-reset"}, stats.summary()
    assert stats.requests > 100


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["stub", "app"])
def test_drain_finishes_in_flight_request(kind: str, launcher: Launcher, listener: socket.socket) -> None:
    server = launcher.spawn(SERVERS[kind], [listener])
    port = port_of(listener)
    get(port, "/")  # serving
    result: list[tuple[int, str]] = []
    slow = threading.Thread(target=lambda: result.append(get(port, "/slow?t=1.5")))
    slow.start()
    time.sleep(0.5)  # the request is in the handler now
    server.send(signal.SIGTERM)
    time.sleep(0.3)
    assert server.poll() is None, "exited with a request in flight"
    slow.join(10)
    assert result == [(200, "slept 1.5\n")]
    assert server.wait(10) == 0, server.log()


@pytest.mark.timeout(60)
def test_app_tells_keepalive_clients_to_leave_while_draining(launcher: Launcher, listener: socket.socket) -> None:
    """During the drain an open keep-alive connection still gets answers: /readyz 503, Connection: close."""
    server = launcher.spawn(SERVERS["app"], [listener])
    port = port_of(listener)
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    kept.request("GET", "/")
    kept.getresponse().read()
    slow = threading.Thread(target=get, args=(port, "/slow?t=1"))  # keeps the drain going
    slow.start()
    time.sleep(0.3)
    server.send(signal.SIGTERM)
    time.sleep(0.2)
    kept.request("GET", "/readyz")
    response = kept.getresponse()
    assert (response.status, response.getheader("Connection")) == (503, "close")
    kept.close()
    slow.join(10)
    assert server.wait(10) == 0


@pytest.mark.timeout(60)
def test_stub_drain_delay_keeps_serving_but_not_ready(launcher: Launcher, listener: socket.socket) -> None:
    server = launcher.spawn(SERVERS["stub"] + ["--drain-delay", "1"], [listener])
    port = port_of(listener)
    get(port, "/")
    server.send(signal.SIGTERM)
    time.sleep(0.2)
    assert get(port, "/readyz")[0] == 503
    assert get(port, "/")[0] == 200
    assert server.wait(10) == 0


# --- the stub's bad releases ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_stub_exit_at_start_and_crash_after(launcher: Launcher, listener: socket.socket) -> None:
    assert launcher.spawn(SERVERS["stub"] + ["--exit-at-start", "7"], [listener]).wait(10) == 7
    crashing = launcher.spawn(SERVERS["stub"] + ["--crash-after", "0.3"], [listener])
    assert get(port_of(listener), "/")[0] == 200
    assert crashing.wait(10) == 3


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("flags", "statuses"), [
    (["--never-ready"], [503]),
    (["--no-readyz"], [404]),
    (["--sick-after", "0.5"], [200, 503]),
])
def test_stub_readiness_flags(flags: list[str], statuses: list[int], launcher: Launcher,
                              listener: socket.socket) -> None:
    launcher.spawn(SERVERS["stub"] + flags, [listener])
    port = port_of(listener)
    assert get(port, "/")[0] == 200
    assert get(port, "/readyz")[0] == statuses[0]
    if len(statuses) > 1:
        time.sleep(0.6)
        assert get(port, "/readyz")[0] == statuses[1]


@pytest.mark.timeout(60)
def test_stub_ignore_term(launcher: Launcher, listener: socket.socket) -> None:
    server = launcher.spawn(SERVERS["stub"] + ["--ignore-term"], [listener])
    get(port_of(listener), "/")
    server.send(signal.SIGTERM)
    time.sleep(0.3)
    assert server.poll() is None
    assert get(port_of(listener), "/readyz")[0] == 200


@pytest.mark.timeout(60)
def test_stub_start_delay(launcher: Launcher, listener: socket.socket) -> None:
    started = time.monotonic()
    launcher.spawn(SERVERS["stub"] + ["--start-delay", "0.5"], [listener])
    assert get(port_of(listener), "/")[0] == 200
    assert time.monotonic() - started >= 0.5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("abstract", [False, True])
@pytest.mark.parametrize("kind", ["stub", "app"])
def test_ready_notification(kind: str, abstract: bool, launcher: Launcher, listener: socket.socket,
                            tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        if abstract:
            notify.bind(f"\0supervise-test-{os.getpid()}-{kind}")
            address = "@" + notify.getsockname()[1:].decode()
        else:
            address = str(tmp_path / "notify.sock")
            notify.bind(address)
        notify.settimeout(10)
        flags = ["--notify-delay", "0.2"] if kind == "stub" else []
        launcher.spawn(SERVERS[kind] + flags, [listener], env={"NOTIFY_SOCKET": address})
        started = time.monotonic()
        assert notify.recv(4096) == b"READY=1"
        assert get_json(port_of(listener))["notify_socket"] == address
        if kind == "stub":
            assert time.monotonic() - started >= 0.2


@pytest.mark.timeout(60)
def test_stub_grandchildren(launcher: Launcher, listener: socket.socket) -> None:
    launcher.spawn(SERVERS["stub"] + ["--grandchildren", "2"], [listener])
    grandchildren = get_json(port_of(listener))["grandchildren"]
    try:
        assert len(grandchildren) == 2
        sessions = {os.getsid(pid) for pid in grandchildren}
        assert len(sessions) == 2  # one stayed in the stub's session, one called setsid()
    finally:
        for pid in grandchildren:
            os.kill(pid, signal.SIGKILL)  # not our children: the stub (or init) reaps them


# --- the load generator ---------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("keepalive", [False, True])
def test_loadgen_against_stub(keepalive: bool, launcher: Launcher, listener: socket.socket) -> None:
    launcher.spawn(SERVERS["stub"], [listener])
    generator = LoadGenerator("127.0.0.1", port_of(listener), concurrency=8, keepalive=keepalive)
    run_load(generator, 1.0)
    stats = generator.stop()
    assert_no_failures(stats)
    summary = stats.summary()
    assert summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert len(stats.samples) == stats.requests == len(stats.latencies)


@pytest.mark.timeout(60)
def test_loadgen_max_requests_and_unix_socket(launcher: Launcher, tmp_path: Path) -> None:
    path = str(tmp_path / "web.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix_listener:
        unix_listener.bind(path)
        unix_listener.listen(128)
        launcher.spawn(SERVERS["stub"], [unix_listener])
        generator = LoadGenerator("127.0.0.1", 80, concurrency=4, max_requests=500, unix_path=path)
        generator.start()
        assert generator.wait(30)
        stats = generator.stop()
    assert (stats.requests, stats.failures) == (500, 0), stats.summary()


@pytest.mark.timeout(60)
def test_loadgen_counts_refused_and_http_errors(launcher: Launcher, listener: socket.socket) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        closed_port = port_of(probe)
    refused = LoadGenerator("127.0.0.1", closed_port, concurrency=2, max_requests=20)
    refused.start()
    assert refused.wait(30)
    assert refused.stop().errors == {"refused": 20}

    launcher.spawn(SERVERS["stub"] + ["--never-ready"], [listener])
    unready = LoadGenerator("127.0.0.1", port_of(listener), path="/readyz", concurrency=2, max_requests=20)
    unready.start()
    assert unready.wait(30)
    assert unready.stop().errors == {"http-503": 20}


def answer_once_then_drop(sock: socket.socket, connections: int) -> None:
    """A server that answers the first request of a connection keep-alive, then closes on the next one."""
    for _ in range(connections):
        conn, _ = sock.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            conn.recv(65536)


@pytest.mark.timeout(60)
def test_loadgen_reports_keepalive_resets_separately(listener: socket.socket) -> None:
    server = threading.Thread(target=answer_once_then_drop, args=(listener, 5), daemon=True)
    server.start()
    generator = LoadGenerator("127.0.0.1", port_of(listener), concurrency=1, keepalive=True, max_requests=10)
    generator.start()
    assert generator.wait(30)
    stats = generator.stop()
    assert (stats.requests, stats.errors) == (10, {"keepalive-reset": 5}), stats.summary()
    assert [ok for _, _, ok in stats.samples] == [True, False] * 5
    server.join(10)


@pytest.mark.timeout(60)
def test_loadgen_refuses_other_hosts() -> None:
    for host in ("10.0.0.1", "example.com", "localhost"):
        with pytest.raises(ValueError, match="loopback"):
            LoadGenerator(host, 80)
    LoadGenerator("::1", 80)


# --- start-up ---------------------------------------------------------------------------------------------


def time_to_first_response(launcher: Launcher, listener: socket.socket, argv: list[str]) -> float:
    """Seconds from spawn until the first answer: the request waits in the backlog until it accepts."""
    started = time.monotonic()
    server = launcher.spawn(argv, [listener])
    get(port_of(listener), "/")
    elapsed = time.monotonic() - started
    server.send(signal.SIGTERM)
    server.wait(10)
    return elapsed


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("kind", "limit"), [("stub", 0.5), ("app", 3.0)])
def test_startup_time(kind: str, limit: float, launcher: Launcher, listener: socket.socket) -> None:
    """Generous limits (CI machines vary); the measured values are printed for the record."""
    best = min(time_to_first_response(launcher, listener, SERVERS[kind]) for _ in range(3))
    print(f"{kind}: {best * 1000:.0f} ms to first response")
    assert best < limit
