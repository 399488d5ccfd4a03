"""Which starting generations run at low CPU priority, and until when (priority.py says how and why).

A generation is lowered when it starts passive (steered: no user connection reaches it until it is proven ready)
and is back to normal at once when it becomes active — or, at the latest, after MAX_LOWERED seconds or half its
--ready-timeout, whichever is shorter. A lowered start-up only gets CPU nobody else wants: on a host with idle CPU
it finishes a little later than it would have (1.2-2.3 times, measured), but on a saturated one it makes almost
no progress, and an upgrade that waits for half a 60 s deadline is worse than a few milliseconds of p99 (measured:
3 upgrades under a saturating load took 45 s with a 15 s bound, 9 s not lowered). A lowering must never fail an
upgrade that would have passed without it, nor stall one for long. The first generation, a replacement in a serving one and a later batch of an
active one start at normal priority: nothing else serves, or they are already given connections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import anyio

from .event_kinds import Kind
from .events import Events
from .generation import Generation
from .instance import Instance
from .priority import Lowering, StartPriority

MAX_LOWERED = 5.0  # seconds: a start-up that needs longer than this on idle CPU gets normal priority after it


@dataclass(eq=False)
class StartPriorities:
    """The lowered generations, each with when its lowering ends at the latest."""

    events: Events
    priority: StartPriority = field(default_factory=StartPriority.choose)
    _until: dict[Generation, float] = field(default_factory=dict)
    _fallback_said: bool = False
    _changed: anyio.Event = field(default_factory=anyio.Event)  # a generation was lowered: the next bound moved

    async def run(self) -> None:
        """For the fleet's life: each lowering ends at its bound at the latest, on time (a start-up with a short
        --ready-timeout must get its normal-priority half in full, not whatever a periodic sweep leaves)."""
        while True:
            self._changed = anyio.Event()
            until = min(self._until.values(), default=None)
            with anyio.move_on_after(until - anyio.current_time() if until is not None else math.inf):
                await self._changed.wait()
            self._expire()

    def begin(self, generation: Generation, passive: bool, wanted: bool, ready_timeout: float) -> None:
        """A generation was created: lower it if it starts passive and --start-priority is low."""
        if not (passive and wanted):
            return
        if self.priority.method is None:
            if not self._fallback_said:
                self._fallback_said = True
                self.events.emit(Kind.PRIORITY, f"starting generations run at normal CPU priority: {self.priority.why}",
                                 gen=generation.number, method=None, reason=self.priority.why)
            return
        bound = min(MAX_LOWERED, ready_timeout / 2)
        self._until[generation] = anyio.current_time() + bound
        self._changed.set()
        self.events.emit(Kind.PRIORITY, f"generation {generation.number} starts at low CPU priority "
                         f"({self.priority.method}: {self.priority.why}) until it is active, {bound:g}s at most",
                         gen=generation.number, method=self.priority.method, lowered=True, bound=bound)

    def lowering(self, generation: Generation) -> Lowering | None:
        """What to apply to an instance of `generation` between fork and exec (None: nothing)."""
        return self.priority.lowering() if generation in self._until else None

    def spawned(self, generation: Generation, instance: Instance) -> None:
        """An instance of `generation` was started: lower its session too, if that is the method here."""
        if generation in self._until and (error := self.priority.lower(instance.leader)) is not None:
            self.events.emit(Kind.PRIORITY, f"generation {generation.number} instance {instance.index} runs at "
                             f"normal CPU priority: {error}", level="warning", gen=generation.number,
                             pids=(instance.leader,), instance=instance.index, reason=error)

    def activated(self, generation: Generation) -> None:
        """`generation` was given new connections: its whole tree runs at normal priority from now on."""
        self._restore(generation, "active", "it is active")

    def _expire(self) -> None:
        """A lowered generation that is past its bound goes back to normal priority."""
        now = anyio.current_time()
        for generation, until in list(self._until.items()):
            if now >= until:
                self._restore(generation, "bound", "still not active at the bound (5s or half of --ready-timeout: "
                                                   "the host has too little idle CPU for it)")

    def forget(self, generation: Generation) -> None:
        """`generation` is gone: nothing to restore."""
        self._until.pop(generation, None)

    def _restore(self, generation: Generation, cause: str, why: str) -> None:
        if self._until.pop(generation, None) is None:
            return
        leaders = [instance.leader for instance in generation.instances if instance.alive]
        restored = self.priority.restore(leaders, lambda: [pid for instance in generation.instances
                                                           for pid in instance.pids(fresh=True)])
        refused = f"; {restored.refused} refused ({restored.reason})" if restored.refused else ""
        self.events.emit(Kind.PRIORITY, f"generation {generation.number} back to normal CPU priority: {why}{refused}",
                         level="warning" if restored.refused else "info", gen=generation.number, pids=leaders,
                         lowered=False, cause=cause, restored=restored.done, refused=restored.refused)
