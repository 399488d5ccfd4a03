"""A fake fleet for the fast layer: the real upgrade state machine (rollout.py, readiness.py) run against scripted
instances on virtual time.

`FakeFleet` is the rollout's Host. Its generations and instances are the real classes; only what touches the OS
is scripted: an instance is a `Life` (ready at t, dies at t, sick after t, cannot be spawned), its "processes" are
pids that cannot exist, the probe answers from the script, and hooks answer from a table. Times in a Life are
seconds of virtual time after the instance was spawned. The fleet keeps a log of what the rollout asked of it and
what happened (`actions`), the events the rollout emitted, and the number of ready instances after every change.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup

from supervisor.config import Hooks, Settings
from supervisor.events import Event, Events
from supervisor.generation import Generation
from supervisor.identity import Identity
from supervisor.instance import Instance, Launcher
from supervisor.probe_spec import ProbeSpec
from supervisor.probes import Result, Verdict
from supervisor.readiness import Cohort, wait_all_ready
from supervisor.reaper import ChildExit, ExitStatus, Reaper
from supervisor.release import Release
from supervisor.rollout import Outcome, Plan, Rollout
from supervisor.states import InstanceState, TrafficState
from supervisor.strategy import build_strategy

_FIRST_PID = 5_000_000  # above any Linux pid_max (2**22): a signal sent by mistake reaches nobody
_RESTORE_ATTEMPTS = 5


@dataclass(frozen=True)
class Life:
    """How one scripted instance behaves; times are seconds after it was spawned."""

    ready: float | None = 0.5  # probes answer ready from then on; None: never
    dies: float | None = None  # it exits on its own then (with `code`)
    code: int = 1
    sick: float | None = None  # health checks fail from then on
    spawn_error: Exception | None = None  # raised by spawn: nothing starts
    probe_error: Exception | None = None  # raised by a probe of it
    drain: float = 0.1  # how long it takes to exit once drained


@dataclass
class Script:
    """The fleet: `old` ready instances serving (indexes in `old_dead` already exited, not yet replaced); the life
    of each new instance by (generation, index) — a sequence gives successive spawns at that index their lives in
    turn — and what the host answers."""

    old: int | None = None  # instances of the serving generation (default: N)
    old_dead: tuple[int, ...] = ()
    lives: Mapping[tuple[int, int], Life | Sequence[Life]] = field(default_factory=dict)
    default: Life = Life()
    prepare_error: Exception | None = None
    refusal: str | None = None
    changed: str | None = None  # changed_in_place's answer
    hooks: Mapping[str, str] = field(default_factory=dict)  # hook name → its failure (absent: it succeeds)
    probe_kind: str = "http"  # http/tcp probe a cohort together; notify/exec each instance alone

    def life(self, number: int, index: int, attempt: int) -> Life:
        lives = self.lives.get((number, index), self.default)
        if isinstance(lives, Life):
            return lives
        return lives[min(attempt, len(lives) - 1)]


def settings(processes: int = 1, strategy: str = "surge", batch: str | None = None, success: int = 100,
             hooks: Hooks | None = None, **values: Any) -> Settings:
    """Settings for a fake upgrade: the product's defaults (60 s ready timeout, 5 s watch, 3 strikes) unless given."""
    return Settings(command=("app",), processes=processes, strategy=build_strategy(strategy, batch, None, success),
                    hooks=hooks or Hooks(), **values)


def release(version: str) -> Release:
    return Release(("app", version), "/srv/app/bin/app", "/srv/app", "/srv/app")


def _identity(release_: Release) -> Identity:
    """A release is named by its version (argv[1]): what the supervisor's identify() would find in a version file."""
    return Identity(f"digest-{release_.argv[1]}", "content", release_.executable, release_.argv, release_.cwd,
                    version=release_.argv[1])


