"""Liveness: the serving generation is checked every --liveness-interval while nothing else goes on — its health
probe, and with --max-rss the memory of each instance's tree — and what keeps failing is replaced: an instance
beside its siblings, a generation of one through the upgrade path. Never killed first: its replacement is ready
before it is drained."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .counted import counted
from .event_kinds import Kind
from .events import Events
from .fleet import Fleet
from .generation import Generation
from .health import Strikes, health_check
from .instance import Instance
from .memory_limit import MemoryStrikes
from .release import Release
from .units import mib


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
    _memory: MemoryStrikes | None = None

    async def check(self) -> None:
        """After --health-threshold failed checks in a row of one instance (its probe, or its memory above
        --max-rss), that instance is replaced beside its siblings; a generation of one is replaced through the
        zero-downtime upgrade path (with its watch window)."""
        fleet, target = self.fleet, self.fleet.serving
        if target is None or not self.quiet() or fleet.stopping or not target.ready():
            self._strikes = self._memory = None
            return
        if self._strikes is None or self._strikes.generation is not target:
            self._strikes = Strikes(target, fleet.settings.health_threshold)
        result = await health_check(fleet.probe, target)
        failure = self._strikes.record(result)
        if failure and fleet.serving is target:
            self._replace(target, target.owner(result.pid), Kind.UNHEALTHY, f"failed its health checks ({failure})",
                          f"liveness: {result.detail}", failure)
        elif fleet.serving is target and self.quiet() and fleet.settings.max_rss is not None:
            self._check_memory(target, fleet.settings.max_rss)

    def _check_memory(self, target: Generation, limit: int) -> None:
        """--max-rss: replace what stayed above it for --health-threshold checks."""
        if self._memory is None or self._memory.generation is not target:
            self._memory = MemoryStrikes(target)
        threshold = self.fleet.settings.health_threshold
        for overuse in self._memory.check(limit, threshold):
            if not self._replace(target, overuse.instance, Kind.MEMORY_LIMIT,
                                 f"held {mib(overuse.rss)} for {counted(threshold, 'check')} in a row, above --max-rss "
                                 f"{mib(limit)}", overuse.reason, overuse.reason, rss=overuse.rss, limit=limit):
                return

    def _replace(self, target: Generation, owner: Instance | None, kind: Kind, what: str, trigger: str, reason: str,
                 **fields: object) -> bool:
        """Have `owner` replaced beside its siblings (True: others may follow), or the whole generation through the
        upgrade path when it is its only instance, or when the failure cannot be pinned on one (False)."""
        fleet = self.fleet
        if owner is not None and len(target.current()) > 1:
            owner.sick = reason  # replaced beside its siblings by the repair operation, never killed first
            self.events.emit(kind, f"{fleet.label(owner)} {what}: replacing it", level="warning", gen=target.number,
                             instance=owner.index, pids=owner.pids(), reason=reason, **fields)
            self.wake()
            return True
        self._strikes = self._memory = None
        self.events.emit(kind, f"generation {target.number} {what}: replacing it", level="warning", gen=target.number,
                         pids=target.pids(), reason=reason, **fields)
        self.replace(trigger, target.release)
        return False
