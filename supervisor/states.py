"""The vocabularies of state: where an instance is, which phase an upgrade is in, how it ended, and what failed.

StrEnums, so status, logs, history and the API show exactly the strings they always have; each state has one
writer (Instance.enter, Rollout._enter), which checks the move is one that can happen.
"""

from __future__ import annotations

from enum import StrEnum


class InstanceState(StrEnum):
    """starting → ready → serving → draining → exited (a generation's state is its instances', see generation.py)."""

    STARTING = "starting"
    READY = "ready"
    SERVING = "serving"
    DRAINING = "draining"
    EXITED = "exited"


class TrafficState(StrEnum):
    """Which new connections a generation gets (traffic.py): passive → active → drained → retiring; a drained
    generation can be made active again (undrained)."""

    PASSIVE = "passive"
    ACTIVE = "active"
    DRAINED = "drained"
    RETIRING = "retiring"


class Phase(StrEnum):
    """Where an upgrade is (rollout.py)."""

    IDLE = "idle"
    SPAWNING = "spawning"
    WAITING_READY = "waiting-ready"
    WATCHING = "watching"
    DRAINING = "draining"
    ROLLING_BACK = "rolling-back"


class RolloutResult(StrEnum):
    """How an upgrade ended."""

    PROMOTED = "promoted"
    ROLLED_BACK = "rolled-back"
    REFUSED = "refused"
    ABORTED = "aborted"  # the supervisor stopped before it ended


class FailureKind(StrEnum):
    """What made a new generation fail, and so whose fault it was."""

    EXEC_FAILED = "exec-failed"
    EXITED = "exited"
    NOT_READY = "not-ready"
    UNHEALTHY = "unhealthy"
    OPERATOR = "operator"  # ctl rollback in a watch window
    RESOURCES = "resources"  # the supervisor's own (out of fds)
    INTERNAL = "internal"  # a bug of ours, contained

    @property
    def blames_release(self) -> bool:
        """Whether a rollback of this kind marks the release known bad."""
        return self in (FailureKind.EXEC_FAILED, FailureKind.EXITED, FailureKind.NOT_READY, FailureKind.UNHEALTHY)


# The moves an instance can make (Instance.enter checks them): it may die, or be drained, from any living state.
MOVES: dict[InstanceState, frozenset[InstanceState]] = {
    InstanceState.STARTING: frozenset({InstanceState.READY, InstanceState.SERVING, InstanceState.DRAINING,
                                       InstanceState.EXITED}),
    InstanceState.READY: frozenset({InstanceState.SERVING, InstanceState.DRAINING, InstanceState.EXITED}),
    InstanceState.SERVING: frozenset({InstanceState.DRAINING, InstanceState.EXITED}),
    InstanceState.DRAINING: frozenset({InstanceState.EXITED}),
    InstanceState.EXITED: frozenset(),
}