@dataclass
class FakeProcess:
    """What Instance asks of a psutil.Process, answered from the instance's scripted exit."""

    pid: int
    exit: ChildExit

    def is_running(self) -> bool:
        return self.exit.status is None

    def status(self) -> str:
        return "running"


@dataclass
class FakeProbe:
    """Answers from the script at the current virtual time. A cohort's connection is accepted by its first
    pending instance that is ready (else by one that is not); a generation's health checks go round its ready
    instances in turn, as connections through a shared socket spread over the processes accepting them."""

    fleet: FakeFleet
    spec: ProbeSpec
    turn: int = 0

    async def check(self, subject: Any) -> Result:
        await anyio.sleep(0)  # a probe is a round trip: others run meanwhile
        if isinstance(subject, Generation):
            return self._health(subject)
        pending = subject.pending if isinstance(subject, Cohort) else [subject]
        for instance in pending:
            error = self.fleet.lives[instance].probe_error
            if error is not None:
                raise error
        alive = [instance for instance in pending if instance.alive]
        ready = [instance for instance in alive if self._ready(instance)]
        if ready:
            return Result(Verdict.READY, "HTTP 200", ready[0].leader)
        if alive:
            return Result(Verdict.NOT_READY, "HTTP 503", alive[0].leader)
        return Result(Verdict.NOT_READY, "connection refused")

    def _ready(self, instance: Instance) -> bool:
        ready = self.fleet.lives[instance].ready
        return ready is not None and self.fleet.age(instance) >= ready

    def _health(self, generation: Generation) -> Result:
        ready = generation.ready()
        if not ready:
            return Result(Verdict.NOT_READY, "connection refused")
        instance = ready[self.turn % len(ready)]
        self.turn += 1
        sick = self.fleet.lives[instance].sick
        if sick is not None and self.fleet.age(instance) >= sick:
            return Result(Verdict.NOT_READY, "HTTP 500", instance.leader)
        return Result(Verdict.READY, "HTTP 200", instance.leader)


@dataclass
class FakeCommands:
    """Hooks: each call is recorded (name, environment) and answered from the script."""

    failures: Mapping[str, str]
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    async def __call__(self, command: str, env: dict[str, str], timeout: float) -> str | None:
        name = env["SUPERVISE_HOOK"]
        self.calls.append((name, env))
        await anyio.sleep(0.01)
        return self.failures.get(name)


