"""Fast layer: how upgrade requests coalesce (desired.py). Many requests while one is pending are served by one
upgrade, and only the first wakes the loop or cuts a restart's backoff short: a flood of SIGHUPs during a crash
loop must not turn its backoff into a busy loop."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import trio.testing

from supervisor.desired import Desired
from supervisor.ticket import Ticket

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return "trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}


async def test_requests_while_one_is_pending_are_served_by_one_upgrade() -> None:
    desired = Desired()
    tickets = [Ticket("SIGHUP"), Ticket("ctl upgrade"), Ticket("SIGHUP")]
    for ticket in tickets:
        desired.ask(ticket)
    assert desired.take() == tickets  # one upgrade; each ticket gets its verdict
    assert desired.take() == []
    desired.ask(later := Ticket("SIGHUP"))
    assert desired.take() == [later]  # asked after the upgrade began: the next one


async def test_only_the_first_pending_request_cuts_a_backoff_short() -> None:
    desired = Desired()
    woken: list[float] = []

    async def backoff() -> None:
        began = anyio.current_time()
        await desired.request_within(30.0)
        woken.append(anyio.current_time() - began)

    async with anyio.create_task_group() as group:
        group.start_soon(backoff)
        await anyio.sleep(1.0)
        desired.ask(Ticket("SIGHUP"))  # the first: the backoff ends now
        await anyio.sleep(0)
        group.start_soon(backoff)
        await anyio.sleep(1.0)
        desired.ask(Ticket("SIGHUP"))  # coalesced with the pending one: the second backoff runs its course
    assert woken == [pytest.approx(1.0), pytest.approx(30.0)]


async def test_a_change_wakes_the_loop_once_per_waiter() -> None:
    desired = Desired()
    seen: list[str] = []

    async def loop() -> None:
        await desired.changed()
        seen.append("woke")

    async with anyio.create_task_group() as group:
        group.start_soon(loop)
        await anyio.sleep(0.1)
        desired.ask(Ticket("SIGHUP"))
    assert seen == ["woke"]
