"""Proof, during the watch window, that each new instance accepts connections itself.

Health checks through a shared socket are answered by whichever process accepts first. A new generation that
closed its inherited socket (or never accepted at all, yet sent READY=1) accepts nothing: every check is then
answered by the old generation, and a watch window that only counts failures would promote it — and the
service would go down with the old generation's drain. So each instance that enters the window must also be
seen accepting a connection on one of our TCP listeners (attributed to its own processes, see attribution.py)
at the end of the window; a health check answered only by another generation counts as a failed one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from . import attribution
from .instance import Instance
from .listeners import Listener
from .probe_spec import ProbeSpec
from .probes import Result, Route, Subject, Target, TcpProbe, Verdict
from .readiness import Failed, wait_all_ready
from .states import FailureKind

_SPEC = ProbeSpec("tcp", "tcp (accepted by the instance itself)")


@dataclass
class AcceptProbe:
    """A connection to each of our TCP listeners in turn, READY when a process of the subject accepts it."""

    probes: list[TcpProbe]
    turn: int = field(default=0)

    @property
    def spec(self) -> ProbeSpec:
        return _SPEC

    async def check(self, subject: Subject) -> Result:
        probe = self.probes[self.turn % len(self.probes)]
        self.turn += 1
        return await probe.check(subject)


def accept_probe(listeners: Sequence[Listener], timeout: float, route: Route | None = None) -> AcceptProbe | None:
    """The probe proving acceptance on `listeners` (its connections steered by `route`, where they are); None when
    nothing can be proven (no TCP listener, or no way to tell which process accepted a connection)."""
    if not attribution.available():
        return None
    probes = [TcpProbe(_SPEC, Target(*listener.probe_address(), shared=True, route=route), timeout)
              for listener in listeners if listener.kind == "tcp" and listener.sock.fileno() != -1]
    return AcceptProbe(probes) if probes else None


def answered_elsewhere(result: Result) -> Result:
    """A health check every attempt of which was answered by another generation is a failed one."""
    if result.verdict is not Verdict.INCONCLUSIVE:
        return result
    return Result(Verdict.NOT_READY, f"answered only by another generation ({result.detail})", result.pid)


@dataclass(frozen=True)
class Proof:
    """What the end of a watch window must see accepting connections itself: these instances, through `probe`
    (None: it cannot be told), within `timeout`. `several`: the generation has more than one instance (reasons
    then name the instance)."""

    probe: AcceptProbe | None
    instances: list[Instance]
    timeout: float
    several: bool = False

    async def run(self, interval: float) -> None:
        """Wait until each instance has accepted a connection itself; raises Failed (unhealthy) for one that did
        not in time. An instance that exits meanwhile is left to the rollout's casualty watch."""
        if self.probe is None or not self.instances:
            return
        failed = await wait_all_ready(self.probe, self.instances, self.timeout, interval, lambda instance, result: None)
        for instance, failure in failed.items():
            if failure.kind != FailureKind.EXITED:
                which = f"instance {instance.index} " if self.several else ""
                raise Failed(f"unhealthy in watch window: {which}accepted no connection itself within "
                             f"{self.timeout:g}s at its end (each went to another generation: did it close its "
                             "listening socket?)", "unhealthy")
