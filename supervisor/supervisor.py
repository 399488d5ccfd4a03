"""The supervisor: turns signals and requests into operations on its fleet (fleet.py holds the listeners and
generations; release_book.py what is known of releases; restart_budget.py how often an instance may fail).

Operations (the first start, upgrades, replacing dead instances, scaling) run one at a time in a single task,
so the state machine is never entered twice. Signals, requests and exits only set flags and wake that task.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Sequence
from dataclasses import InitVar, dataclass, field
from functools import partial

import anyio

from . import __version__
from .cgroups import Cgroups
from .concurrency import gather, leaves
from .config import Settings
from .containment import contain
from .credentials import Credentials
from .desired import Desired
from .errors import UserError
from .event_kinds import Kind
from .events import Events
from .fleet import SWEEP_INTERVAL, Fleet
from .generation import Generation
from .instance import Instance
from .libc import release_free_memory
from .listeners import Listener
from .liveness import Liveness
from .notify import SystemdNotifier
from .port import Service
from .preview import Preview, preview
from .readiness import start_cohort
from .reaper import Reaper
from .release import Release
from .release_book import ReleaseBook
from .restart_budget import RestartBudget
from .rollout import Outcome, Plan, Rollout
from .schema import MAX_PROCESSES
from .snapshot import GenerationView, Snapshot, SupervisorView, of_generation, of_listeners, of_rollout, of_tally
from .spawn import SpawnError
from .states import Phase, RolloutResult
from .tally import Tally
from .ticket import Ticket
from .triggers import ChangeTrigger
from .workers import Worker

_FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)


class Fatal(Exception):
    """The supervisor cannot go on (the first generation cannot be executed, too many restarts)."""


@dataclass(eq=False)
class Supervisor:
    """One running supervisor: the operations loop over its fleet, the requests and tickets, signals and stop."""

    settings: InitVar[Settings]
    listeners: InitVar[list[Listener]]
    events: Events
    release: InitVar[Release]
    book: ReleaseBook
    systemd: SystemdNotifier | None = None
    credentials: InitVar[Credentials | None] = None
    child_fd_limit: InitVar[tuple[int, int] | None] = None  # RLIMIT_NOFILE we were started with, for children
    cgroups: InitVar[Cgroups | None] = None  # a cgroup per generation, where cgroup v2 can be used
    runtime_dir: InitVar[str] = ""  # where the notify sockets go (rundir.py)
    control: Service | None = None  # serves this supervisor as a ControlPort (port.py)
    reaper: Reaper = field(default_factory=Reaper)
    rollout: Rollout | None = None
    forced: bool = False
    exit_code: int = 0
    desired: Desired = field(default_factory=Desired)
    tickets: list[Ticket] = field(default_factory=list)  # those the running rollout will answer
    busy: str | None = None  # the operation running now: upgrade, repair
    budget: RestartBudget = field(default_factory=RestartBudget)
    started_at: float = field(init=False, default=0.0)  # on the event loop's clock, once it runs
    started_wall: float = field(default_factory=time.time)
    tally: Tally = field(default_factory=Tally)
    fleet: Fleet = field(init=False)
    workers: list[Worker] = field(init=False)
    _operations: anyio.CancelScope = field(init=False)
    _drain: anyio.CancelScope | None = field(init=False, default=None)

    def __post_init__(self, settings: Settings, listeners: list[Listener], release: Release,
                      credentials: Credentials | None, child_fd_limit: tuple[int, int] | None,
                      cgroups: Cgroups | None, runtime_dir: str) -> None:
        self.fleet = Fleet(settings, listeners, self.events, release, self.book, self.reaper, self.tally,
                           wake=self.desired.observed, refill=self._fill, credentials=credentials,
                           child_fd_limit=child_fd_limit, cgroups=cgroups, runtime_dir=runtime_dir)
        self.events.subscribe(self.tally.on_event)
        liveness = Liveness(self.fleet, self.events, quiet=lambda: not (self.busy or self.upgrade_pending),
                            wake=self.desired.observed,
                            replace=lambda trigger, release: self.request_upgrade(trigger, force=True, release=release))
        self.workers = [
            Worker("liveness", settings.health_interval, liveness.check),
            Worker("reaper", SWEEP_INTERVAL, self.fleet.sweep),
        ]
        if self.systemd is not None:
            self.events.subscribe(self.systemd.on_event)
            interval = self.systemd.watchdog_interval(os.environ)
            if interval:
                self.workers.append(Worker("watchdog", interval, self.systemd.ping))

    # -- running ----------------------------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until told to stop (exit 0) or until supervision is impossible (exit non-zero)."""
        self.started_at = anyio.current_time()
        self._operations = anyio.CancelScope()
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self.reaper.run)
                group.start_soon(self.fleet.run)
                group.start_soon(self._receive_signals)
                for worker in self.workers:
                    group.start_soon(worker.run)
                if self.control is not None:
                    group.start_soon(self.control.serve, self)
                if self.fleet.settings.upgrade_on_change:
                    trigger = ChangeTrigger(self.fleet.settings.upgrade_on_change, self.fleet.settings.change_settle,
                                            lambda what: self.request_upgrade(what))
                    group.start_soon(trigger.run)
                with self._operations:
                    await self._operate()
                await self._shutdown()
                group.cancel_scope.cancel()
        finally:
            for generation in self.fleet.generations:
                generation.close()
            self.reaper.close()
            if self.control is not None:
                self.control.close()
            if self.systemd is not None:
                self.systemd.close()
        return self.exit_code

    async def _operate(self) -> None:
        """Bring the first generation up, then serve operations one at a time until cancelled or fatal."""
        try:
            await self._bring_up(self.fleet.release, first=True)
            release_free_memory()
            while True:
                await self._next_operation()
                if self.needs_repair and not self.upgrade_first:
                    self.busy = "repair"
                    await self._repair()
                elif self.upgrade_pending:
                    self.busy = "upgrade"
                    await self._upgrade()
                self.busy = None
        except* Fatal as fatal:  # one, or beside the errors of sibling tasks (which propagate: a bug of ours)
            self.events.emit(Kind.FATAL, "; ".join(map(str, leaves(fatal))), level="error")
            self.exit_code = 1
            self.fleet.wind_down()

    @property
    def upgrade_pending(self) -> bool:
        return bool(self.desired.pending)

    @property
    def upgrade_first(self) -> bool:
        """An upgrade is pending while some instance of the serving generation is ready: it goes before a repair
        (it replaces every instance anyway, and it may be the fix for one that keeps failing)."""
        return self.upgrade_pending and self.fleet.serving is not None and bool(self.fleet.serving.ready())

    @property
    def needs_repair(self) -> bool:
        """The serving generation has a dead or sick instance, or not the number of instances asked for."""
        serving = self.fleet.serving
        return serving is None or bool(serving.failing()) or len(serving.current()) != self.fleet.processes

    async def _next_operation(self) -> None:
        """Wait until an upgrade is requested, an instance dies or the number of instances is changed."""
        while not (self.upgrade_pending or self.needs_repair):
            await self.desired.changed()

    # -- operations -------------------------------------------------------------------------------------------

    def request_upgrade(self, trigger: str, force: bool = False, release: Release | None = None) -> Ticket | None:
        """Ask for an upgrade. Requests during an upgrade coalesce into one more; none are taken once stopping."""
        if self.fleet.stopping:
            self.events.emit(Kind.UPGRADE_IGNORED, f"upgrade request ({trigger}) ignored: stopping", level="warning")
            return None
        ticket = Ticket(trigger, force, release, coalesced=self.upgrade_pending)
        if ticket.coalesced:
            self.events.emit(Kind.UPGRADE_COALESCED, f"upgrade request ({trigger}) coalesced with the pending one", level="debug")
        else:
            self.events.emit(Kind.UPGRADE_REQUESTED, f"upgrade requested ({trigger})", trigger=trigger)
        self.desired.ask(ticket)
        return ticket

    def request_scale(self, processes: int) -> str:
        """Change the number of instances: new ones start and must become ready, extra ones drain. Applied now,
        or right after an upgrade in progress (which deploys the number it started with)."""
        if not 1 <= processes <= MAX_PROCESSES:
            raise UserError(f"cannot scale to {processes}: the number of instances must be from 1 to {MAX_PROCESSES}")
        if self.fleet.stopping:
            raise UserError("cannot scale: the supervisor is stopping")
        previous = self.fleet.scale(processes)
        when = " after the upgrade in progress" if self.rollout is not None else ""
        self.events.emit(Kind.SCALE_REQUESTED, f"scaling from {previous} to {processes} instances{when}",
                         gen=self.fleet.serving.number if self.fleet.serving else None, previous=previous, processes=processes)
        self.desired.requested()
        return f"scaling from {previous} to {processes} instances{when}"

    def request_rollback(self) -> Ticket | None:
        """In a watch window: drop the new generation. Otherwise: start the previous generation's exact release."""
        if self.rollout is not None and self.rollout.abort("rolled back by operator"):
            ticket = Ticket("ctl rollback", goal=RolloutResult.ROLLED_BACK)
            self.tickets.append(ticket)
            return ticket
        if self.book.previous is None:
            return None
        return self.request_upgrade("ctl rollback", force=True, release=self.book.previous)

    async def _upgrade(self) -> Outcome:
        tickets = self.tickets = self.desired.take()  # a rollback in the watch window adds its own
        trigger = ", ".join(dict.fromkeys(ticket.trigger for ticket in tickets))
        release = next((ticket.release for ticket in reversed(tickets) if ticket.release), None)
        old = self.fleet.serving
        self.rollout = Rollout(self.fleet, old, trigger, force=any(ticket.force for ticket in tickets), release=release)
        outcome = Outcome(RolloutResult.ABORTED, "the supervisor is stopping", trigger=trigger)
        self.book.history.begin(trigger, old.number if old else None, self.fleet.next_number)
        try:
            outcome = await self.rollout.run()
            serving = self.fleet.serving  # after the rollout: the new generation, or still the old one
            await self.book.record(outcome, serving.release if serving else None, serving.identity if serving else None)
        except Fatal:
            raise  # restoring old instances failed past --max-restarts: our own manager must act
        except Exception as exc:  # noqa: BLE001 - a bug here must never take the serving generation down
            outcome = await contain(self.fleet, self.rollout, exc)
        finally:
            self.book.history.finish()
            self.rollout = None
            for ticket in self.tickets:
                ticket.settle(outcome)
            self.tickets = []
            self.book.forget()
        return outcome

    async def _bring_up(self, release: Release, first: bool = False) -> Generation:
        """Start a generation of `release` and wait until all its instances are ready (each retried with backoff);
        it becomes the serving generation."""
        fleet = self.fleet
        await self.book.identify(release)  # before it starts: a deploy racing its start must not be taken for it
        generation = fleet.create(Plan(fleet.settings, fleet.probe, release, tuple(fleet.listeners), self.fleet.processes))
        await self._fill(generation, generation.free_indexes(self.fleet.processes), first=first)
        fleet.promote(generation)
        self.events.emit(Kind.SERVING, f"generation {generation.number} serving", gen=generation.number, pids=generation.pids())
        return generation

    async def _fill(self, generation: Generation, indexes: Sequence[int], first: bool = False,
                    repair: bool = False) -> None:
        """Start an instance at each index and wait until all are ready; those that fail are started again after
        the backoff (--max-restarts counts each), as long as their index is still wanted. A `repair` gives up
        its indexes to a pending upgrade while other instances serve: the upgrade replaces them all."""
        pending = list(indexes)
        while True:
            pending = [index for index in pending if generation is not self.fleet.serving or index < self.fleet.processes]
            if repair and pending and self.upgrade_first:
                self.events.emit(Kind.REPAIR_DEFERRED, f"generation {generation.number}: not starting instance(s) "
                                 f"{', '.join(map(str, pending))} again: the pending upgrade replaces every instance",
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

    async def _repair(self) -> None:
        """Bring the serving generation back to N healthy instances: each dead or sick one replaced alone (after
        the backoff; then it is drained, or what is left of its tree cleared away), missing ones started, extra ones
        (after `ctl scale` down) drained."""
        generation = self.fleet.serving
        if generation is None:
            await self._bring_up(self.fleet.release)
            return
        current = sorted(generation.current(), key=lambda instance: (not instance.alive, instance.index))
        keep, extra = current[:self.fleet.processes], current[self.fleet.processes:]
        missing = generation.free_indexes(self.fleet.processes - len(keep)) if len(keep) < self.fleet.processes else []
        jobs = [partial(self._replace, generation, instance) for instance in keep if instance in generation.failing()]
        if extra:
            jobs.append(partial(self.fleet.retire_instances, generation, extra))
        if missing:
            jobs.append(partial(self._fill, generation, missing, repair=True))
        await gather(*jobs)
        ready = len(generation.ready())
        self.events.emit(Kind.SERVING, f"generation {generation.number} serving"
                         + (f" with {ready} instances" if ready != 1 or self.fleet.processes != 1 else ""),
                         gen=generation.number, pids=generation.pids(), processes=ready)

    async def _replace(self, generation: Generation, failing: Instance) -> None:
        """A serving instance died or is sick: start its index again (the others keep serving), then drain it or
        clear what is left of its tree."""
        if failing.alive:
            status = f"unhealthy ({failing.sick})"
        else:
            status = failing.exit_status.describe() if failing.exit_status else "gone"
        await self._failed([(failing.index, f"{self.fleet.label(failing)} {status}")])
        await self._fill(generation, [failing.index], repair=True)
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
            raise Fatal(f"giving up: {decision.count} failures within {window:g}s (last: {reason})")
        if decision.crash_loop:
            self.events.emit(Kind.RESTARTING, f"{reason}; retrying in {decision.delay:g}s: {decision.count} failures "
                             f"within {window:g}s is past --max-restarts {most}, but {serving} instance(s) keep "
                             "serving", level="warning", delay=decision.delay, reason=reason, crash_loop=True)
        else:
            self.events.emit(Kind.RESTARTING, f"{reason}; restarting in {decision.delay:g}s (failure {decision.count} of "
                             f"at most {most} within {window:g}s)", level="warning", delay=decision.delay, reason=reason)
        return decision.delay

    # -- the control port (port.py) ---------------------------------------------------------------------------

    def snapshot(self, measure: bool = True) -> Snapshot:
        fleet, rollout, book = self.fleet, self.rollout, self.book
        state = "stopping" if fleet.stopping else (rollout.state if rollout else Phase.IDLE)
        view = SupervisorView(os.getpid(), fleet.settings.name, __version__, self.started_at, self.started_wall, state,
                              fleet.stopping,
                              str(fleet.settings.control_path), self.busy, fleet.processes,
                              fleet.settings.strategy.describe(fleet.processes), self.reaper.orphans_reaped)
        return Snapshot(anyio.current_time(), view, of_listeners(fleet.listeners),
                        tuple(of_generation(generation, generation is fleet.serving, measure)
                              for generation in fleet.generations),
                        of_rollout(rollout) if rollout else None, tuple(book.history.as_dict()["records"]),
                        book.history.last_known_good, book.history.last_known_bad, book.history.save_error,
                        tuple(worker.info() for worker in self.workers),
                        of_tally(self.tally, self.events.sink.dropped_total if self.events.sink else 0))

    async def preview(self, force: bool) -> Preview:
        fleet = self.fleet
        return await preview(fleet, fleet.serving, fleet.next_number, fleet.listeners, force)

    async def settled(self) -> None:
        settings = self.fleet.settings
        with anyio.move_on_after(settings.ready_timeout + settings.drain_timeout + settings.watch + 5.0):
            while self.busy or self.needs_repair or self.upgrade_pending:  # an upgrade may be running too
                await anyio.sleep(0.05)

    def send_signal(self, signum: signal.Signals) -> GenerationView | None:
        target = self.fleet.serving
        if target is None or not self.fleet.forward(signum):
            return None
        return of_generation(target, serving=True, measure=False)

    # -- stopping ---------------------------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Graceful stop: abort any upgrade, drain every generation, exit 0."""
        if self.fleet.stopping:
            return
        self.fleet.wind_down()
        self.events.emit(Kind.STOPPING, f"stopping ({reason}): draining every generation", reason=reason)
        self._operations.cancel()

    def force(self, reason: str) -> None:
        """Immediate stop: kill every generation's whole tree now."""
        self.forced = True
        self.fleet.wind_down()
        self.events.emit(Kind.STOPPING, f"stopping now ({reason}): killing every generation", reason=reason, forced=True)
        self._operations.cancel()
        if self._drain is not None:
            self._drain.cancel()

    async def _shutdown(self) -> None:
        fleet = self.fleet
        fleet.wind_down()
        for ticket in self.desired.take():
            ticket.settle(Outcome(RolloutResult.ABORTED, "the supervisor is stopping"))
        with anyio.CancelScope(shield=True):
            if not self.forced:
                with anyio.CancelScope() as self._drain:
                    async with anyio.create_task_group() as group:
                        for generation in list(fleet.generations):
                            group.start_soon(fleet.retire, generation, True)
            for generation in list(fleet.generations):
                await fleet.retire(generation, graceful=False)
            fleet.kill_descendants()
        self.events.emit(Kind.STOPPED, "stopped" + (" (forced)" if self.forced else ""), exit_code=self.exit_code)

    # -- background duties ------------------------------------------------------------------------------------

    async def _receive_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, *_FORWARDED) as received:
            async for signum in received:
                self._on_signal(signal.Signals(signum))

    def _on_signal(self, signum: signal.Signals) -> None:
        if signum == signal.SIGHUP:
            self.request_upgrade("SIGHUP")
        elif signum == signal.SIGQUIT or (signum == signal.SIGINT and self.fleet.stopping):
            self.force(signum.name if signum == signal.SIGQUIT else "second SIGINT")
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.stop(signum.name)
        else:
            self.fleet.forward(signum)
