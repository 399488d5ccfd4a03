"""The control port: everything the control API may ask of a supervisor, and nothing more.

control/ is written against this protocol, never against the Supervisor: it asks for operations (each answered
with a Ticket to await, or a plain answer) and reads frozen snapshots. So the API cannot reach into live state,
and the supervisor does not know what serves its port (the `Service` it starts and closes).
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .events import Events
from .preview import Preview
from .snapshot import GenerationView, Snapshot
from .ticket import Ticket


class ControlPort(Protocol):
    events: Events  # what happens, for streams; the API says its own refusals there too

    def snapshot(self, measure: bool = True) -> Snapshot:
        """Everything held and known, now; `measure` reads each process's memory and CPU too."""

    async def preview(self, force: bool) -> Preview:
        """What an upgrade would do now (the dry run), taking the real upgrade's first steps without effects."""

    def request_upgrade(self, trigger: str, force: bool = False) -> Ticket | None:
        """An upgrade, coalesced with a pending one; None once stopping."""

    def request_rollback(self) -> Ticket | None:
        """Drop the watched generation, or redeploy the previous release; None when there is nothing to go back to."""

    def request_scale(self, processes: int) -> str:
        """Change the number of instances (UserError when out of range or stopping); what will happen, in words."""

    async def settled(self) -> None:
        """Return once no operation is running or due (a scale has been carried out), or after as long as an
        operation may take."""

    def stop(self, reason: str) -> None:
        """Graceful stop of everything."""

    async def reexec(self, answer: Callable[[str], Awaitable[None]]) -> str:
        """Become the supervise installed now, in this pid; why not (refused, or its check failed). On success
        `answer` is awaited just before the exec and this never returns."""

    def child_output(self, gen: int | None, instance: int | None, count: int, after: int) -> dict[str, Any]:
        """The last `count` lines the matching instances wrote (after line number `after`), with the number of the
        last line written, and whether the children's output is captured at all (--child-output prefix)."""

    def send_signal(self, signum: signal.Signals) -> GenerationView | None:
        """Forward `signum` to the serving generation; which one got it (as it was then), or None."""


class Service(Protocol):
    """What serves the port for the supervisor's whole life (the control server): the supervisor starts it with
    itself as the port, and closes it."""

    async def serve(self, port: ControlPort) -> None: ...
    def close(self) -> None: ...
