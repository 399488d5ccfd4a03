"""How an upgrade moves new connections from the old generation to the new one (steered cutover, traffic.py).

A batch proven ready is made active — beside the old generation's instances in proportion, until the last
batch; then the old generation is drained: given no new connection, but running and warm. A failure before the
new generation is promoted undrains the old one at once. Where nothing is steered, the fleet keeps the states
and the kernel keeps sharing one socket: none of this changes what happens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import anyio

from .generation import Generation
from .states import TrafficState

_RAMP_STEP = 0.05  # seconds between steps of a --ramp


class Steering(Protocol):
    """What the cutover needs of the fleet (the rollout's Host has it)."""

    def steer(self, states: Mapping[Generation, TrafficState],
              parts: Mapping[Generation, float] | None = None) -> None: ...
    def was_active(self, generation: Generation) -> bool: ...


async def admit(host: Steering, new: Generation, old: Generation | None, final: bool, ramp: float,
                clock: Callable[[], float]) -> None:
    """A batch of `new` is ready: it becomes active, with --ramp its part growing from 0 over `ramp` seconds
    first (a slow start); after the `final` batch the old generation is drained."""
    both = {new: TrafficState.ACTIVE}
    if old is not None and old.alive:
        both[old] = TrafficState.ACTIVE
        began = clock()
        while (part := (clock() - began) / ramp if ramp > 0 else 1.0) < 1.0:
            host.steer(both, {new: part})
            await anyio.sleep(_RAMP_STEP)
    states = dict(both)
    if old is not None:
        states[old] = TrafficState.DRAINED if final else TrafficState.ACTIVE
    host.steer(states)


def undrain(host: Steering, new: Generation, old: Generation | None) -> None:
    """The upgrade failed: new connections go back to the old generation at once — its processes unchanged,
    nothing restarted — and the new one gets none from here on (it finishes what it has while it drains)."""
    if old is not None and host.was_active(new):
        host.steer({old: TrafficState.ACTIVE, new: TrafficState.DRAINED})
