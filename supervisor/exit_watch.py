"""The exit watch of one generation: a task per instance waits for its exit and reports it, all in a task group
the watch owns. The fleet runs each generation's watch beside its others and ends it when the generation retires,
so no watcher outlives what it watches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .generation import Generation
from .instance import Instance
from .reaper import ExitStatus

Report = Callable[[Generation, Instance, ExitStatus], None]


@dataclass(eq=False)
class ExitWatch:
    """Watches the exits of `generation`'s instances and hands each to `report`. `add` is called as an instance is
    spawned (from sync code: the watcher starts in the watch's own task group once `run` takes it)."""

    generation: Generation
    report: Report
    _added: MemoryObjectSendStream[Instance] = field(init=False)
    _to_watch: MemoryObjectReceiveStream[Instance] = field(init=False)
    _unreported: set[Instance] = field(default_factory=set)
    _scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    _finished: anyio.Event = field(default_factory=anyio.Event)
    _started: bool = False

    def __post_init__(self) -> None:
        self._added, self._to_watch = anyio.create_memory_object_stream[Instance](float("inf"))

    def add(self, instance: Instance) -> None:
        """Watch a freshly spawned instance's exit."""
        self._unreported.add(instance)
        self._added.send_nowait(instance)

    async def run(self) -> None:
        """Until ended: a watcher for each instance added, in this watch's task group."""
        self._started = True
        with self._scope, self._to_watch:
            async with anyio.create_task_group() as group:
                async for instance in self._to_watch:
                    group.start_soon(self._watch, instance)
        self._finished.set()

    async def _watch(self, instance: Instance) -> None:
        status = await instance.exit.wait()
        instance.drain_output()  # what it wrote before it exited is logged before its exit
        self._unreported.discard(instance)
        self.report(self.generation, instance, status)

    async def end(self, grace: float) -> None:
        """The generation is retired: no instance is added any more; exits still to come within `grace` seconds
        (its processes are gone: only the reaping is left) are reported, then every watcher is cancelled."""
        self._added.close()
        if self._unreported:
            with anyio.move_on_after(grace):
                await self._finished.wait()
        self._scope.cancel()
        if not self._started:  # retired before the fleet ran it: it will find its scope cancelled, if ever run
            self._to_watch.close()

    def close(self) -> None:
        """Release the streams (when the watch never ran: the supervisor stopped first)."""
        self._added.close()
        self._to_watch.close()
