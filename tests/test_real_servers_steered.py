"""uvicorn and hypercorn, 20 upgrades in a row under load, with 1 and 2 processes: not one request lost.

They close, at SIGTERM, every connection they accepted but have not read a request from. With one socket shared
by every generation, the old generation accepted new connections right up to the signal, and a few were lost at
every few upgrades (test_real_servers.py keeps the servers, their command lines and the shorter run of every
server; this file is apart so that the two test workers run it beside that one).
"""

from __future__ import annotations

import pytest

from supervisor.testing.loadgen import LoadGenerator

from harness import Supervise, free_port
from test_real_servers import (BY_NAME, Server, assert_nothing_lost, skip_unless_runnable, supervise,
                               upgrade_and_retire, wait_for)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("server", [pytest.param(BY_NAME[name], id=name) for name in ("uvicorn", "hypercorn")])
def test_twenty_upgrades_of_servers_that_close_unread_connections_lose_nothing(server: Server, processes: int,
                                                                               running: list[Supervise]) -> None:
    """Steered, the old generation is signalled only once no new connection has reached its own socket for
    --drain-delay, so it has accepted none that it has not read."""
    skip_unless_runnable(server)
    port = free_port()
    sup = supervise(server, f"127.0.0.1:{port}", "--watch", "0", "--drain-delay", "200ms", "--health-interval",
                    "100ms", "--drain-timeout", "5s", "-n", str(processes))
    running.append(sup)
    wait_for(sup, "serving", timeout=20)
    load = LoadGenerator("127.0.0.1", port, "/", concurrency=4, max_seconds=110.0, timeout=10.0)
    load.start()
    try:
        for _ in range(20):
            upgrade_and_retire(sup)
    finally:
        stats = load.stop()
    print(f"\n{server} x{processes}: {stats.summary()}")
    assert_nothing_lost(server, stats)
    assert stats.requests > 1000, stats.summary()
