"""The unit files in systemd/: verified by systemd itself, consistent with each other, and driven here the
way systemd would drive them.

1. `systemd-analyze verify` on every variant, inside a throw-away root (`--root`): the root holds a copy of
   this machine's own unit directory (so `After=network.target` and the default dependencies resolve) and
   an executable at every path the units run (`/usr/local/bin/supervise`), so verify really checks them —
   without --root it stops at "Command /usr/local/bin/supervise is not executable". verify exits 0 even on
   an unknown key or a bad value (it only prints a warning and ignores the line), so any line it prints
   fails the test; only the lines that an older systemd prints for the notify-reload variant are allowed.
2. The variants share every setting except the few that make them variants (copies drift otherwise), and
   the timeouts fit the supervisor's own: TimeoutStartSec covers readiness + watch (systemd applies it to
   reloads too), TimeoutStopSec covers the drain.
3. Lifecycle, without systemd: each unit's ExecStart/ExecReload, with only its paths moved into a temp dir,
   run as systemd runs them — a NOTIFY_SOCKET that accepts messages from the main pid only
   (NotifyAccess=main), ExecReload or the ReloadSignal for reloads with systemd's rule for notify-reload
   (RELOADING=1 with MONOTONIC_USEC not older than the signal, then READY=1), SIGTERM to the main process
   only (KillMode=mixed), the socket passed in for the socket-activated variant.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from supervisor.testing.net import free_port

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
STUB = ROOT / "tests" / "servers" / "stub.py"
VARIANTS = {  # directory under systemd/ → the unit files installed together
    "notify": (UNITS, ("myapp.service",)),
    "notify-reload": (UNITS / "notify-reload", ("myapp.service",)),
    "socket-activated": (UNITS / "socket-activated", ("myapp.socket", "myapp.service")),
}
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None,
                                   reason="systemd-analyze is not installed (Debian: apt-get install systemd)")

# -- reading unit files -----------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """{section: [(key, value), ...]} in file order; comments dropped, backslash continuations joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path}: setting outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not a setting: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def setting(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str | None:
    """The last value of key (systemd's rule for single-valued settings), or None."""
    values = [value for name, value in unit.get(section, []) if name == key]
    return values[-1] if values else None


def command(unit: dict[str, list[tuple[str, str]]], key: str) -> list[str]:
    """An Exec*= line as argv, without systemd's prefix characters (-, @, :, +, !)."""
    value = setting(unit, "Service", key)
    assert value, f"no {key}="
    argv = shlex.split(value)
    argv[0] = argv[0].lstrip("-@:+!")
    return argv


def option(argv: list[str], name: str) -> str:
    """The value of --name in a supervise command line (before the `--`)."""
    head = argv[: argv.index("--")]
    return head[head.index(name) + 1]


def seconds(value: str) -> float:
    """A systemd or supervise time span of one unit: 90s, 2min, 500ms, 30."""
    match = re.fullmatch(r"([0-9.]+)\s*(ms|s|sec|m|min|h)?", value)
    assert match, f"unexpected time span {value!r}"
    scale = {"ms": 0.001, None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[match.group(2)]
    return float(match.group(1)) * scale


def service_of(variant: str) -> dict[str, list[tuple[str, str]]]:
    directory, _ = VARIANTS[variant]
    return parse_unit(directory / "myapp.service")


# -- 1. systemd-analyze verify ------------------------------------------------------------------------------


def analyze_version() -> int:
    assert ANALYZE is not None
    first = subprocess.run([ANALYZE, "--version"], capture_output=True, text=True, check=True).stdout.split()
    return int(first[1])


def system_unit_dir() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "sysinit.target").exists():
            return candidate
    pytest.skip("no systemd unit directory with sysinit.target to verify against")


@pytest.fixture(scope="module")
def verify_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with this machine's stock units (targets, slices) and nothing of its configuration."""
    root = tmp_path_factory.mktemp("root")
    shutil.copytree(system_unit_dir(), root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    return root


def install(root: Path, sources: list[Path]) -> list[str]:
    """Put unit files into root/etc/systemd/system (alone), and an executable at every path they run."""
    target = root / "etc/systemd/system"
    for old in target.iterdir():
        if old.is_file():
            old.unlink()
    names = []
    for source in sources:
        shutil.copy(source, target / source.name)
        names.append(source.name)
        for section in parse_unit(source).values():
            for key, value in section:
                if key.startswith("Exec") and value:
                    binary = root / shlex.split(value)[0].lstrip("-@:+!").lstrip("/")
                    binary.parent.mkdir(parents=True, exist_ok=True)
                    binary.write_text("#!/bin/sh\nexit 0\n")
                    binary.chmod(0o755)
    return names


def verify(root: Path, names: list[str]) -> list[str]:
    """Every line systemd-analyze verify prints about these units (empty: they are clean)."""
    assert ANALYZE is not None
    result = subprocess.run([ANALYZE, "verify", f"--root={root}", "--man=no", "--generators=no", *names],
                            capture_output=True, text=True, timeout=60)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    if result.returncode != 0 and not lines:
        lines.append(f"systemd-analyze verify exited {result.returncode}")
    return lines


# What systemd < 253 says about Type=notify-reload: it predates it. Newer versions must say nothing.
OLD_SYSTEMD_ON_NOTIFY_RELOAD = (
    re.compile(r"Failed to parse service type, ignoring: notify-reload$"),
    re.compile(r"Unknown key '?ReloadSignal'? in section '?\[?Service\]?'?, ignoring\.$"),
)


@needs_analyze
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_systemd_analyze_verify_accepts_every_unit(variant: str, verify_root: Path) -> None:
    directory, files = VARIANTS[variant]
    complaints = verify(verify_root, install(verify_root, [directory / name for name in files]))
    if variant == "notify-reload" and analyze_version() < 253:
        complaints = [line for line in complaints if not any(p.search(line) for p in OLD_SYSTEMD_ON_NOTIFY_RELOAD)]
    assert complaints == []


@needs_analyze
def test_verify_as_run_here_does_catch_mistakes(verify_root: Path, tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt key and a missing executable are both reported."""
    unit = tmp_path / "broken.service"
    text = (UNITS / "myapp.service").read_text().replace("KillMode=mixed", "KilMode=mixed")
    unit.write_text(text.replace("ExecReload=/usr/local/bin/supervise", "ExecReload=/usr/local/bin/nosuch"))
    names = install(verify_root, [unit])
    (verify_root / "usr/local/bin/nosuch").unlink()
    complaints = "\n".join(verify(verify_root, names))
    assert "KilMode" in complaints
    assert "/usr/local/bin/nosuch" in complaints


# -- 2. consistency -------------------------------------------------------------------------------------------

# What may differ between the variants; everything else must be the same in all three service files.
VARIANT_KEYS = {
    ("Unit", "Requires"), ("Unit", "After"),  # the socket-activated service orders itself after its socket
    ("Service", "Type"), ("Service", "ReloadSignal"), ("Service", "ExecReload"),  # notify vs notify-reload
    ("Service", "ExecStart"),  # --listen :8080 vs --listen web=:8080
    ("Install", "Also"),
}


def shared_settings(unit: dict[str, list[tuple[str, str]]]) -> set[tuple[str, str, str]]:
    return {(section, key, value) for section, pairs in unit.items() for key, value in pairs
            if (section, key) not in VARIANT_KEYS}


def test_the_variants_differ_only_where_they_must() -> None:
    base = shared_settings(service_of("notify"))
    for variant in ("notify-reload", "socket-activated"):
        other = shared_settings(service_of(variant))
        assert other == base, f"{variant}: extra {sorted(other - base)}, missing {sorted(base - other)}"
    starts = {variant: command(service_of(variant), "ExecStart") for variant in VARIANTS}
    listen = {variant: option(argv, "--listen") for variant, argv in starts.items()}
    assert listen == {"notify": ":8080", "notify-reload": ":8080", "socket-activated": "web=:8080"}
    for argv in starts.values():
        other_options = [arg for arg in argv if arg not in (":8080", "web=:8080")]
        assert other_options == [arg for arg in starts["notify"] if arg != ":8080"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_timeouts_cover_the_supervisors_own(variant: str) -> None:
    unit = service_of(variant)
    argv = command(unit, "ExecStart")
    reload_budget = seconds(option(argv, "--ready-timeout")) + seconds(option(argv, "--watch"))
    assert seconds(setting(unit, "Service", "TimeoutStartSec") or "90s") > reload_budget
    assert seconds(setting(unit, "Service", "TimeoutStopSec") or "90s") > seconds(option(argv, "--drain-timeout"))
    assert setting(unit, "Service", "KillMode") == "mixed"
    assert setting(unit, "Service", "NotifyAccess") == "main"
    assert setting(unit, "Service", "RuntimeDirectory") == "supervise"
    assert option(argv, "--state-dir") == "/var/lib/" + (setting(unit, "Service", "StateDirectory") or "")


def test_the_socket_unit_names_what_the_service_adopts() -> None:
    socket_unit = parse_unit(UNITS / "socket-activated" / "myapp.socket")
    listen = option(command(service_of("socket-activated"), "ExecStart"), "--listen")
    name, _, address = listen.partition("=")
    assert setting(socket_unit, "Socket", "FileDescriptorName") == name
    assert setting(socket_unit, "Socket", "ListenStream") == address.lstrip(":")
    assert setting(socket_unit, "Socket", "Accept") in (None, "no")


# -- 3. lifecycle as systemd drives it -----------------------------------------------------------------------


def get(port: int, path: str = "/") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()


def serves(port: int, tag: str, within: float = 5.0) -> bool:
    """Whether release `tag` answers within a few seconds. READY=1 (and ctl's verdict) come at promotion,
    while the old generation may still be taking its last connections before its drain signal lands."""
    deadline = time.monotonic() + within
    while not get(port).startswith(f"ok {tag} "):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


_UCRED = struct.Struct("iII")


@dataclass
class FakeManager:
    """systemd's side of sd_notify: a NOTIFY_SOCKET that records (sender pid, fields, when)."""

    path: str
    sock: socket.socket = field(init=False)
    messages: list[tuple[int, dict[str, str], int]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    main: subprocess.Popen[bytes] | None = None
    closed: bool = False

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        while not self.closed:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = next((_UCRED.unpack_from(payload)[0] for level, kind, payload in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), 0)
            fields = dict(line.partition("=")[::2] for line in data.decode().splitlines() if "=" in line)
            with self.changed:
                self.messages.append((pid, fields, time.monotonic_ns() // 1000))
                self.changed.notify_all()

    def wait(self, predicate, timeout: float, start: int = 0) -> int:  # type: ignore[no-untyped-def]
        """Index of the first message from `start` on that satisfies predicate(fields); fails on timeout,
        or at once when the main process has exited (as systemd notices the main process dying)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for index in range(start, len(self.messages)):
                    if predicate(self.messages[index][1]):
                        return index
                left = deadline - time.monotonic()
                if self.main is not None and self.main.poll() is not None:
                    raise AssertionError(f"main process exited {self.main.returncode}; got {self.messages[start:]}")
                if left <= 0:
                    raise AssertionError(f"no such notify message within {timeout}s; got {self.messages[start:]}")
                self.changed.wait(min(left, 0.2))

    def close(self) -> None:
        self.closed = True
        self.sock.close()


@dataclass
class Host:
    """The unit's file-system layout under a temp dir: /srv/myapp releases, /var/lib, /run."""

    base: Path
    port: int

    def path(self, unit_path: str) -> str:
        return str(self.base / unit_path.lstrip("/"))

    def release(self, name: str, *flags: str) -> None:
        """Deploy a release (a script running the stub server) and point `current` at it, atomically."""
        directory = self.base / "srv/myapp/releases" / name / "bin"
        directory.mkdir(parents=True, exist_ok=True)
        script = directory / "server"
        script.write_text(f"#!/bin/sh\nexec {sys.executable} {STUB} --tag {name} {' '.join(flags)}\n")
        script.chmod(0o755)
        staged = self.base / "srv/myapp/current.new"
        staged.symlink_to(f"releases/{name}")
        os.replace(staged, self.base / "srv/myapp/current")

    def translate(self, argv: list[str]) -> list[str]:
        """A unit's command line as it runs here: our supervise, the layout under base, a free port.

        --watch is shortened (it only makes the old and new generation serve side by side for longer).
        """
        out: list[str] = []
        for index, arg in enumerate(argv):
            if index == 0 and arg == "/usr/local/bin/supervise":
                out += [sys.executable, "-m", "supervisor"]
            elif arg.startswith(("/srv/", "/var/lib/")):
                out.append(self.path(arg))
            elif arg.endswith(":8080") and out and out[-1] == "--listen":
                out.append(arg.replace(":8080", f"127.0.0.1:{self.port}"))
            elif out and out[-1] == "--watch":
                out.append("200ms")
            else:
                out.append(arg)
        return out

    def environment(self, notify_path: str) -> dict[str, str]:
        """What systemd gives a system service: no XDG_RUNTIME_DIR... except here, where it stands in for /run.

        The supervisor and `ctl --name` both put the control socket in $XDG_RUNTIME_DIR/supervise when set
        (as /run/supervise for root under systemd): pointing it into base keeps the real /run untouched.
        """
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("LISTEN_", "WATCHDOG_", "SUPERVISE_")) and key != "NOTIFY_SOCKET"}
        env.update(NOTIFY_SOCKET=notify_path, XDG_RUNTIME_DIR=self.path("/run"))
        return env


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


ACTIVATE = ("import os, sys; os.dup2(int(os.environ.pop('ACTIVATED_FD')), 3); "
            "os.environ.update(LISTEN_FDS='1', LISTEN_FDNAMES='web', LISTEN_PID=str(os.getpid())); "
            "os.execv(sys.argv[1], sys.argv[1:])")


@pytest.fixture
def host() -> Iterator[Host]:
    # A short base: the supervisor's notify sockets live at $XDG_RUNTIME_DIR/supervise/run-PID-N/genN.notify,
    # and a unix socket path has at most 107 bytes (pytest's tmp_path is too deep for that).
    base = Path(tempfile.mkdtemp(prefix="sdu-", dir="/tmp"))
    for directory in ("run", "var/lib/supervise", "srv/myapp/shared"):  # RuntimeDirectory, StateDirectory, ...
        (base / directory).mkdir(parents=True)
    yield Host(base, free_port())
    shutil.rmtree(base, ignore_errors=True)


@dataclass
class Unit:
    """One variant's service, run here as systemd would run it (see the module docstring)."""

    variant: str
    host: Host
    unit: dict[str, list[tuple[str, str]]] = field(init=False)
    manager: FakeManager = field(init=False)
    env: dict[str, str] = field(init=False)
    main: subprocess.Popen[bytes] = field(init=False)
    tree: set[int] = field(default_factory=set)  # every process seen under the main one (the cgroup)

    def start(self) -> None:
        """ExecStart with NOTIFY_SOCKET; for the socket-activated variant, fd 3 = a socket bound as
        myapp.socket binds it, named "web". Returns when READY=1 arrives, as `systemctl start` does."""
        self.unit = service_of(self.variant)
        start = self.host.translate(command(self.unit, "ExecStart"))
        self.manager = FakeManager(self.host.path("/run/notify"))
        self.env = self.host.environment(self.manager.path)
        held: socket.socket | None = None
        if self.variant == "socket-activated":
            held = socket.create_server(("127.0.0.1", self.host.port), backlog=4096)
            held.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.env["ACTIVATED_FD"] = str(held.fileno())
            start = [sys.executable, "-c", ACTIVATE, *start]
        with (self.host.base / "journal").open("wb") as log:  # stderr, as the journal would keep it
            self.main = subprocess.Popen(start, env=self.env, cwd="/", stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, pass_fds=(held.fileno(),) if held else (), start_new_session=True)
        if held is not None:
            held.close()  # systemd keeps its copy; this one is not needed once the supervisor has it
        self.manager.main = self.main
        self.manager.wait(lambda m: m.get("READY") == "1", timeout=20)

    def reload(self, patience: float = 20) -> tuple[bool, str]:
        """`systemctl reload`: (whether systemd counts the reload as succeeded, the STATUS= it ends with).

        With ExecReload= the command's exit status decides. With Type=notify-reload, systemd sends the
        signal and needs RELOADING=1 with a MONOTONIC_USEC not older than the signal, then READY=1; anything
        else leaves the reload hanging until TimeoutStartSec, when it fails (`patience` stands in for that).
        """
        self.tree |= {p.pid for p in psutil.Process(self.main.pid).children(recursive=True)}
        mark = len(self.manager.messages)
        if setting(self.unit, "Service", "ExecReload"):
            reload = subprocess.run(self.host.translate(command(self.unit, "ExecReload")), env=self.env, cwd="/",
                                    capture_output=True, text=True, timeout=60)
            done = self.manager.wait(lambda m: m.get("READY") == "1", timeout=10, start=mark)
            return reload.returncode == 0, self.manager.messages[done][1].get("STATUS", "")
        begin = time.monotonic_ns() // 1000
        os.kill(self.main.pid, signal.SIGHUP)
        try:
            reloading = self.manager.wait(lambda m: m.get("RELOADING") == "1"
                                          and int(m.get("MONOTONIC_USEC", "0")) >= begin, timeout=patience, start=mark)
            done = self.manager.wait(lambda m: m.get("READY") == "1", timeout=patience, start=reloading)
        except AssertionError:
            statuses = [m["STATUS"] for _, m, _ in self.manager.messages[mark:] if "STATUS" in m]
            return False, statuses[-1] if statuses else ""
        return True, self.manager.messages[done][1].get("STATUS", "")

    def stop(self) -> None:
        """`systemctl stop` with KillMode=mixed: SIGTERM to the main process only, TimeoutStopSec to exit."""
        self.tree |= {p.pid for p in psutil.Process(self.main.pid).children(recursive=True)}
        os.kill(self.main.pid, signal.SIGTERM)
        assert self.main.wait(timeout=seconds(setting(self.unit, "Service", "TimeoutStopSec") or "90s")) == 0
        self.manager.wait(lambda m: m.get("STOPPING") == "1", timeout=1)

    def cleanup(self) -> None:
        if self.main.poll() is None:
            os.killpg(self.main.pid, signal.SIGKILL)
            self.main.wait()
        self.manager.close()
        for pid in self.tree:  # by pid: only what this test started
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        print((self.host.base / "journal").read_text(errors="replace"))  # shown by pytest on failure


@pytest.fixture
def run_unit(host: Host) -> Iterator[Callable[[str], Unit]]:
    started: list[Unit] = []

    def start(variant: str) -> Unit:
        unit = Unit(variant, host)
        started.append(unit)
        unit.start()
        return unit

    yield start
    for unit in started:
        unit.cleanup()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_unit_starts_reloads_rolls_back_and_stops_as_systemd_would_run_it(
        variant: str, host: Host, run_unit: Callable[[str], Unit]) -> None:
    host.release("v1")
    unit = run_unit(variant)
    assert get(host.port).startswith("ok v1 ")
    if variant == "socket-activated":  # adopted, not bound anew (the port was taken: binding would fail)
        assert json.loads(get(host.port, "/env"))["listen_fdnames"] == ["web"]

    host.release("v2")
    succeeded, status = unit.reload()
    assert succeeded and "rolled back" not in status, status
    assert serves(host.port, "v2")

    host.release("v3", "--exit-at-start", "3")
    succeeded, status = unit.reload()
    assert "rolled back" in status, status
    # ExecReload: `systemctl reload` fails on the rollback. notify-reload: the reload itself went fine.
    assert succeeded == (variant == "notify-reload")
    assert get(host.port).startswith("ok v2 ")  # the bad v3 never replaced v2

    unit.stop()
    # NotifyAccess=main: systemd drops whatever the main pid did not send; nothing else even got here.
    assert {pid for pid, _, _ in unit.manager.messages} == {unit.main.pid}
    assert [pid for pid in unit.tree if alive(pid)] == []  # nothing left for systemd's final SIGKILL


@pytest.mark.parametrize("variant", ["notify", "notify-reload"])
def test_a_refused_upgrade_ends_the_reload_at_once(variant: str, host: Host, run_unit: Callable[[str], Unit]) -> None:
    """A release that failed before is refused without starting anything. With ExecReload the reload
    fails (ctl exits 1). With notify-reload systemd must still see the reload end, not wait for
    TimeoutStartSec (90s): that needs RELOADING=1 (+MONOTONIC_USEC) before the READY=1."""
    host.release("v1")
    unit = run_unit(variant)
    host.release("v3", "--exit-at-start", "3")
    assert "rolled back" in unit.reload()[1]
    started = time.monotonic()
    succeeded, status = unit.reload(patience=5)  # v3 again: known bad, refused
    assert "refused" in status, status
    assert time.monotonic() - started < 5
    assert succeeded == (variant == "notify-reload")
    assert get(host.port).startswith("ok v1 ")


@pytest.mark.parametrize("variant", ["notify", "socket-activated"])
def test_a_reexec_of_the_supervisor_keeps_the_unit_and_its_main_pid(variant: str, host: Host,
                                                                      run_unit: Callable[[str], Unit]) -> None:
    """`supervise ctl reexec` under the unit (how the README upgrades supervise itself): systemd sees the same
    MAINPID throughout (NotifyAccess=main drops anything else), a STATUS= line for the re-exec, and nothing
    restarted; reloads work afterwards."""
    host.release("v1")
    unit = run_unit(variant)
    children = {p.pid for p in psutil.Process(unit.main.pid).children(recursive=True)}
    mark = len(unit.manager.messages)
    reexec = subprocess.run(host.translate(["/usr/local/bin/supervise", "ctl", "--name", "myapp", "reexec"]),
                            env=unit.env, cwd="/", capture_output=True, text=True, timeout=60)
    assert reexec.returncode == 0, (reexec.stdout, reexec.stderr)
    unit.manager.wait(lambda m: m.get("STATUS", "").startswith("re-executed"), timeout=10, start=mark)
    assert {pid for pid, _, _ in unit.manager.messages} == {unit.main.pid}
    assert {p.pid for p in psutil.Process(unit.main.pid).children(recursive=True)} == children
    assert get(host.port).startswith("ok v1 ")
    host.release("v2")
    succeeded, status = unit.reload()
    assert succeeded and "rolled back" not in status, status
    assert serves(host.port, "v2")
    unit.stop()
