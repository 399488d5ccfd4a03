"""A snapshot: everything a supervisor holds and knows, copied into frozen plain data at one instant.

The control API and the metrics render snapshots only (they never reach into the live objects), and a snapshot
is made of numbers, strings and tuples so that it can be serialized as it is (`as_dict`) — which is what a
re-exec of the supervisor will need. Timestamps are monotonic seconds, like `taken_at`: ages are differences.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psutil

from .generation import Generation
from .instance import Instance
from .listener_guard import accept_queue
from .listeners import Listener
from .rollout import Rollout
from .states import InstanceState
from .tally import Histogram, Tally
from .traffic import Traffic


@dataclass(frozen=True)
class ProcessView:
    """One living process of an instance's tree, measured when the snapshot was taken."""

    pid: int
    rss: int
    cpu_percent: float  # since the previous snapshot (psutil keeps the reference point per process)
    cpu_seconds: float


@dataclass(frozen=True)
class InstanceView:
    index: int
    state: str
    leader: int
    pids: tuple[int, ...]
    alive: bool
    ready: bool
    started_at: float
    ready_at: float | None
    last_watchdog: float | None
    status: str
    sick: str | None
    processes: tuple[ProcessView, ...]


@dataclass(frozen=True)
class TrafficView:
    """Which new connections a generation gets (traffic.py), and what waits in its own sockets."""

    state: str  # passive, active, drained, retiring
    share: float  # of new connections, 0..1
    queued: dict[str, int]  # connections waiting to be accepted, by listener


@dataclass(frozen=True)
class GenerationView:
    number: int
    state: str
    serving: bool
    leader: int
    pids: tuple[int, ...]
    started_at: float
    ready_at: float | None
    last_watchdog: float | None
    argv: tuple[str, ...]
    executable: str
    cwd: str
    release: dict[str, Any] | None  # its identity (identity.py), when known
    instances: tuple[InstanceView, ...]
    traffic: TrafficView | None = None  # None: none of its listeners is steered

    def ready(self) -> tuple[InstanceView, ...]:
        """Its instances proved ready and not draining (as Generation.ready())."""
        return tuple(instance for instance in self.instances if instance.ready)


@dataclass(frozen=True)
class ListenerView:
    name: str
    address: str
    kind: str
    adopted: bool
    fd: int  # in the children
    accept_queue: tuple[int, int] | None  # (waiting, backlog) of a TCP listener


@dataclass(frozen=True)
class RolloutView:
    state: str
    trigger: str
    began: float
    new_gen: int | None
    old_gen: int | None
    batches: tuple[int, ...]
    replaced: int


@dataclass(frozen=True)
class HistogramView:
    buckets: tuple[tuple[str, int], ...]  # cumulative, Prometheus style
    total: float


@dataclass(frozen=True)
class TallyView:
    upgrades: dict[str, int]
    rollbacks: dict[str, int]
    restarts: int
    revivals: dict[str, int]
    phases: dict[str, HistogramView]
    probes: dict[str, HistogramView]
    log_dropped: int
    probes_elsewhere: int
    output_dropped: int = 0  # lines of the children's output the log's reader did not take in time
    replacements: dict[str, int] = dataclasses.field(default_factory=dict)  # by reason: unhealthy, memory


@dataclass(frozen=True)
class SupervisorView:
    pid: int
    name: str
    version: str
    started_at: float
    started_wall: float
    state: str  # stopping, the rollout's phase, or idle
    stopping: bool
    control: str
    operation: str | None  # the operation running now: upgrade, repair
    processes: int  # instances wanted
    strategy: str
    orphans_reaped: int
    cutover: str = "shared"  # steered: each generation has its own socket (traffic.py)
    unsteered: dict[str, str] = dataclasses.field(default_factory=dict)  # listener → why it is shared
    reexecs: tuple[float, ...] = ()  # wall-clock times the supervisor re-executed itself (ctl reexec)


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    supervisor: SupervisorView
    listeners: tuple[ListenerView, ...]
    generations: tuple[GenerationView, ...]
    rollout: RolloutView | None
    history: tuple[dict[str, Any], ...]
    last_known_good: dict[str, Any] | None
    last_known_bad: dict[str, Any] | None
    state_error: str | None
    workers: tuple[dict[str, Any], ...]
    tally: TallyView

    @property
    def serving(self) -> GenerationView | None:
        return next((generation for generation in self.generations if generation.serving), None)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def of_instance(instance: Instance, measure: bool) -> InstanceView:
    return InstanceView(instance.index, instance.state if instance.alive else InstanceState.EXITED, instance.leader,
                        tuple(instance.pids()), instance.alive, instance.ready, instance.started_at, instance.ready_at,
                        instance.last_watchdog, instance.status_text, instance.sick,
                        _measured(instance.living()) if measure else ())


def _measured(processes: Iterable[psutil.Process]) -> tuple[ProcessView, ...]:
    found = []
    for process in processes:
        try:
            with process.oneshot():
                times = process.cpu_times()
                found.append(ProcessView(process.pid, process.memory_info().rss, process.cpu_percent(),
                                         times.user + times.system))
        except psutil.Error:
            continue  # it ended between the listing and the reading
    return tuple(found)


def of_traffic(traffic: Traffic, number: int) -> TrafficView | None:
    state = traffic.states.get(number)
    if state is None or not traffic.steers(number):
        return None
    return TrafficView(state, traffic.share(number), traffic.queued(number))


def of_generation(generation: Generation, serving: bool, measure: bool,
                  traffic: Traffic | None = None) -> GenerationView:
    release = generation.release
    instances = sorted(generation.instances, key=lambda instance: instance.index)
    return GenerationView(generation.number, generation.state, serving, generation.leader, tuple(generation.pids()),
                          generation.started_at, generation.ready_at, generation.last_watchdog, tuple(release.argv),
                          release.executable, release.cwd,
                          generation.identity.as_dict() if generation.identity else None,
                          tuple(of_instance(instance, measure) for instance in instances),
                          of_traffic(traffic, generation.number) if traffic else None)


def of_listeners(listeners: Iterable[Listener]) -> tuple[ListenerView, ...]:
    return tuple(ListenerView(listener.name, listener.address, listener.kind, listener.adopted, 3 + index,
                              accept_queue(listener.sock) if listener.kind == "tcp" else None)
                 for index, listener in enumerate(listeners))


def of_tally(tally: Tally, log_dropped: int, output_dropped: int = 0) -> TallyView:
    return TallyView(dict(tally.upgrades), dict(tally.rollbacks), tally.restarts, dict(tally.revivals),
                     _histograms(tally.phases), _histograms(tally.probes), log_dropped, tally.probes_elsewhere,
                     output_dropped, dict(tally.replacements))


def _histograms(histograms: dict[str, Histogram]) -> dict[str, HistogramView]:
    return {name: HistogramView(tuple(histogram.buckets()), histogram.total) for name, histogram in histograms.items()}


def of_rollout(rollout: Rollout) -> RolloutView:
    return RolloutView(rollout.state, rollout.trigger, rollout.began, rollout.new.number if rollout.new else None,
                       rollout.old.number if rollout.old else None, tuple(rollout.batches), rollout.replaced)
