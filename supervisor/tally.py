"""What supervise counts as it runs: upgrades by outcome, rollbacks by reason, restarts, replacements of serving
instances (unhealthy, --max-rss), listener revivals and
the durations of upgrade phases and probe attempts. Counted from events (and timed probes) in plain Python, so it
costs nothing at start-up; control/metrics.py renders it for a scrape."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

from .event_kinds import Kind
from .events import Event
from .probe_spec import ProbeSpec
from .probes import Probe, Result, Subject, Verdict

_PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_PROBE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class Histogram:
    """Cumulative-bucket histogram, enough for Prometheus exposition."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def buckets(self) -> list[tuple[str, int]]:
        running, result = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            result.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return result


@dataclass
class Tally:
    """Everything counted so far. Subscribe `on_event` to the event stream."""

    upgrades: Counter[str] = field(default_factory=Counter)
    rollbacks: Counter[str] = field(default_factory=Counter)
    restarts: int = 0
    revivals: Counter[str] = field(default_factory=Counter)  # listener name → times it was made to listen again
    replacements: Counter[str] = field(default_factory=Counter)  # serving instances replaced by liveness, by why
    phases: dict[str, Histogram] = field(default_factory=dict)
    probes: dict[str, Histogram] = field(default_factory=dict)
    probes_elsewhere: int = 0  # probe connections another generation (or no instance under test) accepted

    def on_event(self, event: Event) -> None:
        if event.kind == Kind.PROMOTED:
            self.upgrades["promoted"] += 1
            self._phases(event.fields.get("timings", {}))
        elif event.kind == Kind.ROLLED_BACK:
            self.upgrades["rolled-back"] += 1
            self.rollbacks[event.fields.get("category", "other")] += 1
        elif event.kind == Kind.UPGRADE_REFUSED:
            self.upgrades["refused"] += 1
        elif event.kind == Kind.UNHEALTHY:
            self.replacements["unhealthy"] += 1
        elif event.kind == Kind.MEMORY_LIMIT:
            self.replacements["memory"] += 1
        elif event.kind == Kind.RESTARTING:
            self.restarts += 1
        elif event.kind == Kind.LISTENER_REVIVED:
            self.revivals[event.fields.get("name", "")] += 1
        elif event.kind == Kind.RETIRED and "elapsed" in event.fields:
            self.phases.setdefault("drain", Histogram(_PHASE_BUCKETS)).observe(event.fields["elapsed"])

    def _phases(self, timings: dict[str, float]) -> None:
        previous = 0.0
        for phase in ("spawned", "ready", "promoted"):
            if phase in timings:
                self.phases.setdefault(phase, Histogram(_PHASE_BUCKETS)).observe(max(0.0, timings[phase] - previous))
                previous = timings[phase]

    def observe_probe(self, kind: str, seconds: float) -> None:
        self.probes.setdefault(kind, Histogram(_PROBE_BUCKETS)).observe(seconds)


@dataclass
class TimedProbe:
    """A probe that reports each attempt's duration to the tally."""

    inner: Probe
    tally: Tally

    @property
    def spec(self) -> ProbeSpec:
        return self.inner.spec

    async def check(self, subject: Subject) -> Result:
        began = time.perf_counter()
        result = await self.inner.check(subject)
        self.tally.observe_probe(self.inner.spec.kind, time.perf_counter() - began)
        if result.verdict is Verdict.INCONCLUSIVE:
            self.tally.probes_elsewhere += 1
        return result
