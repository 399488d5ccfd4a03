"""supervise started by socket activation (systemd's LISTEN_FDS/LISTEN_PID) adopts the sockets it is given."""

from __future__ import annotations

import json
import socket

import pytest

from harness import PYTHON, STUB, Supervise, http_get


@pytest.mark.timeout(30)
def test_activated_sockets_are_adopted_by_name_and_passed_to_the_child() -> None:
    web, admin = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
    web_port, admin_port = web.getsockname()[1], admin.getsockname()[1]
    # Like systemd: the sockets at fds 3 and 4 (here in the opposite order to --listen), LISTEN_PID = our pid.
    activate = (f"import os, sys; os.dup2({admin.fileno()}, 3); os.dup2({web.fileno()}, 4); "
                "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='2', LISTEN_FDNAMES='admin:web'); "
                "os.execv(sys.argv[1], sys.argv[1:])")
    sup = Supervise(["-l", f"web=127.0.0.1:{web_port}", "-l", f"admin=127.0.0.1:{admin_port}", "--watch", "0",
                     "--ready", f"http://127.0.0.1:{admin_port}/readyz",
                     "--", PYTHON, STUB, "--tag", "activated", "--socket-name", "admin"],
                    wrapper=[PYTHON, "-c", activate], pass_fds=(web.fileno(), admin.fileno())).start()
    try:
        web.close()
        admin.close()  # from here on only the supervisor (and its child) hold them
        sup.wait_for("serving")
        listening = {event["name"]: event for event in sup.of_kind("listening")}
        assert listening["web"]["adopted"] and listening["admin"]["adopted"]
        assert listening["web"]["address"] == f"127.0.0.1:{web_port}"
        status, body = http_get(admin_port, "/env")  # the stub serves the socket named admin: fd 4
        assert status == 200
        env = json.loads(body)
        assert env["listen_fdnames"] == ["web", "admin"] and env["listen_fds"] == 2
        assert env["listen_pid"] == env["pid"] != sup.pid
    finally:
        sup.stop()


@pytest.mark.timeout(30)
def test_sockets_meant_for_another_process_are_ignored(tmp_path) -> None:
    """LISTEN_PID naming some other pid: the variables are not ours, we bind as usual and never pass them on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"PATH": "/usr/bin:/bin", "LISTEN_FDS": "1", "LISTEN_PID": "1", "LISTEN_FDNAMES": "bogus"}
    sup = Supervise(["-l", f"127.0.0.1:{port}", "--", PYTHON, STUB], env=env).start()
    try:
        sup.wait_for("serving")
        assert not sup.of_kind("listening")[0]["adopted"]
        env_seen = json.loads(http_get(port, "/env")[1])
        assert env_seen["listen_fdnames"] == ["listen0"] and env_seen["listen_fds"] == 1
    finally:
        sup.stop()
