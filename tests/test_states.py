"""Fast layer: an instance's state has one writer (Instance.enter) that refuses the moves that cannot happen, and
each failure kind knows whether it blames the release (what marks a release known bad)."""

from __future__ import annotations

import pytest

from fakes import release
from supervisor.events import Events
from supervisor.instance import IllegalMove, Instance
from supervisor.reaper import ChildExit
from supervisor.states import MOVES, FailureKind, InstanceState

PID = 5_000_001  # above any pid_max: nothing real


def instance() -> Instance:
    return Instance(1, 0, 1, release("v1"), PID, ChildExit(PID), Events(), started_at=0.0)


def test_an_instance_moves_forward_only() -> None:
    subject = instance()
    for state in (InstanceState.READY, InstanceState.SERVING, InstanceState.SERVING, InstanceState.DRAINING):
        subject.enter(state)
    assert subject.state == InstanceState.DRAINING
    with pytest.raises(IllegalMove, match="cannot go from draining to serving"):
        subject.enter(InstanceState.SERVING)
    subject.enter(InstanceState.EXITED)
    for state in InstanceState:
        if state != InstanceState.EXITED:
            with pytest.raises(IllegalMove):
                subject.enter(state)


@pytest.mark.parametrize("state", list(InstanceState))
def test_every_living_state_can_die_or_be_drained(state: InstanceState) -> None:
    if state != InstanceState.EXITED:
        assert InstanceState.EXITED in MOVES[state]
        assert state == InstanceState.DRAINING or InstanceState.DRAINING in MOVES[state]


def test_only_the_release_s_own_failures_blame_it() -> None:
    blamed = {kind for kind in FailureKind if kind.blames_release}
    assert blamed == {FailureKind.EXEC_FAILED, FailureKind.EXITED, FailureKind.NOT_READY, FailureKind.UNHEALTHY}
    assert str(FailureKind.NOT_READY) == "not-ready" and f"{InstanceState.SERVING}" == "serving", "as on the wire"
