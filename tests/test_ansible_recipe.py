"""examples/ansible/upgrade.yml, run for real: a two-host "fleet" on this machine (connection: local), each
host with its own release tree and its own running supervisor, upgraded by the play.

- a good release is rolled out to both hosts, one after the other, and each ends up serving it;
- a bad release fails the canary (supervise rolls it back and `ctl upgrade` exits 1), the play fails, the
  canary's `current` symlink is put back, and the second host is never touched (serial + max_fail_percentage);
- `--check` changes nothing and only checks that every supervisor answers.

Skipped when ansible-playbook is not installed: $ANSIBLE_PLAYBOOK, else ansible-playbook on PATH. ansible-core
goes into a virtual environment of its own (never the project's), e.g.
`python3 -m venv /tmp/ansible && /tmp/ansible/bin/pip install ansible-core`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from supervisor.testing.net import free_port

ROOT = Path(__file__).resolve().parent.parent
PLAY = ROOT / "examples" / "ansible" / "upgrade.yml"
INVENTORY = ROOT / "examples" / "ansible" / "inventory.ini"
STUB = ROOT / "tests" / "servers" / "stub.py"
ANSIBLE_PLAYBOOK = os.environ.get("ANSIBLE_PLAYBOOK") or shutil.which("ansible-playbook")

pytestmark = pytest.mark.skipif(
    not ANSIBLE_PLAYBOOK or not os.access(ANSIBLE_PLAYBOOK, os.X_OK),
    reason="ansible-playbook is not installed (set ANSIBLE_PLAYBOOK or put it on PATH)")

RELEASES = {  # version → flags of the stub server: what makes a release good or bad
    "v1": (),
    "v2": (),
    "v3": ("--exit-at-start", "3"),  # cannot even start: supervise rolls it back within a second
}


def get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        return response.read().decode()


def release_tree(directory: Path, version: str) -> None:
    """What a build produces: bin/server, here a script that runs the stub server as release `version`."""
    (directory / "bin").mkdir(parents=True)
    flags = " ".join(RELEASES[version])
    (directory / "bin" / "server").write_text(f"#!/bin/sh\nexec {sys.executable} {STUB} --tag {version} {flags}\n")
    (directory / "bin" / "server").chmod(0o755)


@dataclass
class Host:
    """One member of the fleet: its app_root (releases/, current), its control socket, its supervisor."""

    name: str
    root: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def app_root(self) -> Path:
        return self.root / "app"

    @property
    def control(self) -> Path:
        return self.root / "ctl.sock"

    def start(self, supervise: list[str], base: Path) -> None:
        """Deploy v1 as the play would have, and run supervise the way systemd/myapp.service does."""
        release_tree(self.app_root / "releases" / "v1", "v1")
        (self.app_root / "current").symlink_to("releases/v1")
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("LISTEN_", "WATCHDOG_", "SUPERVISE_")) and key != "NOTIFY_SOCKET"}
        env["XDG_RUNTIME_DIR"] = str(base / "run")  # its notify sockets here, not in the machine's /run
        current = self.app_root / "current"
        with (self.root / "supervise.log").open("wb") as log:
            self.process = subprocess.Popen(
                [*supervise, "--name", "myapp", "--control", str(self.control), "--state-dir", str(self.root),
                 "--chdir", str(current), "--listen", f"127.0.0.1:{self.port}", "--watch", "200ms",
                 "--", str(current / "bin" / "server")],
                env=env, cwd="/", stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            try:
                if get(self.port).startswith("ok v1 "):
                    return
            except OSError:
                pass
            assert self.process.poll() is None, (self.root / "supervise.log").read_text()
            assert time.monotonic() < deadline, "supervise did not start serving v1"
            time.sleep(0.05)

    def serving(self) -> str:
        """`ok v2 gen=2 pid=…` → "v2 gen 2": the release and the generation that answer."""
        answer = get(self.port).split()
        return f"{answer[1]} gen {answer[2].removeprefix('gen=')}"

    def current(self) -> str:
        return os.readlink(self.app_root / "current")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # drains every generation and exits 0
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@dataclass
class Fleet:
    base: Path
    hosts: list[Host]
    supervise_bin: Path
    inventory: Path
    archives: dict[str, Path]

    def play(self, version: str, *options: str) -> subprocess.CompletedProcess[str]:
        """ansible-playbook upgrade.yml for `version`, against this fleet."""
        assert ANSIBLE_PLAYBOOK is not None
        env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
        env.update(
            ANSIBLE_HOME=str(self.base / "ansible"),  # nothing read from or left in ~/.ansible
            ANSIBLE_LOCAL_TEMP=str(self.base / "ansible" / "tmp"),
            ANSIBLE_REMOTE_TEMP=str(self.base / "ansible" / "tmp"),
            ANSIBLE_CONFIG=str(self.base / "ansible.cfg"),  # empty: no ansible.cfg of the checkout or /etc
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_RETRY_FILES_ENABLED="0",
            ANSIBLE_PIPELINING="1",  # modules fed on stdin: fewer temp files per task, faster
        )
        return subprocess.run(
            [ANSIBLE_PLAYBOOK, "-i", str(self.inventory), str(PLAY),
             "-e", f"release_version={version}", "-e", f"release_archive={self.archives[version]}",
             "-e", f"supervise_bin={self.supervise_bin}", *options],
            env=env, cwd=self.base, capture_output=True, text=True, timeout=120)


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    # A short base path: the supervisor's notify sockets go under it, and unix socket paths are short.
    base = Path(tempfile.mkdtemp(prefix="fleet-", dir="/tmp"))
    (base / "run").mkdir()
    (base / "ansible.cfg").write_text("")
    # ctl as the play runs it: this checkout's supervise, whatever environment the tests run in.
    supervise_bin = base / "supervise"
    supervise_bin.write_text(f"#!/bin/sh\nexec {sys.executable} -m supervisor \"$@\"\n")
    supervise_bin.chmod(0o755)
    archives = {}
    for version in RELEASES:  # what a CI pipeline would publish: one tarball per release
        release_tree(base / "build" / version, version)
        archives[version] = base / f"myapp-{version}.tar.gz"
        with tarfile.open(archives[version], "w:gz") as tar:
            tar.add(base / "build" / version, arcname=".")
    hosts = [Host(name, base / name, free_port()) for name in ("web1", "web2")]
    lines = ["[myapp]"]
    for host in hosts:  # in inventory order: web1 is the canary (serial: 1 first)
        lines.append(f"{host.name} ansible_connection=local "
                     'ansible_python_interpreter="{{ ansible_playbook_python }}" '
                     f"app_root={host.app_root} supervise_control={host.control}")
    lines += ["[myapp:vars]", "use_become=false"]
    inventory = base / "inventory.ini"
    inventory.write_text("\n".join(lines) + "\n")
    try:
        for host in hosts:
            host.start([sys.executable, "-m", "supervisor"], base)
        yield Fleet(base, hosts, supervise_bin, inventory, archives)
    finally:
        for host in hosts:
            host.stop()
        for host in hosts:  # shown by pytest when a test failed
            log = host.root / "supervise.log"
            print(f"--- {host.name}\n" + (log.read_text(errors="replace") if log.exists() else ""))
        shutil.rmtree(base, ignore_errors=True)


def recap(result: subprocess.CompletedProcess[str]) -> dict[str, dict[str, int]]:
    """PLAY RECAP as {host: {"ok": n, "changed": n, "failed": n, ...}}; hosts the play never reached are absent."""
    assert "PLAY RECAP" in result.stdout, result.stdout + result.stderr
    table = {}
    for line in result.stdout.split("PLAY RECAP")[1].splitlines():
        host, sep, counts = line.partition(" : ")
        if sep:
            table[host.strip()] = {key: int(value) for key, value in (item.split("=") for item in counts.split())}
    return table


def test_the_play_parses() -> None:
    assert ANSIBLE_PLAYBOOK is not None
    env = {key: value for key, value in os.environ.items() if not key.startswith("ANSIBLE_")}
    with tempfile.TemporaryDirectory() as home:
        env.update(ANSIBLE_HOME=home, ANSIBLE_LOCAL_TEMP=home, ANSIBLE_NOCOLOR="1")
        result = subprocess.run([ANSIBLE_PLAYBOOK, "-i", str(INVENTORY), str(PLAY), "--syntax-check"],
                                env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(150)  # ansible-playbook (bounded at 120 s) takes over 60 s on a loaded 2-core machine
def test_check_mode_is_a_preflight_that_changes_nothing(fleet: Fleet) -> None:
    result = fleet.play("v2", "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {host: counts["failed"] for host, counts in recap(result).items()} == {"web1": 0, "web2": 0}
    for host in fleet.hosts:
        assert host.current() == "releases/v1"
        assert not (host.app_root / "releases" / "v2").exists()
        assert host.serving() == "v1 gen 1"

    fleet.hosts[1].stop()  # a host whose supervisor is down fails the preflight, with ctl's one-line reason
    result = fleet.play("v2", "--check")
    assert result.returncode == 2, result.stdout + result.stderr
    assert recap(result)["web2"]["failed"] == 1
    assert "cannot reach supervisor" in result.stdout


@pytest.mark.timeout(150)  # ansible-playbook (bounded at 120 s) takes over 60 s on a loaded 2-core machine
def test_a_good_release_rolls_out_to_every_host(fleet: Fleet) -> None:
    result = fleet.play("v2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert {host: counts["failed"] for host, counts in recap(result).items()} == {"web1": 0, "web2": 0}
    for host in fleet.hosts:
        assert host.current() == "releases/v2"
        assert host.serving() == "v2 gen 2"
    # One host at a time: web1's upgrade finished before web2's began (serial: 1 for the first batch).
    assert result.stdout.index("changed: [web1]") < result.stdout.index("changed: [web2]")

    again = fleet.play("v2")  # a re-run of the same version changes nothing and upgrades nothing
    assert again.returncode == 0, again.stdout + again.stderr
    assert [counts["changed"] for counts in recap(again).values()] == [0, 0]
    assert [host.serving() for host in fleet.hosts] == ["v2 gen 2", "v2 gen 2"]


@pytest.mark.timeout(150)  # ansible-playbook (bounded at 120 s) takes over 60 s on a loaded 2-core machine
def test_a_bad_release_stops_at_the_canary(fleet: Fleet) -> None:
    result = fleet.play("v3")
    assert result.returncode == 2, result.stdout + result.stderr  # 2: a host failed
    canary, other = fleet.hosts
    assert "release v3 was not promoted on web1" in result.stdout
    assert "rolled back: exited with status 3" in result.stdout  # ctl's verdict, in the failure message
    # The canary: supervise rolled the bad release back, the play put `current` back.
    assert canary.serving() == "v1 gen 1"
    assert canary.current() == "releases/v1"
    # The rest of the fleet was never touched.
    assert recap(result) == {"web1": recap(result)["web1"]}  # web2 not even in the recap
    assert recap(result)["web1"]["failed"] == 1 and recap(result)["web1"]["rescued"] == 1
    assert not (other.app_root / "releases" / "v3").exists()
    assert other.current() == "releases/v1"
    assert other.serving() == "v1 gen 1"
    status = subprocess.run([str(fleet.supervise_bin), "ctl", "--control", str(other.control), "status", "--json"],
                            capture_output=True, text=True, timeout=30)
    assert status.returncode == 0, status.stderr
    assert len(json.loads(status.stdout)["generations"]) == 1
