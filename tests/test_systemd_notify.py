"""The supervisor's own sd_notify messages, received by a test NOTIFY_SOCKET standing in for systemd."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from harness import PYTHON, STUB, Supervise, free_port


class Manager:
    """Reads the supervisor's notify messages as they come, as systemd does."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))

    def close(self) -> list[dict[str, str]]:
        self.running = False
        self.thread.join(2)
        self.sock.close()
        return self.messages


@pytest.mark.timeout(40)
@pytest.mark.parametrize("abstract", [False, True])
def test_ready_reloading_ready_stopping_in_order(tmp_path: Path, abstract: bool) -> None:
    address = f"\0supervise-test-{os.getpid()}-{time.monotonic_ns()}" if abstract else str(tmp_path / "notify")
    manager = Manager(address)
    run = tmp_path / "run"
    run.write_text(f"#!/bin/sh\nexec {PYTHON} {STUB} \"$@\"\n")
    run.chmod(0o755)
    env = dict(os.environ, NOTIFY_SOCKET="@" + address[1:] if abstract else address, WATCHDOG_USEC="400000")
    sup = Supervise(["-l", f"127.0.0.1:{free_port()}", "--watch", "0", "--ready-timeout", "3s", "--", str(run)],
                    env=env).start()
    try:
        sup.wait_for("serving")
        assert sup.upgrade()["event"] == "promoted"
        run.write_text(f"#!/bin/sh\nexec {PYTHON} {STUB} --never-ready\n")
        assert sup.upgrade()["event"] == "rolled-back"
        time.sleep(0.5)  # watchdog pings at half of WATCHDOG_USEC
        sup.signal(signal.SIGTERM)
        assert sup.wait_exit(10) == 0
    finally:
        sup.stop()
        messages = manager.close()
    assert any(message.get("WATCHDOG") == "1" for message in messages)
    sequence = [message for message in messages if {"READY", "RELOADING", "STOPPING"} & message.keys()]
    kinds = [next(key for key in ("READY", "RELOADING", "STOPPING") if key in message) for message in sequence]
    assert kinds == ["READY", "RELOADING", "READY", "RELOADING", "READY", "STOPPING"], sequence
    reloading = sequence[1]
    assert int(reloading["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert "serving generation 1" in sequence[0]["STATUS"]
    assert "serving generation 2" in sequence[2]["STATUS"]
    assert "rolled back" in sequence[4]["STATUS"] and "not ready" in sequence[4]["STATUS"]
    assert not any("MAINPID" in message for message in messages)
