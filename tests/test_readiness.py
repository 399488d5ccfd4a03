"""Readiness at the unit level: the reason a wait gives up with (a scripted probe), and a cancelled probe's
connection (a real socket on 127.0.0.1)."""

from __future__ import annotations

import gc
import os
import socket
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from supervisor.probe_spec import parse_probe
from supervisor.probes import HttpProbe, Result, Target, Verdict
from supervisor.readiness import Failed, wait_ready
from supervisor.reaper import ChildExit

NOT_READY = Result(Verdict.NOT_READY, "HTTP 503", pid=101)
TAKEN = Result(Verdict.INCONCLUSIVE, "connection to 127.0.0.1:1 was accepted by another generation", pid=7)


@dataclass
class Scripted:
    """A probe that answers from a script, then repeats its last answer."""

    answers: list[Result]
    spec: Any = field(default_factory=lambda: parse_probe("http"))

    async def check(self, subject: object) -> Result:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


async def _reason(*answers: Result) -> str:
    instance = SimpleNamespace(exit=ChildExit(pid=0), tail=lambda: ())  # never exits, said nothing
    with pytest.raises(Failed) as failed:
        await wait_ready(Scripted(list(answers)), instance, timeout=0.2, max_interval=0.01)  # type: ignore[arg-type]
    return failed.value.reason


@pytest.mark.timeout(10)
def test_reason_quotes_the_instance_own_answer_over_later_connections_taken_by_others() -> None:
    # Under load the old generation accepts most probe connections; the instance's own 503 is the reason.
    assert anyio.run(_reason, NOT_READY, TAKEN) == "not ready after 0.2s: last probe HTTP 503"


@pytest.mark.timeout(10)
def test_reason_says_others_took_every_connection_when_the_instance_never_answered() -> None:
    assert "accepted by another generation" in anyio.run(_reason, TAKEN)


async def _cancelled_probe_leaves_the_server(listener: socket.socket) -> bytes:
    """Start an HTTP probe at `listener` (nobody accepts: the probe waits), cancel it, then accept its
    connection as the server would: what the server reads from it."""
    host, port = listener.getsockname()
    probe = HttpProbe(parse_probe("http"), Target(host, port, shared=True), timeout=5.0)
    subject = SimpleNamespace(number=1, pids=lambda fresh=False: [os.getpid()])
    with anyio.move_on_after(0.2):
        await probe.check(subject)  # type: ignore[arg-type]
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(2.0)
        return conn.recv(100)


@pytest.mark.timeout(10)
def test_a_cancelled_probe_closes_its_connection() -> None:
    # A cohort cancels its other probes once every instance is proven ready. A connection left open would
    # hold a server thread waiting for a request that never comes, and stall that server's drain.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        gc.disable()  # the close must not depend on when a garbage collection happens to run
        try:
            assert anyio.run(_cancelled_probe_leaves_the_server, listener) == b""
        finally:
            gc.enable()
