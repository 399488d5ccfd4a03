"""The upgrade state machine: spawning → waiting-ready → watching → draining → idle, or rolling-back → idle.

The old generation is never told anything until the new one has been ready and healthy for the whole watch
window, so every failure before draining is rolled back by killing the new generation alone: the old one keeps
serving as if nothing had happened.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import anyio

from .commands import CommandRunner
from .concurrency import first_completed
from .config import Settings
from .errors import UserError
from .events import Events
from .generation import Generation
from .listeners import Listener
from .probes import Probe, Result, Verdict, nothing_yet
from .release import Release
from .spawn import SpawnError

IDLE, SPAWNING, WAITING_READY, WATCHING, DRAINING, ROLLING_BACK = (
    "idle", "spawning", "waiting-ready", "watching", "draining", "rolling-back")
PROMOTED, ROLLED_BACK, REFUSED = "promoted", "rolled-back", "refused"
_FIRST_POLL = 0.01
_FIRST_RETRY = 0.001
_MAX_RETRY = 0.02
_INCONCLUSIVE_RETRIES = 20


@dataclass(frozen=True)
class Plan:
    """What one upgrade deploys: the settings as just re-read, their probe, the resolved release, the listeners.

    It takes effect for the whole supervisor only if the upgrade is promoted.
    """

    settings: Settings
    probe: Probe
    release: Release
    listeners: tuple[Listener, ...]


class Host(Protocol):
    """What the rollout needs from the supervisor that owns the generations."""

    settings: Settings
    events: Events
    commands: CommandRunner

    def prepare(self, release: Release | None) -> Plan: ...
    def refusal(self, release: Release, force: bool) -> str | None: ...
    def launch(self, plan: Plan) -> Generation: ...
    def promote(self, generation: Generation, plan: Plan | None = None) -> None: ...
    def discard(self, plan: Plan) -> None: ...
    async def retire(self, generation: Generation, graceful: bool) -> list[int]: ...


@dataclass
class Outcome:
    """How an upgrade ended, why, and how long each phase took (seconds since the upgrade began)."""

    result: str
    reason: str = ""
    new_gen: int | None = None
    old_gen: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    kind: str = ""
    trigger: str = ""
    release: Release | None = None
    started_at: float = field(default_factory=time.time)

    @property
    def promoted(self) -> bool:
        return self.result == PROMOTED


class Failed(Exception):
    """The new generation failed: `reason` for people, `kind` (exec-failed, exited, not-ready, unhealthy,
    operator) for metrics and for deciding whether the release is to blame."""

    def __init__(self, reason: str, kind: str) -> None:
        super().__init__(reason)
        self.reason, self.kind = reason, kind


async def wait_ready(probe: Probe, generation: Generation, timeout: float, max_interval: float) -> Result:
    """Probe until ready (fast at first, backing off to `max_interval`), the generation exits, or time is up.

    Raises Failed with the reason when it does not become ready.
    """
    last = nothing_yet(probe.spec)

    async def poll() -> Result:
        nonlocal last
        delay, quick = _FIRST_POLL, _FIRST_RETRY
        while True:
            result = await probe.check(generation)
            if result.ready:
                return result
            last = result
            if result.verdict is Verdict.INCONCLUSIVE:
                # The old generation took the probe connection: not a failure, try again soon on a new one.
                await anyio.sleep(quick)
                quick = min(quick * 2, _MAX_RETRY)
                continue
            quick = _FIRST_RETRY
            await anyio.sleep(delay)
            delay = min(delay * 2, max_interval)

    with anyio.move_on_after(timeout):
        which, value = await first_completed(poll, generation.exit.wait)
        if which == 1:
            raise Failed(f"{value.describe()} during readiness", "exited")
        return value
    raise Failed(f"not ready after {timeout:g}s: last probe {last.detail}", "not-ready")


async def health_check(probe: Probe, generation: Generation) -> Result:
    """One health verdict; an attempt answered by another generation is retried, as it proves nothing."""
    result = await probe.check(generation)
    for _ in range(_INCONCLUSIVE_RETRIES):
        if result.verdict is not Verdict.INCONCLUSIVE:
            break
        await anyio.sleep(0.005)
        result = await probe.check(generation)
    return result


async def watch(probe: Probe, generation: Generation, window: float, interval: float, threshold: int) -> None:
    """Health-check through the watch window; raises Failed on `threshold` consecutive failures or an exit."""

    async def checks() -> None:
        failures = 0
        while True:
            await anyio.sleep(interval)
            result = await health_check(probe, generation)
            if result.verdict is Verdict.READY:
                failures = 0
            elif result.verdict is Verdict.NOT_READY:
                failures += 1
                if failures >= threshold:
                    raise Failed(f"unhealthy in watch window: {failures} consecutive failures (last: {result.detail})",
                                 "unhealthy")

    with anyio.move_on_after(window):
        which, value = await first_completed(checks, generation.exit.wait)
        if which == 1:
            raise Failed(f"{value.describe()} in watch window", "exited")


@dataclass
class Rollout:
    """One upgrade from the serving generation to a new one. `state` is what status reports."""

    host: Host
    old: Generation | None
    trigger: str
    force: bool = False
    release: Release | None = None  # a given release (rollback, liveness) instead of resolving from disk
    plan: Plan | None = None
    state: str = IDLE
    new: Generation | None = None
    began: float = field(default_factory=time.monotonic)
    timings: dict[str, float] = field(default_factory=dict)
    _abort: anyio.Event = field(default_factory=anyio.Event)
    _abort_reason: str = ""

    @property
    def settings(self) -> Settings:
        """The settings this upgrade runs with: the re-read ones once prepared."""
        return self.plan.settings if self.plan else self.host.settings

    def _enter(self, state: str) -> None:
        previous, self.state = self.state, state
        generation = self.new or self.old
        self.host.events.emit("transition", f"upgrade: {previous} → {state}", level="debug",
                              gen=generation.number if generation else None, previous=previous, state=state,
                              elapsed=round(time.monotonic() - self.began, 6))

    def _mark(self, phase: str) -> None:
        self.timings[phase] = round(time.monotonic() - self.began, 6)

    def _outcome(self, result: str, reason: str = "", kind: str = "") -> Outcome:
        return Outcome(result, reason, self.new.number if self.new else None, self.old.number if self.old else None,
                       dict(self.timings), kind, self.trigger, self.release)

    def abort(self, reason: str) -> bool:
        """Roll back now (an operator's request); only possible before the old generation is told to drain."""
        if self.state not in (SPAWNING, WAITING_READY, WATCHING):
            return False
        self._abort_reason = reason
        self._abort.set()
        return True

    async def run(self) -> Outcome:
        """Run the whole upgrade; never raises for a failed release — that is an Outcome."""
        self._enter(SPAWNING)
        try:
            self.plan = self.host.prepare(self.release)
            self.release = self.plan.release
            refusal = self.host.refusal(self.release, self.force)
        except SpawnError as exc:
            return await self._roll_back(f"exec failed: {exc}", "exec-failed")
        except UserError as exc:
            refusal = str(exc)  # an invalid config: nothing was started, nothing changes
        if refusal is None:
            failure = await self._hook("pre-upgrade", self.settings.hooks.pre_upgrade, "")
            refusal = f"pre-upgrade hook {failure}" if failure else None
        if refusal:
            if self.plan is not None:
                self.host.discard(self.plan)  # listeners it bound for nothing
            self.host.events.emit("upgrade-refused", f"upgrade refused: {refusal}", level="warning",
                                  gen=self.old.number if self.old else None, reason=refusal)
            self._enter(IDLE)
            return self._outcome(REFUSED, refusal)
        try:
            which, _ = await first_completed(self._bring_up, self._abort.wait)
            if which == 1:
                raise Failed(self._abort_reason, "operator")
        except Failed as failure:
            return await self._roll_back(failure.reason, failure.kind)
        return await self._promote_and_drain()

    async def _bring_up(self) -> None:
        settings, events, plan = self.settings, self.host.events, self.plan
        assert plan is not None
        try:
            self.new = self.host.launch(plan)
        except SpawnError as exc:
            raise Failed(f"exec failed: {exc}", "exec-failed") from None
        self._mark("spawned")
        self._enter(WAITING_READY)
        result = await wait_ready(plan.probe, self.new, settings.ready_timeout, settings.health_interval)
        self._mark("ready")
        self.new.mark_ready(result.detail, plan.probe.spec.kind == "notify")
        if settings.watch > 0:
            self._enter(WATCHING)
            beside = f" beside generation {self.old.number}" if self.old and self.old.alive else ""
            events.emit("watching", f"watching generation {self.new.number} for {settings.watch:g}s{beside}", gen=self.new.number)
            await watch(plan.probe, self.new, settings.watch, settings.health_interval, settings.health_threshold)

    async def _promote_and_drain(self) -> Outcome:
        settings, events = self.settings, self.host.events
        assert self.new is not None
        self.host.promote(self.new, self.plan)
        self._mark("promoted")
        old_number = self.old.number if self.old else None
        events.emit("promoted", f"generation {self.new.number} promoted"
                    + (f"; draining generation {old_number}" if old_number else ""),
                    gen=self.new.number, pids=self.new.pids(), old_gen=old_number, timings=dict(self.timings))
        self._enter(DRAINING)
        async with anyio.create_task_group() as group:
            group.start_soon(self._hook, "post-upgrade", settings.hooks.post_upgrade, "")
            if self.old is not None:
                await self.host.retire(self.old, graceful=True)
        self._mark("old_gone")
        self._enter(IDLE)
        return self._outcome(PROMOTED)

    async def _roll_back(self, reason: str, kind: str) -> Outcome:
        events = self.host.events
        self._enter(ROLLING_BACK)
        new_number = self.new.number if self.new else None
        old_number = self.old.number if self.old else None
        if self.new is not None:
            # Drained, not killed: before failing it may have accepted (and be answering) connections.
            await self.host.retire(self.new, graceful=True)
        if self.plan is not None:
            self.host.discard(self.plan)
        self._mark("rolled_back")
        keeps = f"; generation {old_number} keeps serving" if self.old and self.old.alive else ""
        events.emit("rolled-back", f"upgrade to generation {new_number} rolled back: {reason}{keeps}", level="warning",
                    gen=new_number, old_gen=old_number, reason=reason, category=kind, timings=dict(self.timings))
        await self._hook("on-rollback", self.settings.hooks.on_rollback, reason)
        self._enter(IDLE)
        return self._outcome(ROLLED_BACK, reason, kind)

    async def _hook(self, name: str, command: str | None, reason: str) -> str | None:
        """Run one hook with the generations and reason in its environment; returns why it failed, or None."""
        if not command:
            return None
        env = {
            "SUPERVISE_HOOK": name,
            "SUPERVISE_OLD_GENERATION": str(self.old.number) if self.old else "",
            "SUPERVISE_OLD_PID": str(self.old.leader) if self.old else "",
            "SUPERVISE_NEW_GENERATION": str(self.new.number) if self.new else "",
            "SUPERVISE_NEW_PID": str(self.new.leader) if self.new else "",
            "SUPERVISE_REASON": reason,
        }
        failure = await self.host.commands(command, env, self.settings.hooks.timeout)
        level = "info" if failure is None else "warning"
        self.host.events.emit("hook", f"{name} hook " + ("succeeded" if failure is None else failure), level=level,
                              hook=name, failure=failure)
        return failure

