"""Faults in the files and directories a supervisor keeps (issue 11, items 3, 4, 5 and 10), with real processes.

- State that cannot be trusted is set aside, never fatal; `ctl status` shows whatever it is sent.
- Files are written without following a planted symlink; our own half-written temp files are cleaned up.
- Runtime, control and state directories are ours or refused; stale runtime directories are removed without
  following links, and only when their supervisor's lock is free (a pid proves nothing across PID namespaces).
- Lost state is said, not silent: a failing save is logged once, and once when it works again; an upgrade cut
  short by SIGKILL is recorded as interrupted at the next start.
"""

from __future__ import annotations

import fcntl
import http.server
import json
import os
import shutil
import signal
import socket
import socketserver
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from harness import (
    PYTHON,
    STUB,
    Supervise,
    assert_lossless,
    free_port,
    http_get,
    start_load,
    supervise_command,
    wait_port_free,
    write_release,
)
from supervisor.safefile import STALE_AFTER, write_atomically

NAME = "app"
BASIC = ["--name", NAME, "--watch", "0", "--drain-timeout", "2s", "--ready-timeout", "20s"]
PRECIOUS = "precious: must never change\n"
IS_ROOT = os.geteuid() == 0
NOBODY = 65534


@pytest.fixture
def runtime_root() -> Iterator[Path]:
    """A short private XDG_RUNTIME_DIR (pytest's tmp_path is too long for notify socket paths)."""
    directory = Path(tempfile.mkdtemp(prefix="sv-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def supervisors() -> Iterator[list[Supervise]]:
    """Supervisors a test starts; every one is stopped (by pid and process group) at teardown."""
    started: list[Supervise] = []
    yield started
    for supervise in started:
        supervise.stop()


def start(started: list[Supervise], state: Path, *extra: str, port: int | None = None, env: dict[str, str] | None = None,
          wrapper: list[str] | None = None, script: str | None = None) -> Supervise:
    """A supervisor of the stub named NAME keeping its state in `state`; waits until it serves."""
    command = [script] if script else [PYTHON, STUB]
    supervise = Supervise(["-l", f"127.0.0.1:{port or free_port()}", *BASIC, "--state-dir", str(state), *extra, "--",
                           *command], env=env, wrapper=wrapper or []).start()
    started.append(supervise)
    supervise.wait_for("serving")
    return supervise


def control_of(supervise: Supervise) -> str:
    assert supervise.private_dir is not None
    return os.path.join(supervise.private_dir, "control.sock")


def ctl(supervise: Supervise, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*supervise_command(), "ctl", "--control", control_of(supervise), *args], capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


def status(supervise: Supervise) -> dict[str, Any]:
    result = ctl(supervise, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def saved(state: Path, timeout: float = 10.0, where: Any = None) -> dict[str, Any]:
    """The state file once it is valid JSON (and `where` holds for it)."""
    path = state / f"{NAME}.state.json"
    deadline = time.monotonic() + timeout
    while True:
        try:
            data = json.loads(path.read_text())
            if where is None or where(data):
                return data
        except (OSError, ValueError):
            pass
        assert time.monotonic() < deadline, f"no state saved at {path} within {timeout}s"
        time.sleep(0.05)


def run_to_end(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run supervise as an operator would; it is expected to refuse at once."""
    return subprocess.run([*supervise_command(), *args], capture_output=True, text=True, timeout=20, env=env,
                          stdin=subprocess.DEVNULL, start_new_session=True)


def assert_one_line_refusal(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("supervise: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- item 3: state that cannot be trusted is set aside, never fatal ---------------------------------------------

RECORD = {"result": "promoted", "reason": "", "trigger": "SIGHUP", "new_gen": 2, "old_gen": 1, "started_at": 1.0,
          "timings": {"ready": 0.1}}
UNTRUSTED_STATES = {
    "list": b"[]",
    "null": b"null",
    "number": b"42",
    "not-json": b'{"records": [',
    "not-utf8": b"\xff\xfe\x00garbage",
    "deeply-nested": b"[" * 100_000 + b"]" * 100_000,
    "records-not-a-list": json.dumps({"records": 5}).encode(),
    "record-missing-keys": json.dumps({"records": [{"result": "promoted"}]}).encode(),
    "record-wrong-type": json.dumps({"records": [{**RECORD, "new_gen": "2"}]}).encode(),
    "timings-wrong-type": json.dumps({"records": [{**RECORD, "timings": [1, 2]}]}).encode(),
    "known-good-a-list": json.dumps({"records": [], "last_known_good": []}).encode(),
    "known-bad-a-list": json.dumps({"records": [], "last_known_bad": ["x"]}).encode(),
    "known-bad-digest-a-number": json.dumps({"records": [], "last_known_bad": {"digest": 7}}).encode(),
    "marker-wrong-type": json.dumps({"records": [], "in_progress": {"trigger": 1}}).encode(),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content", UNTRUSTED_STATES.values(), ids=UNTRUSTED_STATES.keys())
def test_untrusted_state_is_set_aside_and_supervision_goes_on(tmp_path: Path, supervisors: list[Supervise],
                                                              content: bytes) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / f"{NAME}.state.json").write_bytes(content)
    sup = start(supervisors, state)
    # Right after generation 1 serves, it is remembered as known good: that is where a bad field used to crash.
    saved(state, where=lambda data: data.get("last_known_good"))
    assert sup.upgrade()["event"] == "promoted"
    data = saved(state, where=lambda data: len(data["records"]) == 1)
    assert data["records"][0]["result"] == "promoted"
    assert sup.process.poll() is None
    assert ctl(sup, "status").returncode == 0
    warning = sup.wait_for("state-corrupt")
    assert warning["level"] == "warning" and len(sup.of_kind("state-corrupt")) == 1, "said once"
    aside = [path for path in state.iterdir() if path.name.startswith(f"{NAME}.state.json.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content, "the untrusted file is kept aside, as it was"


class _OddStatus(http.server.BaseHTTPRequestHandler):
    """A control server of another version (or with bad state): every field of an unexpected type."""

    BODY = json.dumps({
        "supervisor": {"pid": "x", "name": ["n"], "uptime": None, "state": 5},
        "listeners": [{"name": 1, "address": None}],
        "generations": [{"number": {}, "pids": 7, "age": "old", "rss": "big", "instances": "many"}, None],
        "rollout": ["not", "an", "object"],
        "history": [{"started_at": [1], "result": 5, "timings": [1], "old_gen": {}, "new_gen": [2]}, 7, None],
        "last_known_good": [1, 2],
        "last_known_bad": {"argv": 5, "digest": {}},
        "state_error": 12,
        "workers": "abc",
    }).encode()

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.BODY)))
        self.end_headers()
        self.wfile.write(self.BODY)

    def log_message(self, *args: Any) -> None:
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, Any]:
        request, _ = super().get_request()
        return request, ("local", 0)  # BaseHTTPRequestHandler wants a (host, port) client address


@pytest.mark.timeout(30)
def test_ctl_status_renders_whatever_the_server_sends(tmp_path: Path) -> None:
    path = tmp_path / "odd.sock"
    server = _UnixHTTPServer(str(path), _OddStatus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = subprocess.run([*supervise_command(), "ctl", "--control", str(path), "status"], capture_output=True,
                                text=True, timeout=20, stdin=subprocess.DEVNULL)
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "cannot be shown" in result.stdout
    assert "supervisor  pid x" in result.stdout, "the parts that can be shown still are"


# -- item 4: files are written without following links ----------------------------------------------------------

PLANT = 'ln -s "$VICTIM_PID" "$PIDDIR/.app.pid.$$" && ln -s "$VICTIM_STATE" "$STATEDIR/.app.state.json.$$" && exec "$@"'


@pytest.mark.timeout(60)
def test_planted_symlinks_are_never_followed(tmp_path: Path, supervisors: list[Supervise]) -> None:
    victims = {name: tmp_path / "etc" / name for name in ("pid", "state", "target")}
    for victim in victims.values():
        victim.parent.mkdir(exist_ok=True)
        victim.write_text(PRECIOUS)
    state, piddir = tmp_path / "state", tmp_path / "run"
    state.mkdir()
    piddir.mkdir(mode=0o755)
    pidfile = piddir / "app.pid"
    # The old predictable temp names (.NAME.PID) of the supervisor about to start: the shell's pid is the pid of
    # the supervisor it execs. And the state file itself is a link to a victim.
    (state / f"{NAME}.state.json").symlink_to(victims["target"])
    env = {**os.environ, "VICTIM_PID": str(victims["pid"]), "VICTIM_STATE": str(victims["state"]),
           "PIDDIR": str(piddir), "STATEDIR": str(state)}
    sup = start(supervisors, state, "--pidfile", str(pidfile), env=env, wrapper=["/bin/sh", "-c", PLANT, "sh"])
    assert sup.upgrade()["event"] == "promoted"
    saved(state, where=lambda data: len(data["records"]) == 1)
    for name, victim in victims.items():
        assert victim.read_text() == PRECIOUS, f"the {name} victim was written through a planted symlink"
    assert (piddir / f".app.pid.{sup.pid}").is_symlink() and (state / f".{NAME}.state.json.{sup.pid}").is_symlink()
    assert sup.wait_for("state-corrupt")["aside"], "a symlink at the state file's name is set aside, not read"
    info = os.lstat(pidfile)
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o644
    assert pidfile.read_text() == f"{sup.pid}\n"
    info = os.lstat(state / f"{NAME}.state.json")
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600


@pytest.mark.timeout(30)
def test_only_our_stale_temp_files_are_cleaned_up(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text(PRECIOUS)
    target = tmp_path / "dir" / "data.json"
    target.parent.mkdir()
    old = time.time() - STALE_AFTER - 60
    stale = target.parent / ".data.json.0123456789abcdef.tmp"  # what a write killed half-way leaves: empty
    stale.touch()
    fresh = target.parent / ".data.json.fedcba9876543210.tmp"  # a write in progress right now, elsewhere
    fresh.touch()
    link = target.parent / ".data.json.00000000000000aa.tmp"
    link.symlink_to(victim)
    other = target.parent / "unrelated.tmp"
    other.touch()
    for path in (stale, other):
        os.utime(path, (old, old))
    os.utime(link, (old, old), follow_symlinks=False)
    write_atomically(target, b"new\n", 0o600)
    assert target.read_bytes() == b"new\n" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not stale.exists(), "our own stale leftover is removed"
    assert fresh.exists() and other.exists() and link.is_symlink(), "nothing else is touched"
    assert victim.read_text() == PRECIOUS
    leftovers = [path.name for path in target.parent.iterdir() if path.name.endswith(".tmp")]
    assert sorted(leftovers) == sorted([fresh.name, link.name, other.name]), "the write itself leaves no temp file"


# -- item 5: runtime, control and state directories are ours or refused -------------------------------------------


def _owned_by_nobody(path: Path) -> None:
    path.mkdir(mode=0o700)
    os.chown(path, NOBODY, NOBODY)


def _writable_by_all(path: Path) -> None:
    path.mkdir()
    path.chmod(0o777)


def _symlink_to_ours(path: Path) -> None:
    elsewhere = path.parent / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    path.symlink_to(elsewhere)


HOSTILE_DIRS = {
    "runtime-owned-by-another-user": (_owned_by_nobody, "runtime", "refusing runtime directory"),
    "runtime-writable-by-others": (_writable_by_all, "runtime", "refusing runtime directory"),
    "runtime-a-symlink": (_symlink_to_ours, "runtime", "refusing runtime directory"),
    "default-control-dir-of-another-user": (_owned_by_nobody, "control", "refusing control socket directory"),
    "state-dir-of-another-user": (_owned_by_nobody, "state", "refusing state directory"),
    "state-dir-writable-by-others": (_writable_by_all, "state", "refusing state directory"),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", HOSTILE_DIRS.values(), ids=HOSTILE_DIRS.keys())
def test_a_directory_that_is_not_ours_is_refused(runtime_root: Path, case: Any) -> None:
    plant, which, message = case
    if plant is _owned_by_nobody and not IS_ROOT:
        pytest.skip("needs root to create a directory owned by another user")
    hostile = runtime_root / "supervise" if which in ("runtime", "control") else runtime_root / "state"
    plant(hostile)
    private = Path(tempfile.mkdtemp(prefix="sv-", dir=runtime_root))
    control = [] if which == "control" else ["--control", str(private / "c.sock")]
    state = str(hostile if which == "state" else private)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_root)}
    result = run_to_end(["-l", f"127.0.0.1:{free_port()}", *BASIC, *control, "--state-dir", state, "--", PYTHON, STUB],
                        env)
    assert_one_line_refusal(result, message, str(hostile))
    assert [path.name for path in hostile.iterdir()] == [], "nothing of ours was put in it"


def _run_dir(parent: Path, name: str, lock: bool) -> Path:
    directory = parent / name
    directory.mkdir(mode=0o700)
    if lock:
        (directory / "lock").touch()
    return directory


@pytest.mark.timeout(60)
def test_stale_runtime_dirs_go_by_their_lock_and_links_are_never_followed(runtime_root: Path,
                                                                         supervisors: list[Supervise]) -> None:
    parent = runtime_root / "supervise"
    parent.mkdir(mode=0o700)
    victim_dir = runtime_root / "victim"
    victim_dir.mkdir()
    (victim_dir / "file").write_text(PRECIOUS)
    (parent / "run-999999999-1").symlink_to(victim_dir)  # pids this high never exist: "stale" by the old rule
    linking = _run_dir(parent, "run-999999998-1", lock=False)
    (linking / "gen1.1.notify").symlink_to(victim_dir / "file")
    held = _run_dir(parent, "run-999999997-1", lock=True)  # alive: a supervisor (in another pid namespace) holds it
    unlocked = _run_dir(parent, "run-999999996-1", lock=True)  # its supervisor died: the kernel freed its lock
    lockless = _run_dir(parent, "run-999999995-1", lock=False)
    holder = os.open(held / "lock", os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        state = runtime_root / "state"
        sup = start(supervisors, state, env={**os.environ, "XDG_RUNTIME_DIR": str(runtime_root)})
        assert held.is_dir() and (held / "lock").exists(), "a directory whose lock is held is alive: kept"
        assert not unlocked.exists() and not lockless.exists() and not linking.exists(), "stale ones are removed"
        assert (parent / "run-999999999-1").is_symlink(), "a symlink is not ours to judge: left alone"
        assert (victim_dir / "file").read_text() == PRECIOUS, "cleanup followed a symlink"
        ours = [path for path in parent.iterdir() if path.name.startswith(f"run-{sup.pid}-")]
        assert len(ours) == 1 and (ours[0] / "lock").exists()
    finally:
        os.close(holder)


def _can_unshare() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    done = subprocess.run([unshare, "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=10)
    return done.returncode == 0


@pytest.mark.timeout(90)
@pytest.mark.skipif(not _can_unshare(), reason="cannot create a PID namespace here (needs root or userns)")
def test_a_supervisor_in_another_pid_namespace_leaves_a_live_runtime_dir_alone(runtime_root: Path,
                                                                                supervisors: list[Supervise]) -> None:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_root)}
    parent = runtime_root / "supervise"
    port = free_port()
    first = start(supervisors, runtime_root / "state1", env=env, port=port)
    load = start_load(port)
    live = [path for path in parent.iterdir() if path.name.startswith(f"run-{first.pid}-")]
    assert len(live) == 1
    # A second supervisor, as PID 1 of a container sharing the directory: the first one's pid means nothing there.
    second = start(supervisors, runtime_root / "state2", env=env,
                   wrapper=[str(shutil.which("unshare")), "--pid", "--fork", "--mount-proc"])
    assert live[0].is_dir() and any(path.name.endswith(".notify") for path in live[0].iterdir()), \
        "the live supervisor's runtime directory was removed"
    verdict = first.upgrade()
    assert verdict["event"] == "promoted", verdict
    assert_lossless(load.stop())
    os.killpg(second.pid, signal.SIGTERM)  # unshare --fork ignores SIGTERM itself: the supervisor in it gets it
    assert second.process.wait(10) == 0


# -- item 10: lost state is said, not silent ----------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_failing_save_is_said_once_and_once_when_it_works_again(tmp_path: Path, supervisors: list[Supervise]) -> None:
    state = tmp_path / "state"
    path = state / f"{NAME}.state.json"
    port = free_port()
    sup = start(supervisors, state, port=port)
    saved(state, where=lambda data: data.get("last_known_good"))
    load = start_load(port)
    path.unlink()
    path.mkdir()  # a rename over a non-empty directory fails, for root too (as a read-only or full disk would)
    (path / "in-the-way").touch()
    for _ in range(2):
        assert sup.upgrade()["event"] == "promoted"
    failures = sup.of_kind("state-save-failed")
    assert len(failures) == 1 and failures[0]["level"] == "warning", "said once, not once per save"
    assert str(path) in failures[0]["msg"]
    assert "WARNING: cannot save state" in ctl(sup, "status").stdout
    assert not sup.of_kind("state-saved")
    shutil.rmtree(path)
    assert sup.upgrade()["event"] == "promoted"
    sup.wait_for("state-saved")
    assert_lossless(load.stop())
    data = saved(state, where=lambda data: len(data["records"]) == 3)
    assert [record["result"] for record in data["records"]] == ["promoted"] * 3, "rollouts kept while saving failed"
    assert len(sup.of_kind("state-save-failed")) == 1 and len(sup.of_kind("state-saved")) == 1
    assert ctl(sup, "status").stdout.count("WARNING") == 0


@pytest.mark.timeout(90)
def test_an_upgrade_cut_short_by_sigkill_is_recorded_as_interrupted(tmp_path: Path, supervisors: list[Supervise]) -> None:
    state, release = tmp_path / "state", tmp_path / "release"
    script = str(write_release(release, "--tag", "v1"))
    port = free_port()
    first = start(supervisors, state, port=port, script=script)
    saved(state, where=lambda data: data.get("last_known_good"))
    write_release(release, "--tag", "v2", "--start-delay", "60")
    first.signal(signal.SIGHUP)
    first.wait_for("spawned", where=lambda event: event.get("gen") == 2)
    family = first.descendants()
    first.signal(signal.SIGKILL)
    first.wait_exit(10)
    for process in family:
        try:
            process.kill()
        except psutil.Error:
            pass
    assert wait_port_free(port)
    write_release(release, "--tag", "v3")
    second = start(supervisors, state, port=port, script=script)
    warning = second.wait_for("upgrade-interrupted")
    assert warning["level"] == "warning" and first.pid in warning["pids"]
    history = status(second)["history"]
    assert [record["result"] for record in history] == ["interrupted"]
    assert history[0]["trigger"] == "SIGHUP" and (history[0]["old_gen"], history[0]["new_gen"]) == (1, 2)
    assert "interrupted" in ctl(second, "status").stdout
    data = saved(state, where=lambda data: data.get("last_known_good"))
    assert data["in_progress"] is None and len(data["records"]) == 1, "recorded once, not at every start"
    assert http_get(port)[1].split()[1] == "v3"
