"""--user/--group: the supervisor (root) binds a privileged port, its children run as the given user."""

from __future__ import annotations

import json
import os
import pwd
import socket

import pytest

from harness import PYTHON, STUB, Supervise, http_get

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs the tests to run as root")


def free_privileged_port() -> int:
    for port in range(900, 1000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip("no free port below 1024")


def readable_by_nobody(path: str) -> bool:
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
        os._exit(0 if os.access(path, os.R_OK) else 1)
    return os.waitpid(pid, 0)[1] == 0


def interpreter_for_nobody() -> str:
    """The stub needs only the standard library: any Python that nobody may run will do."""
    for candidate in (PYTHON, "/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and readable_by_nobody(os.path.realpath(candidate)):
            return candidate
    pytest.skip("no Python interpreter here that the user nobody may run")


@pytest.mark.timeout(30)
def test_children_run_as_the_given_user_on_a_privileged_port() -> None:
    if not readable_by_nobody(STUB):
        pytest.skip("the test server is not readable by nobody here")
    python = interpreter_for_nobody()
    port = free_privileged_port()
    sup = Supervise(["-l", f"127.0.0.1:{port}", "--user", "nobody", "--ready", "notify", "--watch", "0",
                     "--", python, STUB, "--notify"]).start()
    try:
        sup.wait_for("serving")
        env = json.loads(http_get(port, "/env")[1])
        status = open(f"/proc/{env['pid']}/status").read()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        gids = next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1:]
        nobody = pwd.getpwnam("nobody")
        assert set(map(int, uids)) == {nobody.pw_uid} and set(map(int, gids)) == {nobody.pw_gid}
        assert env["environ"]["USER"] == "nobody" and env["environ"]["HOME"] == nobody.pw_dir
        assert sup.upgrade()["event"] == "promoted"  # the next generation too, through its own notify socket
    finally:
        sup.stop()


@pytest.mark.timeout(10)
def test_unknown_user_is_one_clear_error() -> None:
    import subprocess

    from harness import supervise_command

    done = subprocess.run([*supervise_command(), "--user", "no-such-user-here", "--", "true"], capture_output=True,
                          text=True, timeout=10)
    assert done.returncode == 2
    assert done.stderr.strip() == "supervise: error: --user no-such-user-here: no such user"
