"""The health of a generation after it is ready: the watch window of an upgrade, and the strikes that count
failed checks per instance (the liveness worker counts with them too)."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

from .acceptance import Proof, answered_elsewhere
from .counted import counted
from .generation import Generation
from .instance import Instance
from .probes import Probe, Result, Verdict
from .readiness import Failed
from .states import FailureKind

_INCONCLUSIVE_RETRIES = 20


async def health_check(probe: Probe, subject: Generation | Instance) -> Result:
    """One health verdict; an attempt answered by another generation is retried, as it proves nothing."""
    result = await probe.check(subject)
    for _ in range(_INCONCLUSIVE_RETRIES):
        if result.verdict is not Verdict.INCONCLUSIVE:
            break
        await anyio.sleep(0.005)
        result = await probe.check(subject)
    return result


@dataclass
class Strikes:
    """Consecutive failed health checks of each instance of a generation, told apart by the pid that answered:
    one sick instance among healthy ones must not have its failures reset by its siblings' successes."""

    generation: Generation
    threshold: int
    counts: dict[int | None, int] = field(default_factory=dict)  # instance index (None: not attributable)

    def record(self, result: Result) -> str | None:
        """Count one check; when an instance reaches the threshold, what is wrong (`3 consecutive failures …`)."""
        if result.verdict is Verdict.INCONCLUSIVE:
            return None
        owner = self.generation.owner(result.pid)
        key = owner.index if owner is not None else None
        if result.verdict is Verdict.READY:
            self.counts[key] = 0
            return None
        self.counts[key] = self.counts.get(key, 0) + 1
        if self.counts[key] < self.threshold:
            return None
        self.counts[key] = 0
        several = len(self.generation.instances) > 1 and owner is not None
        failures = counted(self.threshold, "consecutive failure")
        return (f"instance {key}: " if several else "") + f"{failures} (last: {result.detail})"


async def watch(probe: Probe, generation: Generation, window: float, interval: float, threshold: int,
                proof: Proof | None = None) -> None:
    """Health-check through the watch window; raises Failed when an instance fails `threshold` checks in a row
    (a check answered only by another generation counts as failed), or when, at the end of the window, the
    `proof` finds an instance not accepting connections itself. (An instance dying meanwhile is caught by the
    rollout's casualty watch.)"""
    strikes = Strikes(generation, threshold)
    with anyio.move_on_after(window):
        while True:
            await anyio.sleep(interval)
            failure = strikes.record(answered_elsewhere(await health_check(probe, generation)))
            if failure:
                raise Failed(f"unhealthy in watch window: {failure}", FailureKind.UNHEALTHY)
    if proof is not None:
        await proof.run(interval)
