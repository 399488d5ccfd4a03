"""What the operations loop works towards: the upgrades asked for, and a wake-up for every change.

Requests (an upgrade, a scale) and observations (an exit, a sick instance) arrive from anywhere — a signal, the
control API, an exit watcher — and only change this; the operations loop alone acts, reconciling what runs with
what is wanted, one operation at a time (einhorn's `cull`). The number of instances wanted stays with the fleet
(Fleet.processes) and a sick instance is marked on itself: they are facts about what runs, read where they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from .ticket import Ticket


@dataclass(eq=False)
class Desired:
    pending: list[Ticket] = field(default_factory=list)  # upgrades asked for and not started yet (coalesced)
    _changed: anyio.Event | None = None  # created by a waiter, set and dropped by a change: no wake-up is lost
    _requested: anyio.Event | None = None
    _idle: anyio.Event | None = None

    def observed(self) -> None:
        """What runs changed: the loop looks again."""
        self._changed = _fire(self._changed)

    def requested(self) -> None:
        """An operator asked for something: the loop looks again, and a retry waiting out its backoff at once."""
        self.observed()
        self._requested = _fire(self._requested)

    def reached(self) -> None:
        """The loop has nothing left to do: what runs is what is desired (`ctl scale` waits for this)."""
        self._idle = _fire(self._idle)

    def ask(self, ticket: Ticket) -> None:
        """An upgrade request. The first one pending wakes the loop (and cuts a backoff short); more are coalesced
        with it quietly — a flood of requests must not turn a crash loop's backoff into a busy loop."""
        if not self.pending:
            self.requested()
        self.pending.append(ticket)

    def take(self) -> list[Ticket]:
        """The pending upgrade requests, which one upgrade now serves."""
        tickets, self.pending = self.pending, []
        return tickets

    async def changed(self) -> None:
        """Wait for the next change."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    async def next_reached(self) -> None:
        """Wait until the loop next has nothing left to do."""
        if self._idle is None:
            self._idle = anyio.Event()
        await self._idle.wait()

    async def request_within(self, seconds: float) -> None:
        """Wait for the next request, at most `seconds`."""
        if self._requested is None:
            self._requested = anyio.Event()
        with anyio.move_on_after(seconds):
            await self._requested.wait()


def _fire(event: anyio.Event | None) -> None:
    """Wake whoever waits on `event`; the next waiter makes a new one."""
    if event is not None:
        event.set()
