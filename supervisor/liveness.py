"""Liveness: the serving generation is health-checked while nothing else goes on, and what keeps failing its
checks is replaced — an instance beside its siblings, a generation of one through the upgrade path."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .event_kinds import Kind
from .events import Events
from .fleet import Fleet
from .health import Strikes, health_check
from .release import Release


@dataclass(eq=False)
class Liveness:
    """The liveness worker's check. `quiet` says nothing else goes on; `wake` has the operations loop replace an
    instance marked sick; `replace` upgrades the serving generation to its own release (a trigger, a release)."""

    fleet: Fleet
    events: Events
    quiet: Callable[[], bool]
    wake: Callable[[], None]
    replace: Callable[[str, Release], None]
    _strikes: Strikes | None = None

    async def check(self) -> None:
        """After --health-threshold failures in a row of one instance, that instance is replaced beside its
        siblings; a generation of one is replaced through the zero-downtime upgrade path (with its watch window)."""
        fleet, target = self.fleet, self.fleet.serving
        if target is None or not self.quiet() or fleet.stopping or not target.ready():
            self._strikes = None
            return
        if self._strikes is None or self._strikes.generation is not target:
            self._strikes = Strikes(target, fleet.settings.health_threshold)
        result = await health_check(fleet.probe, target)
        failure = self._strikes.record(result)
        owner = target.owner(result.pid)
        if failure and fleet.serving is target and owner is not None and len(target.current()) > 1:
            owner.sick = failure  # replaced beside its siblings by the repair operation, never killed first
            self.events.emit(Kind.UNHEALTHY, f"{fleet.label(owner)} failed its health checks ({failure}): replacing it",
                             level="warning", gen=target.number, instance=owner.index, pids=(owner.leader,),
                             reason=failure)
            self.wake()
        elif failure and fleet.serving is target:
            self._strikes = None
            self.events.emit(Kind.UNHEALTHY, f"generation {target.number} failed its health checks ({failure}): "
                             "replacing it", level="warning", gen=target.number, reason=failure)
            self.replace(f"liveness: {result.detail}", target.release)
