"""The supervisor: turns signals and requests into operations on its fleet (fleet.py holds the listeners and
generations; release_book.py what is known of releases; restarts.py keeps the serving generation whole;
rollout.py runs an upgrade) and serves the control port (port.py).

Operations (the first start, upgrades, replacing dead instances, scaling) run one at a time in a single task,
so the state machine is never entered twice. Signals, requests and exits only change what is desired
(desired.py) and wake that task, which reconciles what runs with it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any

import anyio

from . import __version__, revive
from .carryover import dump
from .cgroups import Cgroups
from .concurrency import leaves
from .config import Settings
from .containment import contain
from .counted import counted
from .credentials import Credentials
from .desired import Desired
from .errors import UserError
from .event_kinds import Kind
from .events import Events
from .fleet import SWEEP_INTERVAL, Fleet
from .generation import Generation
from .libc import release_free_memory
from .listeners import Listener
from .liveness import Liveness
from .notify import SystemdNotifier
from .output_log import OutputLog
from .port import Service
from .preview import Preview, preview
from .reaper import Reaper
from .reexec import Reexec, unblock_signals
from .release import Release
from .release_book import ReleaseBook
from .restart_budget import RestartBudget
from .restarts import Fatal, Restarts
from .revive import Carried
from .rollout import Outcome, Rollout
from .schema import MAX_PROCESSES
from .snapshot import (
    GenerationView,
    Snapshot,
    SupervisorView,
    of_generation,
    of_listeners,
    of_rollout,
    of_tally,
)
from .states import Phase, RolloutResult
from .tally import Tally
from .ticket import Ticket
from .traffic import Traffic
from .triggers import ChangeTrigger
from .workers import Worker

_FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)


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
    metrics: Service | None = None  # --metrics-listen: /metrics and /status over TCP, read-only
    traffic: InitVar[Traffic | None] = None  # who gets new connections (traffic.py); None: nothing steered
    carried: Carried | None = None  # what a re-exec carried over (reexec.py): revived in run(), not started anew
    held: dict[str, int] = field(default_factory=dict)  # other fds a re-exec keeps: control socket, run dir lock
    reaper: Reaper = field(default_factory=Reaper)
    rollout: Rollout | None = None
    forced: bool = False
    exit_code: int = 0
    desired: Desired = field(default_factory=Desired)
    tickets: list[Ticket] = field(default_factory=list)  # those the running rollout will answer
    busy: str | None = None  # the operation running now: upgrade, repair
    started_at: float = field(init=False, default=0.0)  # on the event loop's clock, once it runs
    started_wall: float = field(default_factory=time.time)
    reexecs: list[float] = field(default_factory=list)  # wall-clock times of the re-execs of this supervisor
    tally: Tally = field(default_factory=Tally)
    output: OutputLog = field(init=False)  # the children's output (--child-output), for the log and `ctl logs`
    fleet: Fleet = field(init=False)
    restarts: Restarts = field(init=False)
    workers: list[Worker] = field(init=False)
    _operations: anyio.CancelScope = field(init=False)
    _drain: anyio.CancelScope | None = field(init=False, default=None)
    _exclusive: anyio.Lock = field(init=False, default_factory=anyio.Lock)  # an operation, or a re-exec

    def __post_init__(self, settings: Settings, listeners: list[Listener], release: Release,
                      credentials: Credentials | None, child_fd_limit: tuple[int, int] | None,
                      cgroups: Cgroups | None, runtime_dir: str, traffic: Traffic | None) -> None:
        def refill(generation: Generation, indexes: Sequence[int]) -> Awaitable[None]:
            return self.restarts.fill(generation, indexes)  # the fleet is built before the restarts that need it

        self.output = OutputLog(self.events, capture=settings.child_output == "prefix")
        self.fleet = Fleet(settings, listeners, self.events, release, self.book, self.reaper, self.tally,
                           wake=self.desired.observed, refill=refill, credentials=credentials,
                           child_fd_limit=child_fd_limit, cgroups=cgroups, runtime_dir=runtime_dir,
                           traffic=traffic or Traffic(self.events, steer=False), output=self.output)
        self.restarts = Restarts(self.fleet, self.events, self.book, self.desired, RestartBudget(),
                                 upgrade_first=lambda: self.upgrade_first)
        self.events.subscribe(self.tally.on_event)
        liveness = Liveness(self.fleet, self.events, quiet=lambda: not (self.busy or self.upgrade_pending),
                            wake=self.desired.observed,
                            replace=lambda trigger, release: self.request_upgrade(trigger, force=True, release=release))
        self.workers = [
            Worker("liveness", settings.liveness_interval, liveness.check),
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
        if self.carried is not None:
            self._revive(self.carried)
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self.reaper.run)
                group.start_soon(self.fleet.run)
                group.start_soon(self._receive_signals)
                for worker in self.workers:
                    group.start_soon(worker.run)
                if self.control is not None:
                    group.start_soon(self.control.serve, self)
                if self.metrics is not None:
                    group.start_soon(self.metrics.serve, self)
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
            if self.metrics is not None:
                self.metrics.close()
            if self.systemd is not None:
                self.systemd.close()
        return self.exit_code

    async def _operate(self) -> None:
        """Bring the first generation up, then serve operations one at a time until cancelled or fatal."""
        try:
            if self.carried is None:
                await self.restarts.bring_up(self.fleet.release, first=True)
            release_free_memory()
            while True:
                await self._next_operation()
                async with self._exclusive:
                    if self.needs_repair and not self.upgrade_first:
                        self.busy = "repair"
                        await self.restarts.repair()
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
            self.desired.reached()
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
        self.events.emit(Kind.SCALE_REQUESTED, f"scaling from {previous} to {counted(processes, 'instance')}{when}",
                         gen=self.fleet.serving.number if self.fleet.serving else None, previous=previous, processes=processes)
        self.desired.requested()
        return f"scaling from {previous} to {counted(processes, 'instance')}{when}"

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

    # -- the control port (port.py) ---------------------------------------------------------------------------

    def snapshot(self, measure: bool = True) -> Snapshot:
        fleet, rollout, book = self.fleet, self.rollout, self.book
        state = "stopping" if fleet.stopping else (rollout.state if rollout else Phase.IDLE)
        view = SupervisorView(os.getpid(), fleet.settings.name, __version__, self.started_at, self.started_wall, state,
                              fleet.stopping, str(fleet.settings.control_path), self.busy, fleet.processes,
                              fleet.settings.strategy.describe(fleet.processes), self.reaper.orphans_reaped,
                              "steered" if fleet.traffic.steer else "shared", dict(fleet.traffic.shared),
                              tuple(self.reexecs))
        return Snapshot(anyio.current_time(), view, of_listeners(fleet.listeners),
                        tuple(of_generation(generation, generation is fleet.serving, measure, fleet.traffic)
                              for generation in fleet.generations),
                        of_rollout(rollout) if rollout else None, tuple(book.history.as_dict()["records"]),
                        book.history.last_known_good, book.history.last_known_bad, book.history.save_error,
                        tuple(worker.info() for worker in self.workers),
                        of_tally(self.tally, self.events.sink.dropped_total if self.events.sink else 0,
                                 self.output.dropped_total))

    async def preview(self, force: bool) -> Preview:
        fleet = self.fleet
        return await preview(fleet, fleet.serving, fleet.next_number, fleet.listeners, force,
                             steered=fleet.traffic.steer, shared=tuple(fleet.traffic.shared.items()))

    async def settled(self) -> None:
        settings = self.fleet.settings
        with anyio.move_on_after(settings.ready_timeout + settings.drain_timeout + settings.watch + 5.0):
            while self.busy or self.needs_repair or self.upgrade_pending:  # an upgrade may be running too
                await self.desired.next_reached()

    def child_output(self, gen: int | None, instance: int | None, count: int, after: int) -> dict[str, Any]:
        return {"capture": self.output.capture, "seq": self.output.seq,
                "lines": self.output.query(gen, instance, count, after)}

    def send_signal(self, signum: signal.Signals) -> GenerationView | None:
        target = self.fleet.serving
        if target is None or not self.fleet.forward(signum):
            return None
        return of_generation(target, serving=True, measure=False)

    # -- re-exec (reexec.py) ----------------------------------------------------------------------------------

    def _reexec_refusal(self, checking: bool = False) -> str | None:
        """Why the supervisor cannot re-execute now: only at rest is everything it holds written down. While
        `checking`, the re-exec itself holds the operations lock."""
        if self.fleet.stopping:
            return "the supervisor is stopping"
        if self.busy or (self._exclusive.locked() and not checking):
            return f"an operation is in progress ({self.busy or 're-exec'})"
        if self.upgrade_pending:
            return "an upgrade is pending"
        if self.needs_repair:
            return "the serving generation is being repaired or scaled"
        return None

    async def reexec(self, answer: Callable[[str], Awaitable[None]]) -> str:
        """`ctl reexec` (reexec.py): why it was refused or failed; on success `answer` is awaited and this never
        returns."""
        if (why := self._reexec_refusal()) is None:
            async with self._exclusive:
                why = await Reexec(self.events, self.reaper, self.fleet.runtime_dir, self._carry,
                                   lambda: self._reexec_refusal(checking=True)).run(answer)
        self.events.emit(Kind.REEXEC_REFUSED, f"re-exec refused: {why}", level="warning", reason=why)
        return why

    def _carry(self) -> dict[str, Any]:
        own = {"version": __version__, "started_at": self.started_at, "started_wall": self.started_wall,
               "reexecs": [*self.reexecs, time.time()], "runtime_dir": self.fleet.runtime_dir,
               "child_fd_limit": self.fleet.child_fd_limit, "orphans_reaped": self.reaper.orphans_reaped,
               "ready_sent": bool(self.systemd and self.systemd.ready_sent)}
        return dump(self.fleet, self.tally, self.restarts.budget, self.book.previous, own, self.held)

    def _revive(self, carried: Carried) -> None:
        """The first thing a re-executed supervisor does, on the loop: its generations as they were."""
        state, own = carried.state, carried.state["supervisor"]
        revive.fleet(self.fleet, state, carried.listeners, self.reaper, self.events)
        revive.tally(self.tally, state["tally"])
        revive.budget(self.restarts.budget, state["budget"])
        self.started_at, self.started_wall, self.reexecs = own["started_at"], own["started_wall"], own["reexecs"]
        self.reaper.orphans_reaped += own["orphans_reaped"]
        if self.systemd is not None:
            self.systemd.ready_sent = own["ready_sent"]
        serving = self.fleet.serving
        pids = [instance.leader for generation in self.fleet.generations for instance in generation.instances]
        self.events.emit(Kind.REEXECUTED, f"re-executed in pid {os.getpid()}: supervise {own['version']} → "
                         f"{__version__}, {counted(len(self.fleet.generations), 'generation')} and "
                         f"{counted(len(pids), 'process')} carried over"
                         + (f", serving generation {serving.number}" if serving else ""),
                         gen=serving.number if serving else None, pids=pids, previous=own["version"],
                         version=__version__, reexecs=len(self.reexecs))

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
            unblock_signals()  # after a re-exec: what arrived during it is delivered now, to these handlers
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
