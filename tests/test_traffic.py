"""traffic.py on real sockets, no processes: a listener's reuseport group as generations join and leave, and
probes in flight while they do."""

from __future__ import annotations

import io
import socket

from typing import Any

import pytest
import trio.testing

from supervisor import steering
from supervisor.events import Events
from supervisor.listeners import ListenSpec, bind, sibling
from supervisor.states import TrafficState
from supervisor.traffic import Traffic

pytestmark = [pytest.mark.anyio,
              pytest.mark.skipif(not steering.supported(), reason="this kernel cannot attach a reuseport program")]


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}


async def test_a_probe_in_flight_when_its_generation_leaves_does_not_break_the_next_program() -> None:
    traffic = Traffic(Events(log_level="error", stream=io.StringIO()), steer=True)
    first = bind(ListenSpec("web", "tcp", "127.0.0.1", 0), 16, True, None, reuseport=True)
    second = sibling(first)
    try:
        traffic.join(1, (first,), 16, TrafficState.ACTIVE)
        traffic.join(2, (second,), 16, TrafficState.PASSIVE)
        host, port = first.probe_address()
        with socket.socket() as client, traffic.probe_port(client, host, port, 1):
            traffic.set({2: (TrafficState.ACTIVE, 1), 1: (TrafficState.DRAINED, 1)})
            assert traffic.leave(first)  # generation 1 is gone while its probe is still connecting
            traffic.set({2: (TrafficState.ACTIVE, 2)})  # the next program must not name it
        with socket.create_connection((host, port), timeout=2):
            pass
        assert traffic.held(second) and traffic.share(2) == 1.0
    finally:
        first.close()
        second.close()
