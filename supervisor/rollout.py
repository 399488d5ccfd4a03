"""The upgrade state machine: spawning → waiting-ready → watching → draining → idle, or rolling-back → idle.

New instances start in batches (one batch of N with --strategy surge). No old instance is told anything
until a new one has been ready and healthy for the whole watch window in its place, so the number of ready
instances never drops below N. A failure is rolled back the same way round: old instances first start again
and become ready, only then are the new ones drained — with one batch (surge), the old generation simply keeps
serving as if nothing had happened.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import anyio

from .acceptance import Proof, accept_probe
from .commands import CommandRunner
from .concurrency import first_completed, gather
from .config import Settings
from .counted import counted, inflected
from .cutover import Steering, admit, undrain
from .errors import UserError
from .event_kinds import Kind
from .events import Events
from .generation import Generation
from .health import watch
from .hook_env import hook_environment
from .identity import Identity
from .instance import Instance
from .listeners import Listener, ListenSpec
from .probes import Probe, Result, Route
from .readiness import Failed, start_cohort
from .release import Release
from .spawn import SpawnError, out_of_fds
from .states import FailureKind, Phase, RolloutResult, TrafficState
from .strategy import Strategy, drain_count


@dataclass(frozen=True)
class Plan:
    """What one upgrade deploys: the settings as just re-read, their probe, the resolved release, the listeners.

    It takes effect for the whole supervisor only if the upgrade is promoted.
    """

    settings: Settings
    probe: Probe
    release: Release
    listeners: tuple[Listener, ...]
    processes: int = 1
    unbound: tuple[ListenSpec, ...] = ()  # listeners a dry run would bind (a real upgrade has bound them)
    route: Route | None = None  # how a probe reaches the generation under test (traffic.py), where it can


class Host(Steering, Protocol):
    """What the rollout needs from the fleet that owns the generations (fleet.py; the fast layer fakes it)."""

    settings: Settings
    events: Events
    commands: CommandRunner

    def prepare(self, release: Release | None, dry_run: bool = False) -> Plan: ...
    async def identify(self, release: Release, fresh: bool = False) -> Identity: ...
    def refusal(self, release: Release, identity: Identity, force: bool) -> str | None: ...
    def create(self, plan: Plan) -> Generation: ...
    def spawn(self, generation: Generation, index: int) -> Instance: ...
    def announce_ready(self, generation: Generation, instance: Instance, result: Result, probe: Probe) -> None: ...
    def promote(self, generation: Generation, plan: Plan | None = None) -> None: ...
    async def changed_in_place(self, generation: Generation) -> str | None: ...
    def discard(self, plan: Plan) -> None: ...
    async def retire(self, generation: Generation, graceful: bool) -> list[int]: ...
    async def retire_instances(self, generation: Generation, instances: list[Instance]) -> None: ...
    async def restore(self, generation: Generation, count: int) -> None: ...


@dataclass
class Outcome:
    """How an upgrade ended, why, and how long each phase took (seconds since the upgrade began)."""

    result: RolloutResult
    reason: str = ""
    new_gen: int | None = None
    old_gen: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    kind: FailureKind | None = None  # what failed, when it was rolled back
    trigger: str = ""
    release: Release | None = None
    started_at: float = field(default_factory=time.time)
    identity: Identity | None = None  # the release's, once the outcome is recorded
    blame: str = ""  # whether a failure was pinned on the release (it became known bad), and why not
    output: tuple[str, ...] = ()  # the last lines the failed instance wrote (its reason quotes the last one)

    @property
    def promoted(self) -> bool:
        return self.result == RolloutResult.PROMOTED


@dataclass
class Rollout:
    """One upgrade from the serving generation to a new one. `state` is what status reports."""

    host: Host
    old: Generation | None
    trigger: str
    force: bool = False
    release: Release | None = None  # a given release (rollback, liveness) instead of resolving from disk
    plan: Plan | None = None
    state: Phase = Phase.IDLE
    new: Generation | None = None
    clock: Callable[[], float] = anyio.current_time  # what the phases are timed with
    began: float = field(init=False)
    timings: dict[str, float] = field(default_factory=dict)
    batches: list[int] = field(default_factory=list)  # sizes of the batches started so far
    replaced: int = 0  # living old instances drained because a new one took their place
    promoted: bool = False
    identity: Identity | None = None  # the new release's, once it is resolved
    _abort: anyio.Event = field(default_factory=anyio.Event)
    _abort_reason: str = ""

    def __post_init__(self) -> None:
        self.began = self.clock()

    @property
    def settings(self) -> Settings:
        """The settings this upgrade runs with: the re-read ones once prepared."""
        return self.plan.settings if self.plan else self.host.settings

    def _enter(self, state: Phase) -> None:
        previous, self.state = self.state, state
        generation = self.new or self.old
        self.host.events.emit(Kind.TRANSITION, f"upgrade: {previous} → {state}", level="debug",
                              gen=generation.number if generation else None, previous=previous, state=state,
                              elapsed=round(self.clock() - self.began, 6))

    def _mark(self, phase: str, again: bool = True) -> None:
        if again or phase not in self.timings:
            self.timings[phase] = round(self.clock() - self.began, 6)

    def _outcome(self, result: RolloutResult, reason: str = "", kind: FailureKind | None = None,
                 output: tuple[str, ...] = ()) -> Outcome:
        return Outcome(result, reason, self.new.number if self.new else None, self.old.number if self.old else None,
                       dict(self.timings), kind, self.trigger, self.release, identity=self.identity, output=output)

    def _named(self) -> dict[str, str | None]:
        """The release an event is about, by name (its version, else its digest) and version."""
        identity = self.identity
        return {"release": identity.name, "version": identity.version} if identity else {}

    def abort(self, reason: str) -> bool:
        """Roll back now (an operator's request); possible until the new generation is promoted."""
        if self.promoted or self.state in (Phase.IDLE, Phase.ROLLING_BACK):
            return False
        self._abort_reason = reason
        self._abort.set()
        return True

    async def run(self) -> Outcome:
        """Run the whole upgrade; never raises for a failed release — that is an Outcome."""
        self._enter(Phase.SPAWNING)
        try:
            self.plan = self.host.prepare(self.release)
            self.release = self.plan.release
            self.identity = await self.host.identify(self.release)
            refusal = self.host.refusal(self.release, self.identity, self.force)
        except SpawnError as exc:
            return await self._roll_back(f"exec failed: {exc}", FailureKind.EXEC_FAILED)
        except UserError as exc:
            refusal = str(exc)  # an invalid config: nothing was started, nothing changes
        except OSError as exc:
            if not out_of_fds(exc):
                raise
            refusal = f"the supervisor is out of file descriptors ({exc.strerror})"
        if refusal is None:
            failure = await self._hook("pre-upgrade", self.settings.hooks.pre_upgrade, self._hook_env(""))
            refusal = f"pre-upgrade hook {failure}" if failure else None
        if refusal:
            if self.plan is not None:
                self.host.discard(self.plan)  # listeners it bound for nothing
            self.host.events.emit(Kind.UPGRADE_REFUSED, f"upgrade refused: {refusal}", level="warning",
                                  gen=self.old.number if self.old else None, reason=refusal, **self._named())
            self._enter(Phase.IDLE)
            return self._outcome(RolloutResult.REFUSED, refusal)
        assert self.plan is not None  # no refusal: prepare() succeeded
        self.new = self.host.create(self.plan)
        try:
            which, _ = await first_completed(self._bring_up, self._abort.wait, self._casualty)
            if which == 1:
                raise Failed(self._abort_reason, FailureKind.OPERATOR)
        except Failed as failure:
            return await self._roll_back(failure.reason, failure.kind, failure.output)
        except OSError as exc:  # no fault of the release: it is not marked bad
            if not out_of_fds(exc):
                raise
            return await self._roll_back(f"the supervisor ran out of file descriptors ({exc.strerror})", FailureKind.RESOURCES)
        return await self._promote_and_drain()

    async def _casualty(self) -> None:
        """Wait for an instance of the new generation to die after it had been ready; that fails the upgrade."""
        assert self.new is not None
        await self.new.casualty.wait()
        assert self.new.lost is not None
        instance, status = self.new.lost
        where = "in watch window" if self.state == Phase.WATCHING else "after becoming ready"
        raise Failed.of(instance, f"{self._name(instance)}{status.describe()} {where}", FailureKind.EXITED)

    def _name(self, instance: Instance) -> str:
        """How a reason names an instance: not at all when a generation has one."""
        return f"instance {instance.index} " if self.plan and self.plan.processes > 1 else ""

    async def _bring_up(self) -> None:
        """Start new instances batch by batch until N are ready, draining an old one for each new one."""
        plan, new = self.plan, self.new
        assert plan is not None and new is not None
        step = await self._step(plan.processes)
        while (have := len(new.ready())) < plan.processes:
            ready = await self._batch(min(step, plan.processes - have))
            if len(new.ready()) < plan.processes:
                await self._replace_old(ready)

    async def _step(self, processes: int) -> int:
        """The batch size (see batch_step); a fallback to surge is said."""
        step, changed = await batch_step(self.host, self.old, self.settings.strategy, processes)
        if changed:
            self.host.events.emit(Kind.STRATEGY_FALLBACK, f"{changed}: batches could not be rolled back to it, so all "
                                  f"{counted(processes, 'new instance')} start at once (surge); deploy to release "
                                  "directories and flip a `current` link to upgrade in batches", level="warning",
                                  gen=self.old.number if self.old else None, reason=changed)
        return step

    async def _batch(self, size: int) -> list[Instance]:
        """Start `size` new instances and wait for them; raises Failed when fewer than --success-percent are ready."""
        plan, settings, new = self.plan, self.settings, self.new
        assert plan is not None and new is not None
        self.batches.append(size)
        self._enter(Phase.SPAWNING)

        def spawned() -> None:
            self._mark("spawned", again=False)
            self._enter(Phase.WAITING_READY)

        try:
            started = await start_cohort(self.host, new, new.free_indexes(size), plan.probe, settings.ready_timeout,
                                         settings.health_interval, strict=True, spawned=spawned)
        except SpawnError as exc:
            raise Failed(f"exec failed: {exc}" if exc.kind == FailureKind.EXEC_FAILED else str(exc), exc.kind) from None
        ready = started.ready
        needed = settings.strategy.required(size)
        if len(ready) < needed:
            _, instance, failure = next(iter(started.failed),
                                        (0, None, Failed("an instance died before it was ready", FailureKind.EXITED)))
            counts = f" ({len(ready)} of {size} ready, {needed} needed)" if size > 1 else ""
            raise Failed((self._name(instance) if instance else "") + failure.reason + counts, failure.kind,
                         failure.output)
        self._mark("ready")
        final = len(new.ready()) >= plan.processes
        await gather(partial(admit, self.host, new, self.old, final, settings.ramp, self.clock),
                     partial(self._watch, ready))
        return ready

    async def _watch(self, ready: list[Instance]) -> None:
        """The watch window of a batch: health checks, and proof that each new instance accepts connections."""
        plan, settings, new = self.plan, self.settings, self.new
        assert plan is not None and new is not None
        if settings.watch <= 0:
            return
        self._enter(Phase.WATCHING)
        beside = f" beside generation {self.old.number}" if self.old and self.old.alive else ""
        self.host.events.emit(Kind.WATCHING, f"watching generation {new.number} for {settings.watch:g}s{beside}",
                              gen=new.number, instances=[instance.index for instance in ready])
        proof = Proof(accept_probe(plan.listeners, settings.probe_timeout, plan.route), ready, settings.probe_timeout,
                      plan.processes > 1)
        await watch(plan.probe, new, settings.watch, settings.health_interval, settings.health_threshold, proof)

    async def _replace_old(self, ready: list[Instance]) -> None:
        """A batch is in: drain as many old instances as became ready — but only those above N: when the old
        generation was short (an instance it could not restart), new instances first fill the gap."""
        if self.old is None or self.new is None or self.plan is None:
            return
        order = self.old.drain_order()
        victims = order[:drain_count(len(ready), len(self.new.ready()), len(order), self.plan.processes)]
        self.replaced += sum(victim.alive for victim in victims)  # a rollback puts back what served, not the dead
        draining = (f"draining generation {self.old.number} {inflected('instance', len(victims))} {_indexes(victims)}"
                    if victims else
                    f"nothing drained: generation {self.old.number} had fewer than {self.plan.processes}")
        self.host.events.emit(Kind.BATCH, f"batch {len(self.batches)}: generation {self.new.number} "
                              f"{inflected('instance', len(ready))} {_indexes(ready)} ready; {draining}",
                              gen=self.old.number, pids=[v.leader for v in victims],
                              batch=len(self.batches), ready=[i.index for i in ready], draining=[v.index for v in victims])
        if victims:
            self._enter(Phase.DRAINING)
            with anyio.CancelScope(shield=True):  # an abort waits for the drain: the instance is already told to stop
                await self.host.retire_instances(self.old, victims)
            self.host.steer({self.old: TrafficState.ACTIVE})  # its share: what it has left
            await anyio.sleep(0)  # a checkpoint: an abort that came during the drain lands here, before a next batch

    async def _promote_and_drain(self) -> Outcome:
        settings, events = self.settings, self.host.events
        assert self.new is not None
        self.host.promote(self.new, self.plan)
        self.promoted = True
        self._mark("promoted")
        old_number = self.old.number if self.old else None
        events.emit(Kind.PROMOTED, f"generation {self.new.number} promoted"
                    + (f"; draining generation {old_number}" if old_number else ""),
                    gen=self.new.number, pids=self.new.pids(), old_gen=old_number, timings=dict(self.timings),
                    batches=list(self.batches), **self._named())
        self._enter(Phase.DRAINING)
        async with anyio.create_task_group() as group:
            # Its environment is taken now, before the old generation drains: the hook is told the old pids too.
            group.start_soon(self._hook, "post-upgrade", settings.hooks.post_upgrade, self._hook_env(""))
            if self.old is not None:
                await self.host.retire(self.old, graceful=True)
        self._mark("old_gone")
        self._enter(Phase.IDLE)
        return self._outcome(RolloutResult.PROMOTED)

    async def _roll_back(self, reason: str, kind: FailureKind, output: tuple[str, ...] = ()) -> Outcome:
        events = self.host.events
        self._enter(Phase.ROLLING_BACK)
        new_number = self.new.number if self.new else None
        old_number = self.old.number if self.old else None
        if self.new is not None:
            undrain(self.host, self.new, self.old)
            await self._restore_old()
        if self.plan is not None:
            self.host.discard(self.plan)
        self._mark("rolled_back")
        keeps = f"; generation {old_number} keeps serving" if self.old and self.old.alive else ""
        events.emit(Kind.ROLLED_BACK, f"upgrade to generation {new_number} rolled back: {reason}{keeps}", level="warning",
                    gen=new_number, old_gen=old_number, reason=reason, category=kind, timings=dict(self.timings),
                    restored=self.replaced, output=list(output), **self._named())
        await self._hook("on-rollback", self.settings.hooks.on_rollback, self._hook_env(reason, output))
        self._enter(Phase.IDLE)
        return self._outcome(RolloutResult.ROLLED_BACK, reason, kind, output)

    async def _restore_old(self) -> None:
        """Put back every old instance a batch replaced — each ready before a new one is drained — then drop the
        rest of the new generation. New instances are drained, not killed: they may be answering requests."""
        new = self.new
        assert new is not None
        await self.host.retire_instances(new, [instance for instance in new.current() if not instance.ready])
        owed = self.replaced  # old instances to put back
        surplus = len(new.ready()) - owed  # ready beside old ones that were never drained
        await self.host.retire_instances(new, new.ready()[:max(0, surplus)])
        step = self.settings.strategy.step(self.plan.processes if self.plan else 1)
        while self.old is not None and owed > 0 and new.ready():
            count = min(step, owed, len(new.ready()))
            self.host.events.emit(Kind.RESTORING, f"restoring {counted(count, 'instance')} of generation "
                                  f"{self.old.number} before draining as many of generation {new.number}",
                                  gen=self.old.number, count=count)
            await self.host.restore(self.old, count)
            owed -= count
            await self.host.retire_instances(new, new.ready()[:count])
        await self.host.retire(new, graceful=True)

    def _hook_env(self, reason: str, output: tuple[str, ...] = ()) -> dict[str, str]:
        return hook_environment(self.old, self.new, self.identity, reason, output)

    async def _hook(self, name: str, command: str | None, env: dict[str, str]) -> str | None:
        """Run one hook with `env` (from _hook_env) in its environment; returns why it failed, or None."""
        if not command:
            return None
        failure = await self.host.commands(command, {"SUPERVISE_HOOK": name, **env}, self.settings.hooks.timeout)
        level = "info" if failure is None else "warning"
        self.host.events.emit(Kind.HOOK, f"{name} hook " + ("succeeded" if failure is None else failure), level=level,
                              hook=name, failure=failure)
        return failure


async def batch_step(host: Host, old: Generation | None, strategy: Strategy, processes: int) -> tuple[int, str | None]:
    """How many new instances one batch starts, and why all start at once when the strategy asked for batches:
    batches are rolled back by starting old instances again, and if the old release's files were rewritten in
    place that would start the new code. The dry run asks the same."""
    step = strategy.step(processes)
    changed = await host.changed_in_place(old) if step < processes and old is not None else None
    return (processes, changed) if changed else (step, None)


def _indexes(instances: list[Instance]) -> str:
    return ",".join(str(instance.index) for instance in instances)