@dataclass
class FakeFleet:
    """The rollout's Host over scripted instances. Use `async with FakeFleet(...) as fleet`: the serving generation
    (number 1) is then up, and `fleet.upgrade()` runs one real Rollout to generation 2."""

    settings: Settings
    script: Script = field(default_factory=Script)
    events: Events = field(default_factory=lambda: Events(log_level="error", stream=io.StringIO()))
    commands: FakeCommands = field(init=False)
    probe: FakeProbe = field(init=False)
    generations: list[Generation] = field(default_factory=list)
    serving: Generation | None = None
    lives: dict[Instance, Life] = field(default_factory=dict)
    log: list[Event] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)  # what the host was asked to do and what happened, in order
    ready_counts: list[int] = field(default_factory=list)  # ready instances of all generations after each change
    drains_below: list[str] = field(default_factory=list)  # drains of a ready instance that left too few ready
    floor: int = 0  # what the count of ready instances must never drop below: N, or fewer if the old was short
    traffic: dict[int, TrafficState] = field(default_factory=dict)  # each generation's, as the rollout steered it
    steering: list[str] = field(default_factory=list)  # "2 active ×1", in order
    _group: TaskGroup | None = None
    _pids: int = _FIRST_PID
    _attempts: dict[tuple[int, int], int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.commands = FakeCommands(self.script.hooks)
        self.probe = FakeProbe(self, ProbeSpec(self.script.probe_kind, f"{self.script.probe_kind} (fake)"))
        self.events.subscribe(self.log.append)

    async def __aenter__(self) -> FakeFleet:
        self._group = await anyio.create_task_group().__aenter__()
        old = self.create(Plan(self.settings, self.probe, release("v1"), (), self.settings.processes))
        for index in range(self.settings.processes if self.script.old is None else self.script.old):
            instance = self.spawn(old, index)
            self.announce_ready(old, instance, Result(Verdict.READY, "HTTP 200"), self.probe)
            if index in self.script.old_dead:
                self._exit(old, instance, ExitStatus(code=1), "died")
        self.promote(old)
        self.floor = min(self.settings.processes, self.ready())
        self.actions.clear()
        self.ready_counts = [self.ready()]
        return self

    async def __aexit__(self, *exc_info: object) -> bool | None:
        assert self._group is not None
        self._group.cancel_scope.cancel()  # lives still scripted to end later
        return await self._group.__aexit__(*exc_info)

    # -- running an upgrade and looking at it --------------------------------------------------------------------

    def rollout(self, **options: Any) -> Rollout:
        return Rollout(self, self.serving, "test", clock=anyio.current_time, **options)

    async def upgrade(self, **options: Any) -> Outcome:
        return await self.rollout(**options).run()

    def kinds(self) -> list[str]:
        """The kinds of the events the rollout emitted, state transitions left out."""
        return [event.kind for event in self.log if event.kind != "transition"]

    def states(self) -> list[str]:
        return [event.fields["state"] for event in self.log if event.kind == "transition"]

    def event(self, kind: str) -> Event:
        return next(event for event in self.log if event.kind == kind)

    def only(self, *whats: str) -> list[str]:
        """The actions of these kinds (`drain`, `restore`, …), in order."""
        return [action for action in self.actions if action.split()[0] in whats]

    def ready(self) -> int:
        return sum(len(generation.ready()) for generation in self.generations)

    def age(self, instance: Instance) -> float:
        return anyio.current_time() - instance.started_at

    # -- the Host protocol ---------------------------------------------------------------------------------------

    def prepare(self, release_: Release | None, dry_run: bool = False) -> Plan:
        if self.script.prepare_error is not None:
            raise self.script.prepare_error
        return Plan(self.settings, self.probe, release_ or release("v2"), (), self.settings.processes)

    async def identify(self, release_: Release, fresh: bool = False) -> Identity:
        return _identity(release_)

    def refusal(self, release_: Release, identity: Identity, force: bool) -> str | None:
        return None if force else self.script.refusal

    def create(self, plan: Plan) -> Generation:
        launcher = Launcher("", Reaper(), self.events)  # never used: spawn() below makes the instances
        generation = Generation(len(self.generations) + 1, plan.release, plan.listeners, launcher,
                                started_at=anyio.current_time(), identity=_identity(plan.release))
        self.generations.append(generation)
        return generation

    def spawn(self, generation: Generation, index: int) -> Instance:
        key = (generation.number, index)
        attempt = self._attempts[key] = self._attempts.get(key, -1) + 1
        life = self.script.life(generation.number, index, attempt)
        if life.spawn_error is not None:
            self.actions.append(f"spawn-failed {generation.number}#{index}")
            raise life.spawn_error
        self._pids += 1
        exit_ = ChildExit(self._pids)
        instance = Instance(generation.number, index, len(generation.instances) + 1, generation.release, self._pids,
                            exit_, self.events, started_at=anyio.current_time())
        instance.members[self._pids] = FakeProcess(self._pids, exit_)  # type: ignore[assignment]
        generation.instances.append(instance)
        self.lives[instance] = life
        self.actions.append(f"spawn {generation.number}#{index}")
        if life.dies is not None:
            assert self._group is not None
            self._group.start_soon(self._die, generation, instance, life)
        return instance

    def announce_ready(self, generation: Generation, instance: Instance, result: Result, probe: Any) -> None:
        generation.instance_ready(instance, result.detail, by_notify=False)
        self._changed(f"ready {generation.number}#{instance.index}")

    def promote(self, generation: Generation, plan: Plan | None = None) -> None:
        self.serving = generation
        generation.serve()
        self.actions.append(f"promote {generation.number}")

    async def changed_in_place(self, generation: Generation) -> str | None:
        self.actions.append(f"changed-in-place? {generation.number}")
        return self.script.changed

    def discard(self, plan: Plan) -> None:
        self.actions.append("discard")

    def steer(self, states: Mapping[Generation, TrafficState], parts: Mapping[Generation, float] | None = None) -> None:
        for generation, state in states.items():
            self.traffic[generation.number] = state
        parts = parts or {}
        self.steering.append(", ".join(f"{gen.number} {state} ×{len(gen.ready())}"
                                       + (f" part {parts[gen]:.2f}" if gen in parts else "")
                                       for gen, state in states.items()))

    def was_active(self, generation: Generation) -> bool:
        return self.traffic.get(generation.number, TrafficState.PASSIVE) != TrafficState.PASSIVE

    async def retire(self, generation: Generation, graceful: bool) -> list[int]:
        self.actions.append(f"retire {generation.number}")
        await self.retire_instances(generation, list(generation.instances))
        generation.close()
        self.generations.remove(generation)
        if self.serving is generation:
            self.serving = None
        return []

    async def retire_instances(self, generation: Generation, instances: list[Instance]) -> None:
        """Drain them together; each is told (and logged) in the order given, then they exit concurrently."""
        async with anyio.create_task_group() as group:
            for instance in instances:
                group.start_soon(self._gone, generation, instance, self._drain(generation, instance))

    async def restore(self, generation: Generation, count: int) -> None:
        """As the supervisor's: start `count` instances at free indexes, each again until it is ready."""
        self.actions.append(f"restore {generation.number} x{count}")
        pending = generation.free_indexes(count)
        for _ in range(_RESTORE_ATTEMPTS):
            started = [self.spawn(generation, index) for index in pending]
            failed = await wait_all_ready(
                self.probe, started, self.settings.ready_timeout, self.settings.health_interval,
                lambda instance, result: self.announce_ready(generation, instance, result, self.probe))
            await self.retire_instances(generation, list(failed))
            pending = [instance.index for instance in failed]
            if not pending:
                return
        raise AssertionError(f"the script never lets generation {generation.number} be restored")

    # -- what happens to instances -------------------------------------------------------------------------------

    async def _die(self, generation: Generation, instance: Instance, life: Life) -> None:
        assert life.dies is not None
        await anyio.sleep_until(instance.started_at + life.dies)
        if instance.alive and instance.state not in (InstanceState.DRAINING, InstanceState.EXITED):
            self._exit(generation, instance, ExitStatus(code=life.code), "died")

    def _drain(self, generation: Generation, instance: Instance) -> float:
        """Tell an instance to stop; how long it takes to exit (0: it is already dead)."""
        name = f"{generation.number}#{instance.index}"
        was_ready, alive = instance.ready, instance.alive
        instance.enter(InstanceState.DRAINING)
        if not alive:
            self.actions.append(f"clear {name}")
            return 0.0
        self._changed(f"drain {name}")
        if was_ready and self.ready() < self.floor:
            self.drains_below.append(f"drain {name} left {self.ready()} ready")
        return self.lives[instance].drain

    async def _gone(self, generation: Generation, instance: Instance, delay: float) -> None:
        if instance.alive:
            await anyio.sleep(delay)
            self._exit(generation, instance, ExitStatus(code=0), "gone")
        generation.forget(instance)

    def _exit(self, generation: Generation, instance: Instance, status: ExitStatus, what: str) -> None:
        """The instance's process ended: as the reaper and the supervisor's exit watch would see it."""
        instance.exit.status = status
        instance.exit.done.set()
        generation.exited(instance, status)
        self._changed(f"{what} {generation.number}#{instance.index}")

    def _changed(self, action: str) -> None:
        self.actions.append(action)
        self.ready_counts.append(self.ready())
