"""The control plane end to end: a real supervisor with `--control`, driven by `supervise ctl` subprocesses.

Releases are scripts that exec the stub server with some flags (as in test_upgrade.py); deploying is
rewriting the script, and `ctl upgrade` replaces SIGHUP. Raw HTTP over the unix socket checks what the API
answers to requests the ctl client would never send.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from as_nobody import NobodyPython
from harness import Supervise, free_port, http_get, supervise_command, write_release

CTL = [*supervise_command(), "ctl"]
BAD_RELEASES = {
    "crash": (["--exit-at-start", "3"], "exited with status 3 during readiness"),
    "hang": (["--start-delay", "60"], "not ready after 3s"),
    "sick": (["--sick-after", "0.3"], "unhealthy in watch window"),
}
# Readiness and health settings under which each BAD_RELEASES entry fails fast and for its own reason.
STRICT = ("--ready", "http/readyz", "--ready-timeout", "3s", "--watch", "2s", "--health-interval", "200ms")


@dataclass
class Service:
    """A supervisor under test: its control socket, port and release script."""

    supervise: Supervise
    control: Path
    port: int
    script: Path

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return run_ctl("--control", str(self.control), *args, timeout=timeout)

    def status(self) -> dict:
        result = self.ctl("status", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def tag(self) -> str:
        """The tag of the release answering on the port (fresh connection)."""
        code, body = http_get(self.port, "/")
        assert code == 200, body
        return body.split()[1]


def run_ctl(*args: str, timeout: float = 60.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTL, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def serving_gen(status: dict) -> int:
    """The number of the generation in state `serving` (exactly one)."""
    serving = [generation["number"] for generation in status["generations"] if generation["state"] == "serving"]
    assert len(serving) == 1, status["generations"]
    return serving[0]


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """The user-facing failure shape: exit `code`, one `supervise ctl: error:` line, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("supervise ctl: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Start supervisors with a control socket; every one is stopped after the test."""
    started: list[Supervise] = []

    def start(*options: str, flags: tuple[str, ...] = ("--tag", "v1"), control: Path | None = None,
              command: str | None = None, port: int | None = None) -> Service:
        script = write_release(tmp_path / "app", *flags)
        control = control or tmp_path / "ctl.sock"
        port = port or free_port()
        supervise = Supervise(["-l", f"127.0.0.1:{port}", "--control", str(control), "--drain-timeout", "5s",
                               *options, "--", command or str(script)]).start()
        started.append(supervise)
        supervise.wait_for("serving")
        deadline = time.monotonic() + 10
        while not control.exists():
            assert time.monotonic() < deadline, "no control socket after serving"
            time.sleep(0.02)
        return Service(supervise, control, port, script)

    yield start
    for supervise in started:
        supervise.stop()


@dataclass
class Follower:
    """A background `ctl events` whose stdout lines are collected as they arrive."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    @classmethod
    def start(cls, control: Path, *args: str) -> Follower:
        process = subprocess.Popen([*CTL, "--control", str(control), "events", *args], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        follower = cls(process)
        threading.Thread(target=follower._read, daemon=True).start()
        return follower

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(predicate(line) for line in self.lines):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.process.poll() is not None:
                    return False
                self._changed.wait(min(remaining, 0.1))
        return True

    def stop(self, signum: int) -> tuple[int, str]:
        """Signal the process by pid; its exit code and stderr."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        code = self.process.wait(10)
        assert self.process.stderr is not None
        return code, self.process.stderr.read()


# -- raw HTTP on the control socket -------------------------------------------------------------------------


@dataclass(frozen=True)
class RawAnswer:
    status: int
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def raw_exchange(path: Path, head: bytes, body: bytes = b"", timeout: float = 10.0) -> RawAnswer:
    """Send `head` and `body` as they are (the body from a thread: the server may answer before reading it)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(head)

        def send_body() -> None:
            with contextlib.suppress(OSError):  # the server may answer and close before reading it all
                sock.sendall(body)

        sender = threading.Thread(target=send_body, daemon=True)
        sender.start()
        received = bytearray()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        sender.join(timeout)
    head_part, _, payload = bytes(received).partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1."), received[:200]
    return RawAnswer(int(head_part.split(b" ", 2)[1]), payload)


def raw_request(path: Path, method: str, target: str, body: bytes = b"") -> RawAnswer:
    head = (f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return raw_exchange(path, head, body)


# -- status ---------------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_status_json_shows_generations_pids_and_listeners(services: Callable[..., Service]) -> None:
    service = services()
    status = service.status()
    assert status["supervisor"]["pid"] == service.supervise.pid
    assert serving_gen(status) == 1
    generation = status["generations"][0]
    spawned = service.supervise.wait_for("spawned")
    assert spawned["pids"][0] in generation["pids"]
    addresses = [listener["address"] for listener in status["listeners"]]
    assert any(str(service.port) in address for address in addresses), addresses


@pytest.mark.timeout(30)
def test_status_table_shows_the_serving_generation(services: Callable[..., Service]) -> None:
    service = services()
    result = service.ctl("status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("GEN"))
    for column in ("STATE", "PIDS", "AGE", "RSS", "CPU%", "READY", "STATUS"):
        assert column in header, header
    pid = service.supervise.wait_for("spawned")["pids"][0]
    row = lines[lines.index(header) + 1].split()
    assert row[:2] == ["1", "serving"] and str(pid) in row[2], row
    assert str(service.supervise.pid) in result.stdout and str(service.port) in result.stdout


# -- upgrade --------------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_upgrade_of_a_good_release_streams_progress_and_exits_0(services: Callable[..., Service]) -> None:
    service = services("--watch", "300ms", "--health-interval", "100ms")
    write_release(service.script.parent, "--tag", "v2")
    result = service.ctl("upgrade")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "promoted generation 2" in result.stdout.splitlines()[-1], result.stdout
    progress = [line for line in result.stdout.splitlines() if " gen 2 " in line]
    assert progress and all(line[2] == ":" and line[5] == ":" for line in progress), result.stdout
    service.supervise.wait_for("retired", where=lambda event: event["gen"] == 1)
    assert service.tag() == "v2"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", list(BAD_RELEASES))
def test_upgrade_of_a_bad_release_exits_1_with_the_reason(kind: str, services: Callable[..., Service]) -> None:
    flags, reason = BAD_RELEASES[kind]
    service = services(*STRICT)
    write_release(service.script.parent, "--tag", "bad", *flags)
    result = service.ctl("upgrade")
    assert result.returncode == 1, (result.stdout, result.stderr)
    verdict = result.stdout.splitlines()[-1]
    assert verdict.startswith("rolled back: ") and reason in verdict, result.stdout
    assert service.tag() == "v1"
    assert serving_gen(service.status()) == 1


@pytest.mark.timeout(60)
def test_upgrade_no_wait_returns_before_the_verdict(services: Callable[..., Service]) -> None:
    service = services("--watch", "0")
    write_release(service.script.parent, "--tag", "v2", "--start-delay", "3")
    mark = service.supervise.mark()
    began = time.monotonic()
    result = service.ctl("upgrade", "--no-wait")
    took = time.monotonic() - began
    assert result.returncode == 0, result.stderr
    assert "accepted" in result.stdout and took < 2.5, (result.stdout, took)
    assert not service.supervise.of_kind("promoted")
    service.supervise.wait_for("promoted", after=mark, timeout=20)


@pytest.mark.timeout(60)
def test_dry_run_prints_the_plan_and_changes_nothing(services: Callable[..., Service]) -> None:
    service = services()
    write_release(service.script.parent, "--tag", "v2")
    mark = service.supervise.mark()
    result = service.ctl("upgrade", "--dry-run")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert str(service.script) in result.stdout and "1. " in result.stdout and "2. " in result.stdout, result.stdout
    time.sleep(1.0)
    assert not [event for event in service.supervise.events[mark:] if event["event"] in ("spawned", "upgrade-requested")]
    assert serving_gen(service.status()) == 1
    assert service.tag() == "v1"


# -- rollback, stop, signal ---------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_rollback_drops_a_watched_generation_or_redeploys_the_previous_release(
        tmp_path: Path, services: Callable[..., Service]) -> None:
    releases, current = tmp_path / "releases", tmp_path / "current"
    write_release(releases / "v1", "--tag", "v1")
    write_release(releases / "v2", "--tag", "v2")
    current.symlink_to(releases / "v1")
    service = services("--chdir", str(current), "--watch", "3s", "--health-interval", "200ms", command="./run")
    nothing = service.ctl("rollback")
    assert nothing.returncode == 1 and "nothing to roll back to" in nothing.stderr, (nothing.stdout, nothing.stderr)

    current.unlink()
    current.symlink_to(releases / "v2")
    mark = service.supervise.mark()
    assert service.ctl("upgrade", "--no-wait").returncode == 0
    service.supervise.wait_for("watching", after=mark)
    dropped = service.ctl("rollback")
    assert dropped.returncode == 0, (dropped.stdout, dropped.stderr)
    assert dropped.stdout.splitlines()[-1].startswith("rolled back: "), dropped.stdout
    assert serving_gen(service.status()) == 1

    upgraded = service.ctl("upgrade")
    assert upgraded.returncode == 0, (upgraded.stdout, upgraded.stderr)
    service.supervise.wait_for("retired", where=lambda event: event["gen"] == 1)
    assert service.tag() == "v2"
    restored = service.ctl("rollback")
    assert restored.returncode == 0, (restored.stdout, restored.stderr)
    assert "promoted generation 4" in restored.stdout, restored.stdout
    service.supervise.wait_for("retired", where=lambda event: event["gen"] == 3)
    assert service.tag() == "v1", "rollback re-deploys the previous generation's resolved working directory"


@pytest.mark.timeout(30)
def test_signal_is_forwarded_and_a_bad_signal_is_one_line(services: Callable[..., Service]) -> None:
    service = services()
    for spelling in ("WINCH", "SIGWINCH", "28"):
        result = service.ctl("signal", spelling)
        assert result.returncode == 0, result.stderr
        assert "SIGWINCH" in result.stdout and "generation 1" in result.stdout, result.stdout
    assert len(service.supervise.of_kind("signal-forwarded")) == 3
    assert_one_line_error(service.ctl("signal", "NOSUCHSIG"), 1, "NOSUCHSIG")


@pytest.mark.timeout(30)
def test_stop_drains_and_the_supervisor_exits(services: Callable[..., Service]) -> None:
    service = services()
    result = service.ctl("stop")
    assert result.returncode == 0 and result.stdout.strip() == "stopping", (result.stdout, result.stderr)
    assert service.supervise.wait_exit(15) == 0
    assert_one_line_error(service.ctl("status"), 3, "cannot reach supervisor")


# -- events and metrics ---------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_events_stream_shows_every_phase_of_an_upgrade(services: Callable[..., Service]) -> None:
    service = services("--watch", "300ms", "--health-interval", "100ms")
    raw, readable = Follower.start(service.control, "--json"), Follower.start(service.control)
    try:
        deadline = time.monotonic() + 15
        def forwarded(line: str) -> bool:
            return "SIGWINCH" in line

        while not (raw.wait_for(forwarded, 0.3) and readable.wait_for(forwarded, 0.3)):
            assert time.monotonic() < deadline, "the event streams never showed a forwarded signal"
            service.ctl("signal", "WINCH")
        write_release(service.script.parent, "--tag", "v2")
        assert service.ctl("upgrade").returncode == 0
        assert raw.wait_for(lambda line: '"retired"' in line, 15), raw.lines
        assert readable.wait_for(lambda line: "gen 1" in line and "gone" in line, 15), readable.lines
    finally:
        raw_code, _ = raw.stop(signal.SIGTERM)
        readable_code, readable_errors = readable.stop(signal.SIGINT)  # as Ctrl-C
    kinds = [json.loads(line)["event"] for line in raw.lines]
    phases = ["upgrade-requested", "spawned", "ready", "watching", "promoted", "draining", "retired"]
    found = [kind for kind in kinds if kind in phases]
    assert [kind for index, kind in enumerate(found) if kind not in found[:index]] == phases, kinds
    assert readable_code == 0 and readable_errors.strip() == "", (readable_code, readable_errors)
    assert any(line[8:15] == " gen 2 " for line in readable.lines), readable.lines
    assert raw_code != 0  # killed by SIGTERM, not finished on its own


@pytest.mark.timeout(30)
def test_metrics_parse_as_prometheus_text(services: Callable[..., Service]) -> None:
    service = services()
    result = service.ctl("metrics")
    assert result.returncode == 0, result.stderr
    families = {family.name: family for family in text_string_to_metric_families(result.stdout)}
    generation = families["supervise_generation"]
    assert [sample.value for sample in generation.samples] == [1.0]
    assert any(name.startswith("supervise_upgrade") for name in families), sorted(families)


# -- access control and robustness ----------------------------------------------------------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's tmp_path is private to root)."""
    directory = Path(tempfile.mkdtemp(prefix="supervise-ctl-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


NOBODY_GET_STATUS = """
import socket, sys
sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
sock.sendall(b"GET /status HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
print(sock.recv(100).split(b"\\r\\n")[0].decode())
"""


@pytest.fixture
def nobody(open_dir: Path) -> NobodyPython:
    """The client code, copied where user nobody can read it, and an interpreter nobody can run."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv(1) to run a client as nobody")
    prepared = NobodyPython.prepare(open_dir)
    if prepared is None:
        pytest.skip("no Python interpreter that user nobody can execute")
    return prepared


def nobody_ctl(nobody: NobodyPython, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nobody.command("-m", "supervisor", "ctl", *args), capture_output=True, text=True,
                          **nobody.options())


@pytest.mark.timeout(60)
def test_a_client_of_another_uid_is_refused(open_dir: Path, nobody: NobodyPython,
                                            services: Callable[..., Service]) -> None:
    service = services(control=open_dir / "ctl.sock")
    assert (service.control.stat().st_mode & 0o777) == 0o600
    result = nobody_ctl(nobody, "--control", str(service.control), "status")
    assert result.returncode in (1, 3) and "permission denied" in result.stderr.lower(), (result.returncode, result.stderr)
    assert_one_line_error(result, result.returncode)

    service.control.chmod(0o666)  # now only the server's SO_PEERCRED check stands in the way
    mark = service.supervise.mark()
    raw = subprocess.run(nobody.command("-c", NOBODY_GET_STATUS, str(service.control)), capture_output=True,
                         text=True, **nobody.options())
    assert raw.stdout.split()[1:2] == ["403"], (raw.stdout, raw.stderr)
    refused = nobody_ctl(nobody, "--control", str(service.control), "status")
    assert_one_line_error(refused, 1, "permission denied")
    assert any("65534" in json.dumps(event) for event in service.supervise.events[mark:]), "no log line for the refusal"
    assert service.ctl("status").returncode == 0


@pytest.mark.timeout(60)
def test_malformed_requests_get_4xx_and_supervision_goes_on(services: Callable[..., Service]) -> None:
    service = services()
    mark = service.supervise.mark()
    garbage = raw_exchange(service.control, b"\x00\x01\x02 garbage \xff\xfe\r\n\r\n")
    assert 400 <= garbage.status < 500, garbage
    answers = {
        "unknown path": (raw_request(service.control, "GET", "/no/such/path"), 404),
        "wrong method": (raw_request(service.control, "GET", "/upgrade"), 405),
        "unknown signal": (raw_request(service.control, "POST", "/signal/NOSUCHSIG"), 400),
        "bad events level": (raw_request(service.control, "GET", "/events?level=loud"), 400),
        "10 MB body": (raw_request(service.control, "POST", "/upgrade?dry_run=1", b"x" * (10 << 20)), 413),
    }
    for case, (answer, expected) in answers.items():
        assert answer.status == expected, (case, answer)
        assert answer.json().get("error"), (case, answer)
    assert not [event for event in service.supervise.events[mark:] if event["event"] in ("spawned", "stopping")]
    assert serving_gen(service.status()) == 1
    assert service.tag() == "v1"
    assert service.supervise.process.poll() is None


# -- history ----------------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_known_bad_release_is_refused_unless_forced(services: Callable[..., Service]) -> None:
    service = services(*STRICT)
    write_release(service.script.parent, "--tag", "bad", "--exit-at-start", "3")
    first = service.ctl("upgrade")
    assert first.returncode == 1 and "rolled back" in first.stdout, (first.stdout, first.stderr)

    mark = service.supervise.mark()
    again = service.ctl("upgrade")
    assert again.returncode == 1 and "known bad" in again.stdout + again.stderr, (again.stdout, again.stderr)
    plan = service.ctl("upgrade", "--dry-run")
    assert plan.returncode == 1 and "known bad" in plan.stdout.lower(), (plan.stdout, plan.stderr)
    assert not [event for event in service.supervise.events[mark:] if event["event"] == "spawned"]

    forced = service.ctl("upgrade", "--force")
    assert forced.returncode == 1 and forced.stdout.splitlines()[-1].startswith("rolled back: "), forced.stdout
    assert service.supervise.wait_for("spawned", after=mark)["gen"] == 3

    write_release(service.script.parent, "--tag", "fixed")
    fixed = service.ctl("upgrade")
    assert fixed.returncode == 0, (fixed.stdout, fixed.stderr)


@pytest.mark.timeout(90)
def test_history_and_known_releases_survive_a_restart(tmp_path: Path, services: Callable[..., Service]) -> None:
    state, version = tmp_path / "state", tmp_path / "VERSION"
    # A redeploy rewrites the script (new mtime and inode): only a version file says it is the same release again.
    options = ("--state-dir", str(state), "--version-file", str(version), *STRICT)
    version.write_text("1\n")
    first = services(*options)
    write_release(first.script.parent, "--tag", "v2")
    version.write_text("2\n")
    assert first.ctl("upgrade").returncode == 0
    write_release(first.script.parent, "--tag", "bad", "--exit-at-start", "3")
    version.write_text("bad\n")
    assert first.ctl("upgrade").returncode == 1
    before = first.status()
    assert before["last_known_bad"]["version"] == "bad" and before["last_known_good"]["version"] == "2"
    assert first.ctl("stop").returncode == 0
    assert first.supervise.wait_exit(15) == 0

    version.write_text("2\n")
    # The same service again: same command, same port, so the same default name and state file.
    second = services(*options, flags=("--tag", "v2"), control=tmp_path / "ctl2.sock", port=first.port)
    status = second.status()
    results = [record["result"] for record in status["history"]]
    assert results[-2:] == ["promoted", "rolled-back"], status["history"]
    assert status["history"] == before["history"]
    assert status["last_known_good"] == before["last_known_good"] is not None
    assert status["last_known_bad"] == before["last_known_bad"] is not None
    write_release(first.script.parent, "--tag", "bad", "--exit-at-start", "3")
    version.write_text("bad\n")
    refused = second.ctl("upgrade")
    assert refused.returncode == 1 and "known bad" in refused.stdout + refused.stderr, (refused.stdout, refused.stderr)


# -- finding the supervisor -------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_no_socket_or_a_dead_one_is_exit_3_with_one_line(tmp_path: Path) -> None:
    missing = run_ctl("--control", str(tmp_path / "nope.sock"), "status")
    assert_one_line_error(missing, 3, str(tmp_path / "nope.sock"), "no such socket")

    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(dead))  # a socket file nobody listens on: what a killed supervisor leaves behind
    assert_one_line_error(run_ctl("--control", str(dead), "upgrade"), 3, "connection refused")

    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    assert_one_line_error(run_ctl("status", env=env), 3, "no supervisor found in", "pass --name or --control")
    runtime = tmp_path / "supervise"
    runtime.mkdir()
    for name in ("a", "b"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(runtime / f"{name}.sock"))
    assert_one_line_error(run_ctl("status", env=env), 2, "several supervisors", "(a, b)", "pass --name")
    assert_one_line_error(run_ctl("--name", "a", "status", env=env), 3, str(runtime / "a.sock"), "connection refused")


@pytest.mark.timeout(30)
def test_name_finds_the_socket_in_the_runtime_dir(tmp_path: Path, services: Callable[..., Service]) -> None:
    runtime = tmp_path / "supervise"
    service = services("--name", "web", control=runtime / "web.sock")
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    for args in (("--name", "web"), ()):
        result = run_ctl(*args, "status", "--json", env=env)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["supervisor"]["pid"] == service.supervise.pid
