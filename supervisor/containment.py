"""Containment: a bug inside a rollout must never take the serving generation down."""

from __future__ import annotations

import traceback

from .event_kinds import Kind
from .fleet import Fleet
from .rollout import Outcome, Rollout
from .states import FailureKind, RolloutResult


async def contain(fleet: Fleet, rollout: Rollout, exc: Exception) -> Outcome:
    """An internal error in a rollout: remove its new generation and keep the old one serving (or, past promotion,
    keep the new one and still drain the old)."""
    fleet.events.emit(Kind.INTERNAL_ERROR, f"internal error during upgrade ({type(exc).__name__}: {exc}); keeping "
                      "one serving generation", level="error", traceback="".join(traceback.format_exception(exc)))
    new, old = rollout.new, rollout.old
    numbers = (new.number if new else None, old.number if old else None)
    if new is not None and new is fleet.serving:
        if old is not None and old in fleet.generations:
            await fleet.retire(old, graceful=True)
        return Outcome(RolloutResult.PROMOTED, f"internal error after promotion: {exc}", *numbers, trigger=rollout.trigger)
    if new is not None:
        await fleet.retire(new, graceful=True)
    return Outcome(RolloutResult.ROLLED_BACK, f"internal error: {exc}", *numbers, kind=FailureKind.INTERNAL, trigger=rollout.trigger)
