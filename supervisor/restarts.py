"""Restarts: the serving generation kept at N ready instances — the first bring-up, each dead or sick instance
replaced beside its siblings (after a backoff, counted by the restart budget), missing ones started, extra ones
drained — and the one way a restart gives up (Fatal: nothing serves and the budget is spent)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from .concurrency import gather
from .counted import counted, inflected
from .desired import Desired
from .event_kinds import Kind
from .events import Events
from .fleet import Fleet
from .generation import Generation
from .instance import Instance
from .output_log import quoted
from .readiness import start_cohort
from .release import Release
from .release_book import ReleaseBook
from .restart_budget import RestartBudget
from .rollout import Plan
from .spawn import SpawnError


class Fatal(Exception):
    """The supervisor cannot go on (the first generation cannot be executed, too many restarts)."""


@dataclass(eq=False)
class Restarts:
    """The repair operation of the supervisor's loop. `upgrade_first` says a pending upgrade goes before a
    repair (it replaces every instance anyway)."""

    fleet: Fleet
    events: Events
    book: ReleaseBook
    desired: Desired
    budget: RestartBudget
    upgrade_first: Callable[[], bool]

    async def bring_up(self, release: Release, first: bool = False) -> Generation:
        """Start a generation of `release` and wait until all its instances are ready (each retried with backoff);
        it becomes the serving generation."""
        fleet = self.fleet
        await self.book.identify(release)  # before it starts: a deploy racing its start must not be taken for it
        generation = fleet.create(Plan(fleet.settings, fleet.probe, release, tuple(fleet.listeners), self.fleet.processes))
        await self.fill(generation, generation.free_indexes(self.fleet.processes), first=first)
        fleet.promote(generation)
        self.events.emit(Kind.SERVING, f"generation {generation.number} serving", gen=generation.number, pids=generation.pids())
        return generation

    async def fill(self, generation: Generation, indexes: Sequence[int], first: bool = False,
                    repair: bool = False) -> None:
        """Start an instance at each index and wait until all are ready; those that fail are started again after
        the backoff (--max-restarts counts each), as long as their index is still wanted. A `repair` gives up
        its indexes to a pending upgrade while other instances serve: the upgrade replaces them all."""
        pending = list(indexes)
        while True:
            pending = [index for index in pending if generation is not self.fleet.serving or index < self.fleet.processes]
            if repair and pending and self.upgrade_first():
                self.events.emit(Kind.REPAIR_DEFERRED, f"generation {generation.number}: not starting "
                                 f"{inflected('instance', len(pending))} {', '.join(map(str, pending))} again: the "
                                 "pending upgrade replaces every instance",
                                 gen=generation.number, instances=pending)
                return
            if not pending:
                return
            fleet = self.fleet
            try:
                started = await start_cohort(fleet, generation, pending, fleet.probe, fleet.settings.ready_timeout,
                                             fleet.settings.health_interval, strict=first)
            except SpawnError as exc:  # the first generation cannot even be executed
                raise Fatal(str(exc)) from None
            pending = [index for index, _, _ in started.failed]
            if started.failed:
                await self._failed([(index, f"{fleet.label(instance)} {failure}" if instance else str(failure))
                                    for index, instance, failure in started.failed])

    async def repair(self) -> None:
        """Bring the serving generation back to N healthy instances: each dead or sick one replaced alone (after
        the backoff; then it is drained, or what is left of its tree cleared away), missing ones started, extra ones
        (after `ctl scale` down) drained."""
        generation = self.fleet.serving
        if generation is None:
            await self.bring_up(self.fleet.release)
            return
        current = sorted(generation.current(), key=lambda instance: (not instance.alive, instance.index))
        keep, extra = current[:self.fleet.processes], current[self.fleet.processes:]
        missing = generation.free_indexes(self.fleet.processes - len(keep)) if len(keep) < self.fleet.processes else []
        jobs = [partial(self._replace, generation, instance) for instance in keep if instance in generation.failing()]
        if extra:
            jobs.append(partial(self.fleet.retire_instances, generation, extra))
        if missing:
            jobs.append(partial(self.fill, generation, missing, repair=True))
        await gather(*jobs)
        ready = len(generation.ready())
        self.events.emit(Kind.SERVING, f"generation {generation.number} serving"
                         + (f" with {counted(ready, 'instance')}" if ready != 1 or self.fleet.processes != 1 else ""),
                         gen=generation.number, pids=generation.pids(), processes=ready)

    async def _replace(self, generation: Generation, failing: Instance) -> None:
        """A serving instance died or is sick: start its index again (the others keep serving), then drain it or
        clear what is left of its tree. One of which nothing runs any more is cleared after the backoff, before its
        replacement starts: its end is told then, not after the replacement is ready."""
        if failing.alive:
            status = f"unhealthy ({failing.sick})"
        else:
            status = failing.exit_status.describe() if failing.exit_status else "gone"
        await self._failed([(failing.index, quoted(f"{self.fleet.label(failing)} {status}", failing.tail()))])
        gone = not failing.alive and not failing.running()
        if gone:
            await self.fleet.retire_instances(generation, [failing])
        await self.fill(generation, [failing.index], repair=True)
        if not gone:
            await self.fleet.retire_instances(generation, [failing])

    async def _failed(self, reasons: list[tuple[int, str]]) -> None:
        """Count the failures (instance index, reason) and wait the longest backoff delay. Past --max-restarts in
        the window: give up if nothing is serving any more (our own manager must act), else keep retrying at the
        longest delay — exiting would take down the instances that still serve. A `ctl scale` or an upgrade request
        cuts the wait short."""
        delay = 0.0
        for index, reason in reasons:
            delay = max(delay, self._count_failure(index, reason))
        await self.desired.request_within(delay)

    def _count_failure(self, index: int, reason: str) -> float:
        """Count one failure of instance `index` and say what happens next; the backoff delay, or Fatal."""
        serving = len(self.fleet.serving.ready()) if self.fleet.serving else 0
        window, most = self.fleet.settings.restart_window, self.fleet.settings.max_restarts
        decision = self.budget.fail(index, most, window, serving)
        if decision.give_up:
            raise Fatal(f"giving up: {counted(decision.count, 'failure')} within {window:g}s (last: {reason})")
        if decision.crash_loop:
            self.events.emit(Kind.RESTARTING, f"{reason}; retrying in {decision.delay:g}s: "
                             f"{counted(decision.count, 'failure')} within {window:g}s is past --max-restarts {most}, "
                             f"but {counted(serving, 'instance')} {'keeps' if serving == 1 else 'keep'} serving",
                             level="warning", delay=decision.delay, reason=reason, crash_loop=True)
        else:
            self.events.emit(Kind.RESTARTING, f"{reason}; restarting in {decision.delay:g}s (failure {decision.count} of "
                             f"at most {most} within {window:g}s)", level="warning", delay=decision.delay, reason=reason)
        return decision.delay
