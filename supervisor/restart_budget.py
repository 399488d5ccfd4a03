"""How often an instance may fail: per-index failures in a sliding window, exponential backoff and the crash-loop
rule. The budget only decides; the supervisor says what happens and acts on it (never an exception from here)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio

MAX_BACKOFF = 30.0
FIRST_BACKOFF = 0.1


@dataclass(frozen=True)
class Decision:
    """What one more failure of an instance index means."""

    count: int  # failures of this index within the window, this one included
    delay: float  # how long to wait before starting it again
    crash_loop: bool = False  # past --max-restarts while others serve: retried at the longest delay, not given up
    give_up: bool = False  # past --max-restarts and nothing serves: our own manager (systemd, docker) must act


@dataclass
class RestartBudget:
    """Failures per instance index. Each index counts on its own, as a single child would: instances that die
    together (a dependency went away) each get their restarts, rather than N of them using up one budget at once."""

    clock: Callable[[], float] = anyio.current_time
    failures: dict[int, deque[float]] = field(default_factory=dict)

    def fail(self, index: int, max_restarts: int, window: float, serving: int) -> Decision:
        """Count a failure of `index` now, with the limits in force now and `serving` instances still ready."""
        now = self.clock()
        failures = self.failures.setdefault(index, deque())
        failures.append(now)
        while failures and now - failures[0] > window:
            failures.popleft()
        count = len(failures)
        if count > max_restarts:
            return Decision(count, MAX_BACKOFF, crash_loop=bool(serving), give_up=not serving)
        return Decision(count, min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (count - 1)))
