"""The supervisor: owns the listeners and the generations, and turns signals into operations.

Operations (the first start, upgrades, replacing dead instances, scaling) run one at a time in a single task,
so the state machine is never entered twice. Signals, requests and exits only set flags and wake that task.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
import psutil
from anyio.abc import TaskGroup

from .commands import CommandRunner
from .concurrency import gather
from .config import Settings, reread
from .control.metrics import Tally, TimedProbe
from .credentials import Credentials
from .errors import UserError
from .events import Events
from .generation import Generation
from .history import History, Record
from .identity import Identity, identify
from .instance import DRAINING, SERVING, Instance, Launcher, notify_name
from .libc import release_free_memory
from .listener_guard import ListenerGuard
from .listeners import Listener, bind
from .notify import SystemdNotifier
from .probes import (
    DEFAULT_PROBE,
    NO_LISTENER_PROBE,
    Probe,
    Result,
    build_probe,
)
from .proctree import children, descendants
from .readiness import wait_all_ready
from .reaper import Reaper
from .release import Release, check_templates, next_release
from .rollout import (
    PROMOTED,
    ROLLED_BACK,
    Outcome,
    Plan,
    Rollout,
    Strikes,
    health_check,
)
from .spawn import SpawnError
from .triggers import ChangeTrigger
from .workers import Worker

if TYPE_CHECKING:
    from .control.server import ControlServer

_MAX_BACKOFF = 30.0
_FIRST_BACKOFF = 0.1
_REAPER_INTERVAL = 1.0
_RELEASE_AT_FAULT = ("exec-failed", "exited", "not-ready", "unhealthy")  # rollback kinds that mark a release bad
_FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
MAX_PROCESSES = 1024


class Fatal(Exception):
    """The supervisor cannot go on (the first generation cannot be executed, too many restarts)."""


@dataclass(eq=False)
class Ticket:
    """One request for an upgrade (or rollback); several coalesced requests share the rollout's verdict."""

    trigger: str
    force: bool = False
    release: Release | None = None
    coalesced: bool = False
    goal: str = PROMOTED  # the result that does what was asked (a rollback in a watch window asks for ROLLED_BACK)
    done: anyio.Event = field(default_factory=anyio.Event)
    outcome: Outcome | None = None

    def settle(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.done.set()

    def verdict(self) -> dict[str, Any]:
        """The last line of a streamed upgrade: how it ended."""
        outcome = self.outcome or Outcome("aborted", "no verdict")
        return {"event": "verdict", "result": outcome.result, "ok": outcome.result == self.goal, "reason": outcome.reason,
                "new_gen": outcome.new_gen, "old_gen": outcome.old_gen, "timings": outcome.timings, "blame": outcome.blame,
                "release": outcome.identity.as_dict() if outcome.identity else None}


@dataclass(eq=False)
class Supervisor:
    """Everything one running supervisor owns."""

    settings: Settings
    listeners: list[Listener]
    events: Events
    release: Release
    runtime_dir: str
    reaper: Reaper = field(default_factory=Reaper)
    generations: list[Generation] = field(default_factory=list)
    serving: Generation | None = None
    rollout: Rollout | None = None
    history: History = field(default_factory=History)
    control: ControlServer | None = None
    systemd: SystemdNotifier | None = None
    credentials: Credentials | None = None
    child_fd_limit: tuple[int, int] | None = None  # RLIMIT_NOFILE we were started with (we raised ours), for children
    next_number: int = 1
    stopping: bool = False
    forced: bool = False
    exit_code: int = 0
    pending: list[Ticket] = field(default_factory=list)
    tickets: list[Ticket] = field(default_factory=list)  # those the running rollout will answer
    previous_release: Release | None = None
    scaled: int | None = None  # `ctl scale N`: wins over --processes (and the config file) until the supervisor exits
    busy: str | None = None  # the operation running now: upgrade, repair
    failures: dict[int, deque[float]] = field(default_factory=dict)  # instance index → when it failed, in the window
    started_at: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    tally: Tally = field(default_factory=Tally)
    probe: Probe = field(init=False)
    commands: CommandRunner = field(init=False)
    workers: list[Worker] = field(init=False)
    guard: ListenerGuard = field(init=False)
    _identities: dict[Release, Identity] = field(init=False, default_factory=dict)  # for one upgrade
    _strikes: Strikes | None = field(init=False, default=None)
    _wakeup: anyio.Event = field(init=False)
    _replan: anyio.Event = field(init=False)  # set by a scale or upgrade request: a retry's backoff ends early
    _operations: anyio.CancelScope = field(init=False)
    _drain: anyio.CancelScope | None = field(init=False, default=None)
    _group: TaskGroup = field(init=False)
    _lenient_logged: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.commands = CommandRunner(self.reaper, os.environ, self.release.cwd, self.child_fd_limit)
        self.probe = self._build_probe(self.settings, self.listeners)
        self.events.subscribe(self.tally.on_event)
        self.guard = ListenerGuard(self.events, self._all_listeners, lambda: [gen.number for gen in self.generations])
        self.workers = [
            Worker("liveness", self.settings.health_interval, self._check_liveness),
            Worker("reaper", _REAPER_INTERVAL, self._sweep),
        ]
        if self.systemd is not None:
            self.events.subscribe(self.systemd.on_event)
            interval = self.systemd.watchdog_interval(os.environ)
            if interval:
                self.workers.append(Worker("watchdog", interval, self.systemd.ping))

    def _build_probe(self, settings: Settings, listeners: Sequence[Listener]) -> Probe:
        tcp = [listener for listener in listeners if listener.kind == "tcp"]
        return TimedProbe(build_probe(
            settings.ready or (DEFAULT_PROBE if tcp else NO_LISTENER_PROBE),
            tcp[0].probe_address() if tcp else None,
            {port for listener in tcp if (port := listener.tcp_port) is not None},
            settings.probe_timeout,
            self.commands,
            self._lenient_probe_used,
        ), self.tally)

    # -- running ----------------------------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until told to stop (exit 0) or until supervision is impossible (exit non-zero)."""
        self._wakeup = anyio.Event()
        self._replan = anyio.Event()
        self._operations = anyio.CancelScope()
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                group.start_soon(self.reaper.run)
                group.start_soon(self._receive_signals)
                group.start_soon(self.guard.watch_hangups, _REAPER_INTERVAL)
                for worker in self.workers:
                    group.start_soon(worker.run)
                if self.control is not None:
                    group.start_soon(self.control.serve)
                if self.settings.upgrade_on_change:
                    trigger = ChangeTrigger(self.settings.upgrade_on_change, self.settings.change_settle,
                                            lambda what: self.request_upgrade(what))
                    group.start_soon(trigger.run)
                with self._operations:
                    await self._operate()
                await self._shutdown()
                group.cancel_scope.cancel()
        finally:
            for generation in self.generations:
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
            await self._bring_up(self.release, first=True)
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
        except Fatal as exc:
            self.events.emit("fatal", str(exc), level="error")
            self.exit_code = 1
            self.stopping = True

    @property
    def upgrade_pending(self) -> bool:
        return bool(self.pending)

    @property
    def processes(self) -> int:
        """How many instances the serving generation should have."""
        return self.scaled or self.settings.processes

    @property
    def upgrade_first(self) -> bool:
        """An upgrade is pending while some instance of the serving generation is ready: it goes before a repair
        (it replaces every instance anyway, and it may be the fix for one that keeps failing)."""
        return self.upgrade_pending and self.serving is not None and bool(self.serving.ready())

    @property
    def needs_repair(self) -> bool:
        """The serving generation has a dead or sick instance, or not the number of instances asked for."""
        serving = self.serving
        return serving is None or bool(serving.failing()) or len(serving.current()) != self.processes

    async def _next_operation(self) -> None:
        """Wait until an upgrade is requested, an instance dies or the number of instances is changed."""
        while not (self.upgrade_pending or self.needs_repair):
            self._wakeup = anyio.Event()
            await self._wakeup.wait()

    # -- operations -------------------------------------------------------------------------------------------

    def request_upgrade(self, trigger: str, force: bool = False, release: Release | None = None) -> Ticket | None:
        """Ask for an upgrade. Requests during an upgrade coalesce into one more; none are taken once stopping."""
        if self.stopping:
            self.events.emit("upgrade-ignored", f"upgrade request ({trigger}) ignored: stopping", level="warning")
            return None
        ticket = Ticket(trigger, force, release, coalesced=self.upgrade_pending)
        if ticket.coalesced:
            self.events.emit("upgrade-coalesced", f"upgrade request ({trigger}) coalesced with the pending one", level="debug")
        else:
            self.events.emit("upgrade-requested", f"upgrade requested ({trigger})", trigger=trigger)
            self._wakeup.set()
            self._replan_now()
        self.pending.append(ticket)
        return ticket

    def request_scale(self, processes: int) -> str:
        """Change the number of instances: new ones start and must become ready, extra ones drain. Applied now,
        or right after an upgrade in progress (which deploys the number it started with)."""
        if not 1 <= processes <= MAX_PROCESSES:
            raise UserError(f"cannot scale to {processes}: the number of instances must be from 1 to {MAX_PROCESSES}")
        if self.stopping:
            raise UserError("cannot scale: the supervisor is stopping")
        previous, self.scaled = self.processes, processes
        when = " after the upgrade in progress" if self.rollout is not None else ""
        self.events.emit("scale-requested", f"scaling from {previous} to {processes} instances{when}",
                         gen=self.serving.number if self.serving else None, previous=previous, processes=processes)
        self._wakeup.set()
        self._replan_now()
        return f"scaling from {previous} to {processes} instances{when}"

    def _replan_now(self) -> None:
        """A retry waiting out its backoff looks again at once: is its index still wanted, is an upgrade due?"""
        self._replan.set()
        self._replan = anyio.Event()

    def request_rollback(self) -> Ticket | None:
        """In a watch window: drop the new generation. Otherwise: start the previous generation's exact release."""
        if self.rollout is not None and self.rollout.abort("rolled back by operator"):
            ticket = Ticket("ctl rollback", goal=ROLLED_BACK)
            self.tickets.append(ticket)
            return ticket
        if self.previous_release is None:
            return None
        return self.request_upgrade("ctl rollback", force=True, release=self.previous_release)

    async def _upgrade(self) -> Outcome:
        tickets, self.pending, self._wakeup = self.pending, [], anyio.Event()
        self.tickets = tickets
        trigger = ", ".join(dict.fromkeys(ticket.trigger for ticket in tickets))
        release = next((ticket.release for ticket in reversed(tickets) if ticket.release), None)
        self.rollout = Rollout(self, self.serving, trigger, force=any(ticket.force for ticket in tickets), release=release)
        outcome = Outcome("aborted", "the supervisor is stopping", trigger=trigger)
        self.history.begin(trigger, self.serving.number if self.serving else None, self.next_number)
        try:
            outcome = await self.rollout.run()
            await self._record(outcome)
        except Fatal:
            raise  # restoring old instances failed past --max-restarts: our own manager must act
        except Exception as exc:  # noqa: BLE001 - a bug here must never take the serving generation down
            outcome = await self._contain(self.rollout, exc)
        finally:
            self.history.finish()
            self.rollout = None
            for ticket in self.tickets:
                ticket.settle(outcome)
            self.tickets = []
            self._identities.clear()
        return outcome

    async def _contain(self, rollout: Rollout, exc: Exception) -> Outcome:
        """An internal error in a rollout: remove its new generation and keep the old one serving."""
        self.events.emit("internal-error", f"internal error during upgrade ({type(exc).__name__}: {exc}); keeping "
                         "one serving generation", level="error",
                         traceback="".join(traceback.format_exception(exc)))
        new, old = rollout.new, rollout.old
        numbers = (new.number if new else None, old.number if old else None)
        if new is not None and new is self.serving:  # already promoted: it stays; the old one must still go
            if old is not None and old in self.generations:
                await self.retire(old, graceful=True)
            return Outcome(PROMOTED, f"internal error after promotion: {exc}", *numbers, trigger=rollout.trigger)
        if new is not None:
            await self.retire(new, graceful=True)
        return Outcome(ROLLED_BACK, f"internal error: {exc}", *numbers, kind="internal", trigger=rollout.trigger)

    async def _record(self, outcome: Outcome) -> None:
        """Keep the rollout in the history; a release that failed by its own fault becomes known bad — unless it
        cannot be told apart from the serving or last known good release (the log and the verdict say so)."""
        if outcome.identity is None and outcome.release is not None:
            outcome.identity = await self.identify(outcome.release)
        identity = outcome.identity
        bad = None
        if identity is not None and outcome.result == ROLLED_BACK and outcome.kind in _RELEASE_AT_FAULT:
            serving = self.serving.identity if self.serving else None
            if self.serving is not None and serving is None:
                serving = await self.identify(self.serving.release)
            bad, outcome.blame = self.history.blame(identity, serving)
            self.events.emit("release-known-bad" if bad else "release-not-blamed", outcome.blame,
                             level="warning" if bad else "info", gen=outcome.new_gen, release=identity.as_dict())
        self.history.add(Record(outcome.result, outcome.reason, outcome.trigger, outcome.new_gen, outcome.old_gen,
                                outcome.started_at, outcome.timings, identity.as_dict() if identity else None,
                                outcome.blame), bad)

    async def identify(self, release: Release, fresh: bool = False) -> Identity:
        """The release's identity (identity.py), computed off the event loop; kept for the rest of the upgrade."""
        if fresh or release not in self._identities:
            self._identities[release] = await anyio.to_thread.run_sync(identify, release)
        return self._identities[release]

    async def _bring_up(self, release: Release, first: bool = False) -> Generation:
        """Start a generation of `release` and wait until all its instances are ready (each retried with backoff);
        it becomes the serving generation."""
        await self.identify(release)  # before it starts: a deploy racing its start must not be taken for it
        generation = self.create(Plan(self.settings, self.probe, release, tuple(self.listeners), self.processes))
        await self._fill(generation, generation.free_indexes(self.processes), first=first)
        self.promote(generation)
        self.events.emit("serving", f"generation {generation.number} serving", gen=generation.number, pids=generation.pids())
        return generation

    async def _fill(self, generation: Generation, indexes: Sequence[int], first: bool = False,
                    repair: bool = False) -> None:
        """Start an instance at each index and wait until all are ready; those that fail are started again after
        the backoff (--max-restarts counts each), as long as their index is still wanted. A `repair` gives up
        its indexes to a pending upgrade while other instances serve: the upgrade replaces them all."""
        pending = list(indexes)
        while True:
            pending = [index for index in pending if generation is not self.serving or index < self.processes]
            if repair and pending and self.upgrade_first:
                self.events.emit("repair-deferred", f"generation {generation.number}: not starting instance(s) "
                                 f"{', '.join(map(str, pending))} again: the pending upgrade replaces every instance",
                                 gen=generation.number, instances=pending)
                return
            if not pending:
                return
            started: list[Instance] = []
            unstarted: list[int] = []
            reasons: list[tuple[int, str]] = []
            for index in pending:
                try:
                    started.append(self.spawn(generation, index))
                except SpawnError as exc:
                    if first:
                        raise Fatal(str(exc)) from None
                    unstarted.append(index)
                    reasons.append((index, str(exc)))
            failed = await wait_all_ready(self.probe, started, self.settings.ready_timeout, self.settings.health_interval,
                                          lambda instance, result: self.announce_ready(generation, instance, result,
                                                                                       self.probe))
            await self.retire_instances(generation, list(failed))
            reasons.extend((instance.index, f"{self._label(instance)} {failure}") for instance, failure in failed.items())
            pending = unstarted + [instance.index for instance in failed]
            if reasons:
                await self._failed(reasons)

    async def _repair(self) -> None:
        """Bring the serving generation back to N healthy instances: each dead or sick one replaced alone (after
        the backoff; then it is drained, or what is left of its tree cleared away), missing ones started, extra ones
        (after `ctl scale` down) drained."""
        generation = self.serving
        if generation is None:
            await self._bring_up(self.release)
            return
        current = sorted(generation.current(), key=lambda instance: (not instance.alive, instance.index))
        keep, extra = current[:self.processes], current[self.processes:]
        missing = generation.free_indexes(self.processes - len(keep)) if len(keep) < self.processes else []
        jobs = [partial(self._replace, generation, instance) for instance in keep if instance in generation.failing()]
        if extra:
            jobs.append(partial(self.retire_instances, generation, extra))
        if missing:
            jobs.append(partial(self._fill, generation, missing, repair=True))
        await gather(*jobs)
        ready = len(generation.ready())
        self.events.emit("serving", f"generation {generation.number} serving"
                         + (f" with {ready} instances" if ready != 1 or self.processes != 1 else ""),
                         gen=generation.number, pids=generation.pids(), processes=ready)

    async def _replace(self, generation: Generation, failing: Instance) -> None:
        """A serving instance died or is sick: start its index again (the others keep serving), then drain it or
        clear what is left of its tree."""
        if failing.alive:
            status = f"unhealthy ({failing.sick})"
        else:
            status = failing.exit_status.describe() if failing.exit_status else "gone"
        await self._failed([(failing.index, f"{self._label(failing)} {status}")])
        await self._fill(generation, [failing.index], repair=True)
        await self.retire_instances(generation, [failing])

    def _label(self, instance: Instance) -> str:
        """`generation 3`, or `generation 3 instance 1` when there are several."""
        several = self.processes > 1 or instance.index > 0
        return f"generation {instance.number}" + (f" instance {instance.index}" if several else "")

    async def _failed(self, reasons: list[tuple[int, str]]) -> None:
        """Count the failures (instance index, reason) and wait the longest backoff delay. Past --max-restarts in
        the window: give up if nothing is serving any more (our own manager must act), else keep retrying at the
        longest delay — exiting would take down the instances that still serve. A `ctl scale` or an upgrade request
        cuts the wait short."""
        delay = 0.0
        for index, reason in reasons:
            delay = max(delay, self._count_failure(index, reason))
        replan = self._replan
        with anyio.move_on_after(delay):
            await replan.wait()

    def _count_failure(self, index: int, reason: str) -> float:
        """Count one failure of instance `index` in the window and say what happens next; the backoff delay, or
        Fatal. Each index counts on its own, as a single child would: instances that die together (a dependency
        went away) each get their restarts, rather than N of them using up one budget at once."""
        now = time.monotonic()
        failures = self.failures.setdefault(index, deque())
        failures.append(now)
        while failures and now - failures[0] > self.settings.restart_window:
            failures.popleft()
        count, window = len(failures), self.settings.restart_window
        serving = len(self.serving.ready()) if self.serving else 0
        if count > self.settings.max_restarts and not serving:
            raise Fatal(f"giving up: {count} failures within {window:g}s (last: {reason})")
        if count > self.settings.max_restarts:
            self.events.emit("restarting", f"{reason}; retrying in {_MAX_BACKOFF:g}s: {count} failures within "
                             f"{window:g}s is past --max-restarts {self.settings.max_restarts}, but {serving} "
                             "instance(s) keep serving", level="warning", delay=_MAX_BACKOFF, reason=reason,
                             crash_loop=True)
            return _MAX_BACKOFF
        delay = min(_MAX_BACKOFF, _FIRST_BACKOFF * 2 ** (count - 1))
        self.events.emit("restarting", f"{reason}; restarting in {delay:g}s (failure {count} of at most "
                         f"{self.settings.max_restarts} within {window:g}s)", level="warning", delay=delay, reason=reason)
        return delay

    # -- the rollout's host interface -------------------------------------------------------------------------

    def prepare(self, release: Release | None) -> Plan:
        """What the next upgrade deploys: the config file read again (if any), listeners it adds bound, the
        command resolved on disk again (a replaced binary or flipped symlink is picked up) — or `release` as given."""
        self._identities.clear()  # a deploy may have rewritten the files of an identical-looking release
        try:
            settings = reread(self.settings)
            listeners = self._listeners_for(settings)
        except UserError as exc:
            raise UserError(f"invalid config: {exc}") from None
        try:
            check_templates(settings.command, [listener.name for listener in listeners])
            probe = self._build_probe(settings, listeners)
        except UserError as exc:
            self._close_unused(listeners)
            raise UserError(f"invalid config: {exc}") from None
        if release is None:
            try:
                release = next_release(settings, self.release)
            except SpawnError:
                self._close_unused(listeners)
                raise
        return Plan(settings, probe, release, listeners, self.scaled or settings.processes)

    def _listeners_for(self, settings: Settings) -> tuple[Listener, ...]:
        """The listeners `settings` asks for: the ones we hold are reused, new ones bound now."""
        held = {listener.spec: listener for listener in self._all_listeners() if listener.spec is not None}
        chosen = []
        try:
            for spec in settings.listen:
                chosen.append(held.get(spec) or bind(spec, settings.backlog, settings.nodelay, settings.unix_mode))
        except UserError:
            for listener in chosen:
                if listener not in held.values():
                    listener.close()
            raise
        chosen.extend(listener for listener in self.listeners if listener.spec is None)  # adopted, never in a file
        return tuple(chosen)

    def _all_listeners(self) -> list[Listener]:
        found = list(self.listeners)
        for generation in self.generations:
            found.extend(listener for listener in generation.listeners if listener not in found)
        return found

    def discard(self, plan: Plan) -> None:
        """An upgrade that was not promoted: close listeners it bound that nothing uses."""
        self._close_unused(plan.listeners)

    def _close_unused(self, candidates: Sequence[Listener]) -> None:
        in_use = set(self.listeners)
        for generation in self.generations:
            in_use.update(generation.listeners)
        for listener in candidates:
            if listener not in in_use and listener.sock.fileno() != -1:
                self.events.emit("listener-closed", f"closed listener {listener.name} ({listener.address}): no "
                                 "generation uses it any more", name=listener.name, address=listener.address)
                listener.close()

    def refusal(self, release: Release, identity: Identity, force: bool) -> str | None:
        """Why an upgrade to `release` must not run, or None: it is known bad (unless forced)."""
        if force or not self.history.is_known_bad(identity):
            return None
        return (f"release {identity.name} ({release.describe()}) is known bad: it was rolled back before, and nothing "
                f"it is told by has changed since ({identity.covers}); deploy a fixed release, or force it "
                "(supervise ctl upgrade --force)")

    def create(self, plan: Plan) -> Generation:
        """The next generation, as `plan` says; its instances are started one by one with spawn()."""
        number, self.next_number = self.next_number, self.next_number + 1
        launcher = Launcher(self.runtime_dir, self.reaper, self.events, self.credentials, self.child_fd_limit)
        generation = Generation(number, plan.release, plan.listeners, launcher, identity=self._identities.get(plan.release))
        self.generations.append(generation)
        return generation

    def spawn(self, generation: Generation, index: int) -> Instance:
        """Start instance `index` of `generation` and watch its exit; raises SpawnError if it cannot start."""
        self.guard.check()  # a socket an earlier child shut down would fail this instance's readiness
        instance = generation.spawn(index)
        release = generation.release
        self.events.emit("spawned", f"{self._label(instance)} started: {release.describe()}", gen=generation.number,
                         pids=(instance.leader,), instance=index, argv=list(release.argv), executable=release.executable,
                         cwd=release.cwd, release=generation.identity.name if generation.identity else None)
        self._group.start_soon(self._report_exit, generation, instance)
        return instance

    def announce_ready(self, generation: Generation, instance: Instance, result: Result, probe: Probe) -> None:
        """An instance proved ready: record it (when READY=1 arrived, if that proved it) and say so. In the serving
        generation (a replacement, a restored or added instance) it serves at once."""
        elapsed = instance.mark_ready(result.detail, probe.spec.kind == "notify")
        generation.mark_ready()
        if generation.state == SERVING:
            instance.state = SERVING
        self.events.emit("ready", f"{self._label(instance)} ready after {elapsed:.3f}s ({result.detail})",
                         gen=generation.number, pids=instance.pids(), instance=instance.index, elapsed=round(elapsed, 6),
                         probe=result.detail)

    async def restore(self, generation: Generation, count: int) -> None:
        """Start `count` more instances of an old generation (a rollback putting back what a batch replaced)."""
        await self._fill(generation, generation.free_indexes(count))

    def promote(self, generation: Generation, plan: Plan | None = None) -> None:
        """Make `generation` the one that serves (signals are forwarded to it, it is replaced if it dies); the
        settings it was deployed with become the supervisor's."""
        if self.serving is not None and self.serving.release != generation.release:
            self.previous_release = self.serving.release
        if plan is not None:
            self.settings, self.probe, self.release = plan.settings, plan.probe, plan.release
            self.listeners = list(plan.listeners)
        self.serving = generation
        generation.serve()
        if generation.identity is not None:
            self.history.good(generation.identity)

    async def changed_in_place(self, generation: Generation) -> str | None:
        """Whether the files of a generation's release were rewritten since it was promoted — then starting it
        again would run something else — and how, for the log."""
        if generation.identity is None:
            return None
        now = await self.identify(generation.release, fresh=True)
        if now.same_code(generation.identity):
            return None
        return (f"the files of generation {generation.number} ({generation.release.describe()}) changed in place "
                f"since it started (identity {generation.identity.name} → {now.name})")

    async def retire(self, generation: Generation, graceful: bool) -> list[int]:
        """Stop every instance of a generation: drain (signal, wait, kill the rest) or kill at once; then forget it."""
        began = time.monotonic()
        self._adopt_orphans()  # a process whose parent died since the last scan is still this generation's
        if graceful and generation.living():
            self.events.emit("draining", f"draining generation {generation.number} ({self.settings.drain_signal.name}, up "
                             f"to {self.settings.drain_timeout:g}s)", gen=generation.number, pids=generation.pids(fresh=True))
        killed: list[int] = []

        async def stop(instance: Instance) -> None:
            killed.extend(await self._stop(instance, graceful))

        await gather(*(partial(stop, instance) for instance in list(generation.instances)))
        elapsed = time.monotonic() - began
        if killed and graceful:
            self.events.emit("drain-timeout", f"generation {generation.number} still running after "
                             f"{self.settings.drain_timeout:g}s: killed pids {', '.join(map(str, sorted(killed)))}",
                             level="warning", gen=generation.number, pids=sorted(killed))
        generation.close()
        if generation in self.generations:
            self.generations.remove(generation)
        if self.serving is generation:
            self.serving = None
        self._close_unused(generation.listeners)
        self.events.emit("retired", f"generation {generation.number} gone after {elapsed:.3f}s", gen=generation.number,
                         elapsed=round(elapsed, 6), killed=sorted(killed))
        return killed

    async def retire_instances(self, generation: Generation, instances: list[Instance]) -> None:
        """Drain some instances of a generation (the others keep serving), each killed after --drain-timeout."""
        self._adopt_orphans()

        async def retire_one(instance: Instance) -> None:
            began = time.monotonic()
            if instance.living():
                self.events.emit("draining", f"draining {self._label(instance)} ({self.settings.drain_signal.name}, up to "
                                 f"{self.settings.drain_timeout:g}s)", gen=instance.number, instance=instance.index,
                                 pids=instance.pids(fresh=True))
            killed = await self._stop(instance, graceful=True)
            if killed:
                self.events.emit("drain-timeout", f"{self._label(instance)} still running after "
                                 f"{self.settings.drain_timeout:g}s: killed pids {', '.join(map(str, killed))}",
                                 level="warning", gen=instance.number, instance=instance.index, pids=killed)
            generation.forget(instance)
            self.events.emit("instance-retired", f"{self._label(instance)} gone after {time.monotonic() - began:.3f}s",
                             gen=instance.number, instance=instance.index, elapsed=round(time.monotonic() - began, 6))

        await gather(*(partial(retire_one, instance) for instance in instances))

    async def _stop(self, instance: Instance, graceful: bool) -> list[int]:
        """Drain one instance's tree, or kill it now; the pids that had to be killed."""
        if graceful and instance.living():
            return await instance.drain(self.settings.drain_signal, self.settings.drain_timeout)
        instance.state = DRAINING
        killed = instance.kill()
        await instance.wait_gone(5.0)
        return killed

    # -- stopping ---------------------------------------------------------------------------------------------

    def stop(self, reason: str) -> None:
        """Graceful stop: abort any upgrade, drain every generation, exit 0."""
        if self.stopping:
            return
        self.stopping = True
        self.events.emit("stopping", f"stopping ({reason}): draining every generation", reason=reason)
        self._operations.cancel()

    def force(self, reason: str) -> None:
        """Immediate stop: kill every generation's whole tree now."""
        self.forced = self.stopping = True
        self.events.emit("stopping", f"stopping now ({reason}): killing every generation", reason=reason, forced=True)
        self._operations.cancel()
        if self._drain is not None:
            self._drain.cancel()

    async def _shutdown(self) -> None:
        self.stopping = True
        for ticket in self.pending:
            ticket.settle(Outcome("aborted", "the supervisor is stopping"))
        self.pending = []
        with anyio.CancelScope(shield=True):
            if not self.forced:
                with anyio.CancelScope() as self._drain:
                    async with anyio.create_task_group() as group:
                        for generation in list(self.generations):
                            group.start_soon(self.retire, generation, True)
            for generation in list(self.generations):
                await self.retire(generation, graceful=False)
            self._kill_descendants()
        self.events.emit("stopped", "stopped" + (" (forced)" if self.forced else ""), exit_code=self.exit_code)

    def _kill_descendants(self) -> None:
        """Last sweep at exit: every generation is gone, so any process still below us is a leftover."""
        for process in descendants(psutil.Process()):
            try:
                process.kill()
            except psutil.Error:
                continue
            self.events.emit("leftover-killed", f"killed pid {process.pid}: still running after every generation was stopped",
                             level="warning", pids=(process.pid,))
        self.reaper.reap()

    # -- background duties ------------------------------------------------------------------------------------

    async def _receive_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, *_FORWARDED) as received:
            async for signum in received:
                self._on_signal(signal.Signals(signum))

    def _on_signal(self, signum: signal.Signals) -> None:
        if signum == signal.SIGHUP:
            self.request_upgrade("SIGHUP")
        elif signum == signal.SIGQUIT or (signum == signal.SIGINT and self.stopping):
            self.force(signum.name if signum == signal.SIGQUIT else "second SIGINT")
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.stop(signum.name)
        else:
            self.forward(signum)

    def forward(self, signum: signal.Signals) -> bool:
        """Pass a signal on to the serving generation's process group."""
        target = self.serving
        if target is None or not target.alive:
            self.events.emit("signal-dropped", f"{signum.name} not forwarded: no generation is serving", level="warning")
            return False
        target.signal_group(signum)
        leaders = [instance.leader for instance in target.instances if instance.alive]
        self.events.emit("signal-forwarded", f"forwarded {signum.name} to generation {target.number}", gen=target.number,
                         pids=leaders, signal=signum.name)
        return True

    async def _report_exit(self, generation: Generation, instance: Instance) -> None:
        status = await instance.exit.wait()
        expected = not generation.exited(instance, status) or self.stopping
        self.events.emit("exited", f"{self._label(instance)} {status.describe()}" + ("" if expected else " unexpectedly"),
                         level="info" if expected else "warning", gen=generation.number, pids=(instance.leader,),
                         instance=instance.index, code=status.code, signal=status.signal, expected=expected)
        self._wakeup.set()

    async def _sweep(self) -> None:
        """The reaper worker: reap zombies, keep process trees current, clear leftovers and stale socket files."""
        self.reaper.reap()
        self.guard.check()  # listening, and with the backlog it had? (a hangup is seen at once by watch_hangups)
        for generation in self.generations:
            generation.refresh()
        self._adopt_orphans()
        live = {notify_name(generation.number, instance.seq) for generation in self.generations
                for instance in generation.instances}
        for entry in os.scandir(self.runtime_dir):
            if entry.name.endswith(".notify") and entry.name not in live:
                os.unlink(entry.path)

    async def _check_liveness(self) -> None:
        """The liveness worker: health-check the serving generation when nothing else is going on. After
        --health-threshold failures in a row of one instance, that instance is replaced beside its siblings; a
        generation of one is replaced through the zero-downtime upgrade path (with its watch window)."""
        target = self.serving
        if target is None or self.busy or self.upgrade_pending or self.stopping or not target.ready():
            self._strikes = None
            return
        if self._strikes is None or self._strikes.generation is not target:
            self._strikes = Strikes(target, self.settings.health_threshold)
        result = await health_check(self.probe, target)
        failure = self._strikes.record(result)
        owner = target.owner(result.pid)
        if failure and self.serving is target and owner is not None and len(target.current()) > 1:
            owner.sick = failure  # replaced beside its siblings by the repair operation, never killed first
            self.events.emit("unhealthy", f"{self._label(owner)} failed its health checks ({failure}): replacing it",
                             level="warning", gen=target.number, instance=owner.index, pids=(owner.leader,),
                             reason=failure)
            self._wakeup.set()
        elif failure and self.serving is target:
            self._strikes = None
            self.events.emit("unhealthy", f"generation {target.number} failed its health checks ({failure}): "
                             "replacing it", level="warning", gen=target.number, reason=failure)
            self.request_upgrade(f"liveness: {result.detail}", force=True, release=target.release)

    def _adopt_orphans(self) -> None:
        """Processes re-parented to us (we are their subreaper) go back to the generation their environment names.

        One whose generation is already finished must not outlive it: it is killed here.
        """
        known = set(self.reaper.children)
        for generation in self.generations:
            known.update(generation.members)
        try:
            ours = children(psutil.Process())
        except OSError:  # out of fds: /proc cannot be read now; the next sweep looks again
            return
        for process in ours:
            if process.pid in known:
                continue
            try:
                environ = process.environ()
            except psutil.Error:
                continue
            number, index = environ.get("SUPERVISE_GENERATION", ""), environ.get("SUPERVISE_INSTANCE", "0")
            owner = next((instance for generation in self.generations if str(generation.number) == number
                          for instance in sorted(generation.instances, key=lambda item: item.alive)
                          if str(instance.index) == index), None)  # a dead instance's first: its orphans outlived it
            if owner is not None:
                owner.remember(process.pid)
                owner.refresh()
            elif number.isdigit() and int(number) < self.next_number:
                self._kill_leftover(process, int(number))

    def _kill_leftover(self, process: psutil.Process, number: int) -> None:
        try:
            for member in [*process.children(recursive=True), process]:
                member.kill()
        except psutil.Error:
            return
        self.events.emit("leftover-killed", f"killed pid {process.pid}: left over from finished generation {number}",
                         level="warning", gen=number, pids=(process.pid,))

    def _lenient_probe_used(self, number: int) -> None:
        if not self._lenient_logged:
            self._lenient_logged = True
            self.events.emit("probe-lenient", f"generation {number} answers 404 on {self.probe.spec.path}: no readiness "
                             "endpoint, so an answer from it counts as ready (pass --ready to be strict)", gen=number)
