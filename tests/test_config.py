"""--config: a TOML file with every option, read again on every upgrade; flags win over it."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from harness import PYTHON, STUB, Supervise, free_port, http_get, supervise_command, wait_port_free


def write(path: Path, text: str) -> None:
    staged = path.with_suffix(".new")
    staged.write_text(text)
    staged.replace(path)


def config(port: int, tag: str, extra: str = "", listen: str = "") -> str:
    listeners = listen or f'"127.0.0.1:{port}"'
    return (f'listen = [{listeners}]\ncommand = ["{PYTHON}", "{STUB}", "--tag", "{tag}"]\nwatch = "0"\n'
            f'drain_timeout = "5s"\n{extra}\n[env]\nRELEASE = "{tag}"\n')


def env_of(port: int) -> dict:
    return json.loads(http_get(port, "/env")[1])


def promote(sup: Supervise) -> None:
    verdict = sup.upgrade()
    assert verdict["event"] == "promoted", verdict
    sup.wait_for("retired", where=lambda event: event["gen"] == verdict["old_gen"])


@pytest.mark.timeout(30)
def test_file_is_read_again_on_upgrade_and_a_bad_file_refuses(tmp_path: Path) -> None:
    port, path = free_port(), tmp_path / "supervise.toml"
    write(path, config(port, "one"))
    sup = Supervise(["--config", str(path)]).start()
    try:
        sup.wait_for("serving")
        assert env_of(port)["tag"] == "one" and env_of(port)["environ"]["RELEASE"] == "one"
        write(path, config(port, "two"))
        promote(sup)
        seen = env_of(port)
        assert seen["tag"] == "two" and seen["environ"]["RELEASE"] == "two" and seen["generation"] == 2
        write(path, config(port, "three") + "watch = [\n")  # broken TOML
        refused = sup.upgrade()
        assert refused["event"] == "upgrade-refused" and "invalid config" in refused["reason"], refused
        write(path, config(port, "four", extra='ready = "nonsense:x"'))
        refused = sup.upgrade()
        assert refused["event"] == "upgrade-refused" and "unknown probe kind" in refused["reason"], refused
        assert env_of(port)["tag"] == "two", "a refused config never changes what is serving"
        assert [event["gen"] for event in sup.of_kind("spawned")] == [1, 2]
    finally:
        sup.stop()


@pytest.mark.timeout(30)
def test_flags_win_over_the_file(tmp_path: Path) -> None:
    port, path = free_port(), tmp_path / "supervise.toml"
    write(path, config(port, "from-file"))
    sup = Supervise(["--config", str(path), "--", PYTHON, STUB, "--tag", "from-flags"]).start()
    try:
        sup.wait_for("serving")
        assert env_of(port)["tag"] == "from-flags"
        write(path, config(port, "file-again"))
        promote(sup)
        assert env_of(port)["tag"] == "from-flags" and env_of(port)["environ"]["RELEASE"] == "file-again"
    finally:
        sup.stop()


@pytest.mark.timeout(30)
def test_listeners_added_in_the_file_are_bound_and_removed_ones_closed(tmp_path: Path) -> None:
    port, extra_port, path = free_port(), free_port(), tmp_path / "supervise.toml"
    write(path, config(port, "a"))
    sup = Supervise(["--config", str(path)]).start()
    try:
        sup.wait_for("serving")
        assert env_of(port)["listen_fds"] == 1
        write(path, config(port, "b", listen=f'"127.0.0.1:{port}", "admin=127.0.0.1:{extra_port}"'))
        promote(sup)
        seen = env_of(port)
        assert seen["listen_fds"] == 2 and seen["listen_fdnames"] == ["listen0", "admin"]
        with socket.create_connection(("127.0.0.1", extra_port), timeout=2):
            pass  # bound and held by the supervisor
        write(path, config(port, "c"))
        promote(sup)
        assert env_of(port)["listen_fds"] == 1
        assert sup.wait_for("listener-closed")["name"] == "admin"
        assert wait_port_free(extra_port, 5)
    finally:
        sup.stop()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("text, message", [
    ("colour = 1\n", "unknown key 'colour'"),
    ("listen = 8080\n", "key 'listen': expected a list of at most 256 strings (or one string), got 8080"),
    ('command = ["true"]\nwatch = "soon"\n', "key 'watch': expected a duration from 0s to 24h"),
    ("command = [\n", "bad.toml: invalid TOML"),
])
def test_bad_config_file_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    done = subprocess.run([*supervise_command(), "--config", str(path)], capture_output=True, text=True, timeout=10)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("supervise: error:") and message in lines[0], done.stderr


@pytest.mark.timeout(30)
def test_a_refused_upgrade_leaves_no_listener_bound(tmp_path: Path) -> None:
    port, extra_port, path = free_port(), free_port(), tmp_path / "supervise.toml"
    write(path, config(port, "a"))
    sup = Supervise(["--config", str(path)]).start()
    try:
        sup.wait_for("serving")
        refusing = config(port, "b", listen=f'"127.0.0.1:{port}", "admin=127.0.0.1:{extra_port}"')
        write(path, refusing + '[hooks]\npre_upgrade = "exit 1"\n')
        refused = sup.upgrade()
        assert refused["event"] == "upgrade-refused" and "pre-upgrade hook" in refused["reason"], refused
        assert sup.wait_for("listener-closed", timeout=5)["name"] == "admin"  # closed on purpose, not by the GC
        assert wait_port_free(extra_port, 5), "the listener bound for a refused upgrade must be closed"
        assert env_of(port)["tag"] == "a"
    finally:
        sup.stop()
