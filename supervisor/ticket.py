"""A ticket: one request for an upgrade or a rollback, answered with the verdict of the rollout that served it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio

from .release import Release
from .rollout import Outcome
from .states import RolloutResult


@dataclass(eq=False)
class Ticket:
    """One request for an upgrade (or rollback); several coalesced requests share the rollout's verdict."""

    trigger: str
    force: bool = False
    release: Release | None = None
    coalesced: bool = False
    goal: str = RolloutResult.PROMOTED  # the result that does what was asked (a rollback in a watch window asks for ROLLED_BACK)
    done: anyio.Event = field(default_factory=anyio.Event)
    outcome: Outcome | None = None

    def settle(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.done.set()

    def verdict(self) -> dict[str, Any]:
        """The last line of a streamed upgrade: how it ended."""
        outcome = self.outcome or Outcome(RolloutResult.ABORTED, "no verdict")
        return {"event": "verdict", "result": outcome.result, "ok": outcome.result == self.goal, "reason": outcome.reason,
                "new_gen": outcome.new_gen, "old_gen": outcome.old_gen, "timings": outcome.timings, "blame": outcome.blame,
                "release": outcome.identity.as_dict() if outcome.identity else None, "output": list(outcome.output)}
